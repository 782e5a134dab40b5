//! The server's key store: a directory (mode 0700) of files (mode 0600), each written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves either the
//! old key or the new one, never half of one.
//!
//! ```text
//! <dir>/identity.ed25519        32-byte Ed25519 seed (server identity)
//! <dir>/titles/<title>/<archive-id>.key   32-byte master key of one archive of a title
//! <dir>/tickets.key             32-byte key wrapping the server's key parts in the ticket DB
//! ```
//!
//! Keys are filed per archive id so that re-packing a title (`--force`) never leaves a window
//! in which the archive on disk and its key disagree: the new key is written before the new
//! archive appears, and the old key is pruned only after.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::{Identity, KeyError, MasterKey};

const IDENTITY_FILE: &str = "identity.ed25519";
const TITLES_DIR: &str = "titles";
const TICKETS_KEY_FILE: &str = "tickets.key";

/// A directory of secrets. Cheap to construct; every call touches the disk.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
}

pub use crate::title::validate_title;

impl KeyStore {
    /// Open (creating if missing) the key store at `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<KeyStore, KeyError> {
        let dir = dir.into();
        let titles = dir.join(TITLES_DIR);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&titles)
            .map_err(|e| io_err(&titles, e))?;
        // Refuse a store that we cannot read: better now than halfway through a pack.
        fs::read_dir(&titles).map_err(|e| io_err(&titles, e))?;
        Ok(KeyStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Create a new server identity. Refuses to overwrite one unless `force`.
    pub fn create_identity(&self, force: bool) -> Result<Identity, KeyError> {
        let path = self.dir.join(IDENTITY_FILE);
        if path.exists() && !force {
            return Err(KeyError::IdentityExists {
                dir: self.dir.clone(),
            });
        }
        let id = Identity::generate();
        write_secret(&path, &id.secret_bytes()[..])?;
        Ok(id)
    }

    pub fn has_identity(&self) -> bool {
        self.dir.join(IDENTITY_FILE).exists()
    }

    pub fn identity(&self) -> Result<Identity, KeyError> {
        let path = self.dir.join(IDENTITY_FILE);
        if !path.exists() {
            return Err(KeyError::NoIdentity {
                dir: self.dir.clone(),
            });
        }
        let bytes = read_secret32(&path)?;
        Ok(Identity::from_secret(&bytes))
    }

    /// The key that wraps part B of every ticket in the ticket database, created (0600) on
    /// first use. Creation is race-free: of two processes creating it at once, one wins and
    /// both use its key.
    pub fn tickets_key(&self) -> Result<crate::seal::DbKey, KeyError> {
        let path = self.dir.join(TICKETS_KEY_FILE);
        if !path.exists() {
            let mut k = Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k[..]);
            match create_secret(&path, &k[..]) {
                Ok(()) => tracing::info!(path = %path.display(), "created the ticket database key"),
                Err(KeyError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(crate::seal::DbKey::from_bytes(read_secret32(&path)?))
    }

    fn title_dir(&self, title: &str) -> Result<PathBuf, KeyError> {
        validate_title(title)?;
        Ok(self.dir.join(TITLES_DIR).join(title))
    }

    fn key_path(&self, title: &str, archive_id: &[u8; 16]) -> Result<PathBuf, KeyError> {
        Ok(self
            .title_dir(title)?
            .join(format!("{}.key", hex::encode(archive_id))))
    }

    /// Store the master key of one archive of `title`. Refuses to replace an existing key.
    pub fn put_title_key(
        &self,
        title: &str,
        archive_id: &[u8; 16],
        key: &MasterKey,
    ) -> Result<(), KeyError> {
        let dir = self.title_dir(title)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| io_err(&dir, e))?;
        let path = self.key_path(title, archive_id)?;
        if path.exists() {
            return Err(KeyError::TitleKeyExists {
                title: title.to_string(),
                dir: self.dir.clone(),
            });
        }
        write_secret(&path, key.as_bytes())
    }

    /// The master key of archive `archive_id` of `title`.
    pub fn title_key(&self, title: &str, archive_id: &[u8; 16]) -> Result<MasterKey, KeyError> {
        let path = self.key_path(title, archive_id)?;
        if !path.exists() {
            return Err(KeyError::NoTitleKey {
                title: title.to_string(),
                dir: self.dir.clone(),
            });
        }
        Ok(MasterKey::from_bytes(*read_secret32(&path)?))
    }

    /// Replace the key of an archive (operator repair, and tests of wrong-key refusal).
    pub fn replace_title_key(
        &self,
        title: &str,
        archive_id: &[u8; 16],
        key: &MasterKey,
    ) -> Result<(), KeyError> {
        let path = self.key_path(title, archive_id)?;
        write_secret(&path, key.as_bytes())
    }

    /// Delete the key of one archive (a pack that failed before its archive appeared).
    pub fn remove_title_key(&self, title: &str, archive_id: &[u8; 16]) -> Result<(), KeyError> {
        let path = self.key_path(title, archive_id)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Delete every key of `title` except the one for `keep` (or all keys when `None`).
    pub fn prune_title_keys(&self, title: &str, keep: Option<&[u8; 16]>) -> Result<(), KeyError> {
        let dir = self.title_dir(title)?;
        let keep_name = keep.map(|id| format!("{}.key", hex::encode(id)));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".key") && Some(&name) != keep_name.as_ref() {
                fs::remove_file(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
            }
        }
        Ok(())
    }
}

fn io_err(path: &Path, source: std::io::Error) -> KeyError {
    KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_secret32(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = f.metadata().map_err(|e| io_err(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "key file is readable by group/others; run chmod 600");
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(33));
    f.read_to_end(&mut buf).map_err(|e| io_err(path, e))?;
    if buf.len() != 32 {
        return Err(KeyError::Corrupt {
            path: path.to_path_buf(),
            why: format!("expected 32 bytes, found {}", buf.len()),
        });
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&buf);
    Ok(out)
}

/// Write a secret file atomically with mode 0600.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let dir = path.parent().expect("key paths have a parent");
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        // A temp of this name left by a crashed process with our pid, or planted: removed
        // (unlink does not follow a link), then the temp is a new 0600 file, never a link.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.map_err(|e| io_err(path, e))
}

/// Create a secret file that must not exist yet (mode 0600): written in full to a temp
/// file, then hard-linked into place, which fails with `AlreadyExists` if another process got
/// there first, so a reader never sees a partial file and no one overwrites the winner.
fn create_secret(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let dir = path.parent().expect("key paths have a parent");
    let tmp = dir.join(format!(
        ".{}.new{}.{}",
        path.file_name().unwrap().to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    let _ = fs::remove_file(&tmp);
    res.map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trip_and_permissions() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(d.path().join("ks")).unwrap();
        assert!(matches!(ks.identity(), Err(KeyError::NoIdentity { .. })));
        let id = ks.create_identity(false).unwrap();
        assert!(matches!(
            ks.create_identity(false),
            Err(KeyError::IdentityExists { .. })
        ));
        assert_eq!(ks.identity().unwrap().public(), id.public());

        let k = MasterKey::generate();
        let (a1, a2) = ([1u8; 16], [2u8; 16]);
        ks.put_title_key("film-1", &a1, &k).unwrap();
        assert!(matches!(
            ks.put_title_key("film-1", &a1, &k),
            Err(KeyError::TitleKeyExists { .. })
        ));
        assert_eq!(ks.title_key("film-1", &a1).unwrap(), k);
        let path = d
            .path()
            .join(format!("ks/titles/film-1/{}.key", hex::encode(a1)));
        let mode = fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            ks.title_key("film-2", &a1),
            Err(KeyError::NoTitleKey { .. })
        ));

        let k2 = MasterKey::generate();
        ks.put_title_key("film-1", &a2, &k2).unwrap();
        ks.prune_title_keys("film-1", Some(&a2)).unwrap();
        assert!(ks.title_key("film-1", &a1).is_err());
        assert_eq!(ks.title_key("film-1", &a2).unwrap(), k2);
    }

    #[test]
    fn tickets_key_is_created_once_and_shared() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(d.path().join("ks")).unwrap();
        let path = d.path().join("ks/tickets.key");
        assert!(!path.exists());
        // Eight racing first uses agree on one key.
        let wrapped: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let ks = ks.clone();
                    s.spawn(move || {
                        let k = ks.tickets_key().unwrap();
                        k.wrap(
                            &[1; 16],
                            &[2; 16],
                            &crate::ticket::KeyPart::from_bytes([3; 32]),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let k = ks.tickets_key().unwrap();
        for w in &wrapped {
            assert_eq!(
                k.unwrap(&[1; 16], &[2; 16], w).unwrap().as_bytes(),
                &[3; 32]
            );
        }
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(d.path().join("ks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    /// A symbolic link planted at the identity's temp path (the key store dir is shared, or
    /// a stale temp of a crashed writer with our pid): removed, never written through; the
    /// key lands in a new 0600 file.
    #[test]
    fn secret_temp_file_is_new_and_never_a_link() {
        let d = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(d.path().join("ks")).unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let tmp = ks
            .dir()
            .join(format!(".{IDENTITY_FILE}.tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let id = ks.create_identity(false).unwrap();
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "written through the link"
        );
        assert_eq!(ks.identity().unwrap().public(), id.public());
        let key = ks.dir().join(IDENTITY_FILE);
        assert!(fs::symlink_metadata(&key).unwrap().is_file());
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!tmp.exists() && fs::symlink_metadata(&tmp).is_err());
    }

    #[test]
    fn titles_are_safe_file_names() {
        for bad in ["", "../x", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_title(bad).is_err(), "{bad:?}");
        }
        for good in ["film-1", "A.B_c", "x"] {
            validate_title(good).unwrap();
        }
    }
}
