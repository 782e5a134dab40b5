use std::path::PathBuf;

/// Errors from key handling. Each says which file or operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key store {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "no key for title {title:?} in key store {dir} (was it packed with another key store?)"
    )]
    NoTitleKey { title: String, dir: PathBuf },
    #[error("key for title {title:?} already exists in {dir}; use --force to replace it")]
    TitleKeyExists { title: String, dir: PathBuf },
    #[error("no server identity in key store {dir}; run `mcastd keygen` first")]
    NoIdentity { dir: PathBuf },
    #[error("server identity already exists in {dir}; use --force to replace it (archives signed by the old key stop verifying)")]
    IdentityExists { dir: PathBuf },
    #[error("invalid title id {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.')")]
    BadTitle(String),
    #[error("authentication failed: wrong key, or the sealed data or its header was modified")]
    Open,
    #[error("signature does not verify against the server identity")]
    BadSignature,
    #[error("receiver public key is not a usable X25519 key")]
    BadReceiverKey,
    #[error("the key part from the server does not open with this play's key (damaged, or an answer to another request)")]
    GrantOpen,
    #[error("a wrapped key part in the ticket database does not open: the key store's tickets.key is not the one the database was written with, or the record was modified")]
    Unwrap,
}
