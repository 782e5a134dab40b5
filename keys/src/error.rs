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
}
