//! Trust that lasts: the server keys this receiver has seen, by server address (like SSH's
//! `known_hosts`). Without it, trust on first use restarted with every title (the pin lived in
//! each title's state file), so every new title was a first use an attacker could answer.
//!
//! One line per server: `ADDRESS KEY` (the server's control address as given, and its
//! 64-hex-character identity); `#` starts a comment. The first head a server sends is trusted
//! and its key recorded; from then on a head signed by any other key is refused with the file
//! and line to edit. `--server-key` still overrides (and is recorded). Writing the file is
//! best effort: a download never fails because its key could not be remembered.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use mcast_keys::PublicIdentity;

use crate::error::{Failure, RecvError};

/// The store's default path: `$MCAST_KNOWN_SERVERS`, else
/// `$XDG_DATA_HOME/mcast/known_servers`, else `$HOME/.local/share/mcast/known_servers`
/// (`None` when none of them is set: nothing is remembered).
pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MCAST_KNOWN_SERVERS") {
        return (p != "none").then(|| PathBuf::from(p));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("mcast").join("known_servers"))
}

#[derive(Debug)]
pub struct KnownServers {
    path: PathBuf,
    keys: BTreeMap<String, (PublicIdentity, usize)>,
}

fn bad(path: &Path, line: usize, why: &str) -> RecvError {
    RecvError::new(
        Failure::Usage,
        format!(
            "{}: line {line}: {why} (expected `ADDRESS KEY`, KEY being 64 hex characters)",
            path.display()
        ),
    )
}

impl KnownServers {
    /// Read the store at `path` (a missing file is an empty store).
    pub fn load(path: &Path) -> Result<KnownServers, RecvError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(RecvError::io("cannot read the known servers", path, e)),
        };
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(path, i + 1, "not two fields"));
            };
            let bytes: [u8; 32] = hex::decode(key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(path, i + 1, "the key is not 64 hex characters"))?;
            keys.insert(addr.to_string(), (PublicIdentity(bytes), i + 1));
        }
        Ok(KnownServers {
            path: path.to_path_buf(),
            keys,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key known for `server`, and the line it is on.
    pub fn get(&self, server: &str) -> Option<(PublicIdentity, usize)> {
        self.keys.get(server).copied()
    }

    /// Record `key` for `server` (crash-safe: the file is replaced whole, 0600).
    pub fn remember(&mut self, server: &str, key: PublicIdentity) -> Result<(), RecvError> {
        let line = self.keys.len() + 1;
        self.keys.insert(server.to_string(), (key, line));
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| RecvError::io("cannot create the known servers' directory", dir, e))?;
        }
        let io = |e| RecvError::io("cannot write the known servers", &self.path, e);
        let mut f = mcast_io::fsutil::AtomicFile::create_private(&self.path).map_err(io)?;
        let mut text = String::from(
            "# Server keys mcast-recv trusts, by server address (see `mcast-recv get --help`).\n\
             # A server whose key changed on purpose: delete its line.\n",
        );
        for (addr, (k, _)) in &self.keys {
            text.push_str(&format!("{addr} {}\n", hex::encode(k.0)));
        }
        f.file().write_all(text.as_bytes()).map_err(io)?;
        f.commit().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_remembered_across_loads_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/known_servers");
        let mut k = KnownServers::load(&p).unwrap();
        assert!(k.get("10.0.0.1:7600").is_none());
        k.remember("10.0.0.1:7600", PublicIdentity([7; 32]))
            .unwrap();
        k.remember("10.0.0.2:7600", PublicIdentity([8; 32]))
            .unwrap();
        let again = KnownServers::load(&p).unwrap();
        assert_eq!(
            again.get("10.0.0.1:7600").unwrap().0,
            PublicIdentity([7; 32])
        );
        assert_eq!(
            again.get("10.0.0.2:7600").unwrap().0,
            PublicIdentity([8; 32])
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&p, "10.0.0.1:7600 abcd\n").unwrap();
        let e = KnownServers::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("64 hex"), "{e}");
    }
}
