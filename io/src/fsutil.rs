//! Crash-safe file writing: write to a temp file beside the target, fsync, rename, fsync the
//! directory. Until the rename the target is untouched; a crash leaves only a `.tmp` file,
//! which [`AtomicFile`] removes on drop when the write was not committed, and the next
//! [`AtomicFile::create`] of the same target removes when its writer was killed.
//!
//! Temp files are always new files (`O_CREAT | O_EXCL | O_NOFOLLOW`): a file or symbolic link
//! planted at a temp path is never written through. [`AtomicFile::create_private`] makes
//! them 0600 from the first byte, for plaintext and secrets. [`open_part`] opens a download's
//! part file the same way.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A file being written that appears at `target` only on [`AtomicFile::commit`].
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    /// A temp file for `target` with the default mode (0666 less the umask).
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
        AtomicFile::create_mode(target, 0o666)
    }

    /// As [`AtomicFile::create`], but the temp file (and so the target) is 0600 from its
    /// creation: for plaintext and secrets.
    pub fn create_private(target: &Path) -> io::Result<AtomicFile> {
        AtomicFile::create_mode(target, 0o600)
    }

    fn create_mode(target: &Path, mode: u32) -> io::Result<AtomicFile> {
        let dir = parent_dir(target);
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "target has no file name")
        })?;
        remove_stale_tmps(dir, &name.to_string_lossy());
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        // Ours by name: left by an earlier process that had this pid, or planted. Unlink does
        // not follow a symbolic link; then the temp must be a new file.
        remove_if_present(&tmp)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            target: target.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("file present until commit")
    }

    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// fsync, rename over the target, fsync the directory.
    pub fn commit(mut self) -> io::Result<()> {
        let f = self.file.take().expect("file present until commit");
        let res = f.sync_all().and_then(|()| {
            drop(f);
            fs::rename(&self.tmp, &self.target)
        });
        if res.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        res?;
        sync_dir(parent_dir(&self.target))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Remove `.<name>.<pid>.tmp` files in `dir` whose writer is gone (killed before it
/// committed: `kill -9`, power loss). Without this every crash leaves a hidden copy behind for
/// good (a state file, or part of a played title's plaintext). A temp file of a live process
/// is left alone: that writer may still commit.
fn remove_stale_tmps(dir: &Path, name: &str) {
    let prefix = format!(".{name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|r| r.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Remove `path` (a file or a symbolic link, never what a link points to); absent is fine.
fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The error for a symbolic link found where a file of ours must be.
fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link: refusing to write through it (remove it if it is yours)",
            path.display()
        ),
    )
}

/// Open a download's part file for reading and writing. `resume`: the file already there
/// (its contents are kept); otherwise a new empty file, whatever regular file was there (a
/// stale part) removed first. Never through a symbolic link: one at `path` is refused, as is
/// anything but a regular file.
pub fn open_part(path: &Path, resume: bool) -> io::Result<File> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(symlink_refused(path));
    }
    let mut o = OpenOptions::new();
    o.read(true).write(true).custom_flags(libc::O_NOFOLLOW);
    if !resume {
        remove_if_present(path)?;
        o.create_new(true);
    }
    let file = o.open(path).map_err(|e| {
        // A link planted between the check and the open.
        if e.raw_os_error() == Some(libc::ELOOP) {
            symlink_refused(path)
        } else {
            e
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A killed writer's temp file goes at the next create of the same target; a live
    /// writer's, and other targets' (even with a name that extends this one), stay.
    #[test]
    fn create_removes_temp_files_of_dead_writers_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        // Above any pid_max (2^22): no such process.
        for n in [
            ".out.4999999.tmp",
            ".out.1.tmp",
            ".out.x.4999999.tmp",
            ".other.4999999.tmp",
        ] {
            fs::write(p(n), b"partial").unwrap();
        }
        let mut f = AtomicFile::create(&p("out")).unwrap();
        std::io::Write::write_all(f.file(), b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(p("out")).unwrap(), b"whole");
        assert!(
            !p(".out.4999999.tmp").exists(),
            "dead writer's temp removed"
        );
        for kept in [".out.1.tmp", ".out.x.4999999.tmp", ".other.4999999.tmp"] {
            assert!(p(kept).exists(), "{kept} must stay");
        }
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A symbolic link planted at this process's temp path (or a stale temp of a process
    /// that had our pid) is removed, not written through: the temp is a new file.
    #[test]
    fn temp_file_is_new_and_never_written_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let victim = p("victim");
        fs::write(&victim, b"precious").unwrap();
        let tmp = p(&format!(".out.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut f = AtomicFile::create(&p("out")).unwrap();
        std::io::Write::write_all(f.file(), b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "written through the link"
        );
        assert!(fs::symlink_metadata(p("out")).unwrap().is_file());
        assert_eq!(fs::read(p("out")).unwrap(), b"whole");

        // A stale regular temp of the same name: replaced, not reused.
        fs::write(&tmp, b"stale and longer").unwrap();
        let mut f = AtomicFile::create(&p("out")).unwrap();
        std::io::Write::write_all(f.file(), b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(p("out")).unwrap(), b"new");
    }

    /// `create_private`: the temp file is 0600 from its creation (before any byte is
    /// written), and so is the target.
    #[test]
    fn private_temp_file_is_0600_from_creation() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plain");
        let mut f = AtomicFile::create_private(&out).unwrap();
        assert_eq!(mode(f.tmp_path()), 0o600);
        std::io::Write::write_all(f.file(), b"secret").unwrap();
        f.commit().unwrap();
        assert_eq!(mode(&out), 0o600);
    }

    /// The part file: a symbolic link at its path is refused, fresh or resumed, and what it
    /// points to is untouched; a stale part is replaced by a new empty file; a resumed part
    /// keeps its bytes.
    #[test]
    fn part_file_refuses_links_and_replaces_stale_parts() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("film.mca.part");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &part).unwrap();
        for resume in [false, true] {
            let e = open_part(&part, resume).unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&part)
            .unwrap()
            .file_type()
            .is_symlink());

        fs::remove_file(&part).unwrap();
        fs::write(&part, b"stale part").unwrap();
        let f = open_part(&part, false).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0, "a stale part is not reused");
        std::os::unix::fs::FileExt::write_all_at(&f, b"partial", 0).unwrap();
        drop(f);
        let f = open_part(&part, true).unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            7,
            "a resumed part keeps its bytes"
        );

        let sub = dir.path().join("sub.part");
        fs::create_dir(&sub).unwrap();
        assert!(
            open_part(&sub, true).is_err(),
            "a directory is not a part file"
        );
    }
}
