//! Crash-safe file writing: write to a temp file beside the target, fsync, rename, fsync the
//! directory. Until the rename the target is untouched; a crash leaves only a `.tmp` file,
//! which [`AtomicFile`] removes on drop when the write was not committed, and the next
//! [`AtomicFile::create`] of the same target removes when its writer was killed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// A file being written that appears at `target` only on [`AtomicFile::commit`].
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
}

impl AtomicFile {
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
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
}
