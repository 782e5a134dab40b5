//! The receiver's disk thread: writes received data and takes checkpoints, in order, so the
//! receive thread never waits for the disk (a stalled write or a slow `fdatasync` would
//! otherwise overflow the socket buffer and turn into losses and repairs).
//!
//! The receive thread copies verified payloads into runs ([`Disk::write`]); full runs go to
//! the disk thread, which writes each run in place (or, with `O_DIRECT`, through a
//! [`WriteStage`] that aligns it). Through the page cache (the default), written ranges are pushed to disk as they go
//! and dropped from the cache one window behind ([`Writeback`]): a multi-GiB download neither
//! piles up dirty pages until the kernel throttles the writer nor makes the kernel reclaim
//! other files' pages to make room (measured here: the plain page-cache path lost packets on
//! 4 GiB files; `O_DIRECT` cost 50 % more CPU on a virtual disk). A checkpoint request carries a snapshot of the have-bits and is queued
//! behind the runs written before it, so when the thread reaches it every unit in the
//! snapshot is in the file: it syncs the file, then writes the state record. Buffers come
//! back for reuse; at most [`MAX_RUNS`] are in flight, so a disk slower than the network for
//! long pushes back on the receive thread instead of growing memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use mcast_io::fastio::WriteStage;

use crate::error::{Failure, RecvError};
use crate::state::State;

/// Bytes per run handed to the disk thread.
pub const RUN_BYTES: usize = 1 << 20;
/// Runs in flight at most (memory bound: `MAX_RUNS × RUN_BYTES`).
pub const MAX_RUNS: usize = 8;
/// The disk thread's write stage (its aligned middle goes out with `O_DIRECT`).
const STAGE_BYTES: usize = 4 << 20;

enum Job {
    Write {
        offset: u64,
        buf: Vec<u8>,
    },
    /// The have-bitmap to save, and the units it counts (for [`Disk::saved_units`]).
    Checkpoint(Vec<u64>, u64),
    Barrier(SyncSender<()>),
}

pub struct Disk {
    tx: Option<SyncSender<Job>>,
    free: Receiver<Vec<u8>>,
    allocated: usize,
    cur: Vec<u8>,
    cur_start: u64,
    checkpoint_busy: Arc<AtomicBool>,
    /// Units the last completed checkpoint made durable.
    saved: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<RecvError>>>,
    handle: Option<std::thread::JoinHandle<()>>,
    part_path: PathBuf,
}

impl Disk {
    pub fn start(
        part: &File,
        part_path: &Path,
        state_path: &Path,
        mut state: State,
        direct_io: bool,
    ) -> Result<Disk, RecvError> {
        let file = part
            .try_clone()
            .map_err(|e| RecvError::io("cannot open", part_path, e))?;
        let direct = direct_io
            .then(|| WriteStage::open_direct(part_path, part))
            .flatten();
        let (tx, rx) = sync_channel::<Job>(MAX_RUNS + 2);
        let (free_tx, free) = sync_channel::<Vec<u8>>(MAX_RUNS + 1);
        let failed = Arc::new(Mutex::new(None));
        let checkpoint_busy = Arc::new(AtomicBool::new(false));
        let saved = Arc::new(AtomicU64::new(0));
        let (f2, busy2, saved2) = (failed.clone(), checkpoint_busy.clone(), saved.clone());
        let (pp, sp) = (part_path.to_path_buf(), state_path.to_path_buf());
        let handle = std::thread::Builder::new()
            .name("disk".into())
            .spawn(move || {
                let mut out = Writer {
                    file,
                    // Runs arrive as large contiguous writes already; only O_DIRECT needs the
                    // stage (alignment of its middle, edges through the page cache).
                    stage: direct.map(|d| WriteStage::new(STAGE_BYTES, Some(d))),
                    wb: Writeback::default(),
                };
                tracing::debug!(direct = out.stage.is_some(), "part file writes");
                // After a failure, jobs are drained (buffers returned, barriers answered)
                // but nothing more is written.
                let mut ok = true;
                let fail = |e: RecvError, ok: &mut bool| {
                    *ok = false;
                    f2.lock().unwrap().get_or_insert(e);
                };
                for job in rx {
                    match job {
                        Job::Write { offset, buf } => {
                            if ok {
                                if let Err(e) = out.write(offset, &buf) {
                                    fail(RecvError::io("cannot write", &pp, e), &mut ok);
                                }
                            }
                            let _ = free_tx.try_send(buf);
                        }
                        Job::Checkpoint(have, units) => {
                            if ok {
                                let r = out
                                    .flush()
                                    .map_err(|e| RecvError::io("cannot write", &pp, e))
                                    .and_then(|()| {
                                        out.file
                                            .sync_data()
                                            .map_err(|e| RecvError::io("cannot sync", &pp, e))
                                    })
                                    .and_then(|()| {
                                        state.have = have;
                                        state.save(&sp).map_err(|e| {
                                            RecvError::io("cannot write state file", &sp, e)
                                        })
                                    });
                                match r {
                                    Ok(()) => saved2.store(units, Ordering::Release),
                                    Err(e) => fail(e, &mut ok),
                                }
                            }
                            busy2.store(false, Ordering::Release);
                        }
                        Job::Barrier(done) => {
                            if ok {
                                if let Err(e) = out.flush() {
                                    fail(RecvError::io("cannot write", &pp, e), &mut ok);
                                }
                            }
                            let _ = done.send(());
                        }
                    }
                }
                // The receive thread is done: what is still staged goes out now.
                if ok {
                    if let Err(e) = out.flush() {
                        fail(RecvError::io("cannot write", &pp, e), &mut ok);
                    }
                }
            })
            .map_err(|e| RecvError::new(Failure::Other, format!("disk thread: {e}")))?;
        Ok(Disk {
            tx: Some(tx),
            free,
            allocated: 1,
            cur: Vec::with_capacity(RUN_BYTES),
            cur_start: 0,
            checkpoint_busy,
            saved,
            failed,
            handle: Some(handle),
            part_path: part_path.to_path_buf(),
        })
    }

    fn check(&self) -> Result<(), RecvError> {
        match self.failed.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn send(&self, job: Job) -> Result<(), RecvError> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| {
                self.check().err().unwrap_or_else(|| {
                    RecvError::new(
                        Failure::Other,
                        format!("disk thread for {} stopped", self.part_path.display()),
                    )
                })
            })
    }

    /// Hand the current run to the disk thread and take an empty buffer (waiting for one if
    /// [`MAX_RUNS`] are in flight).
    fn submit(&mut self) -> Result<(), RecvError> {
        if self.cur.is_empty() {
            return Ok(());
        }
        let next = match self.free.try_recv() {
            Ok(b) => b,
            Err(_) if self.allocated < MAX_RUNS => {
                self.allocated += 1;
                Vec::with_capacity(RUN_BYTES)
            }
            Err(_) => self.free.recv().map_err(|_| {
                self.check().err().unwrap_or_else(|| {
                    RecvError::new(Failure::Other, "disk thread stopped".to_string())
                })
            })?,
        };
        let buf = std::mem::replace(&mut self.cur, next);
        self.cur.clear();
        self.send(Job::Write {
            offset: self.cur_start,
            buf,
        })
    }

    /// Queue `bytes` for `offset` of the part file.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), RecvError> {
        if !self.cur.is_empty() && offset != self.cur_start + self.cur.len() as u64 {
            self.submit()?;
        }
        if self.cur.is_empty() {
            self.cur_start = offset;
        }
        self.cur.extend_from_slice(bytes);
        if self.cur.len() >= RUN_BYTES {
            self.submit()?;
        }
        Ok(())
    }

    /// Queue a checkpoint of `have` (counting `units` held) behind the writes queued so
    /// far; false (nothing queued) while the previous one is still pending.
    pub fn request_checkpoint(&mut self, have: &[u64], units: u64) -> Result<bool, RecvError> {
        self.check()?;
        if self.checkpoint_busy.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        self.submit()?;
        self.send(Job::Checkpoint(have.to_vec(), units))?;
        Ok(true)
    }

    /// Units the last completed checkpoint made durable (a resume starts with at least
    /// these): reported in `--json` progress lines as `saved`.
    pub fn saved_units(&self) -> u64 {
        self.saved.load(Ordering::Acquire)
    }

    /// Wait until everything queued so far is in the file (for reading it back).
    pub fn barrier(&mut self) -> Result<(), RecvError> {
        self.submit()?;
        let (tx, rx) = sync_channel(1);
        self.send(Job::Barrier(tx))?;
        let _ = rx.recv();
        self.check()
    }

    /// Write out everything and stop the thread.
    pub fn finish(&mut self) -> Result<(), RecvError> {
        self.submit()?;
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.check()
    }
}

/// The disk thread's side: runs written in place, or through the `O_DIRECT` stage.
struct Writer {
    file: File,
    stage: Option<WriteStage>,
    wb: Writeback,
}

impl Writer {
    fn write(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        match &mut self.stage {
            Some(stage) => stage.write(&self.file, offset, buf),
            None => {
                std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)?;
                self.wb.written(&self.file, offset, buf.len() as u64);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.stage {
            Some(stage) => stage.flush(&self.file),
            None => Ok(()),
        }
    }
}

/// Page-cache hygiene for a long sequential write: start writeback of each window as it
/// fills, and when the next one is full wait for the previous window and drop it from the
/// cache (`sync_file_range` + `POSIX_FADV_DONTNEED`, as `dd oflag=nocache` does).
#[derive(Default)]
struct Writeback {
    cur: Option<(u64, u64)>,
    cur_bytes: u64,
    prev: Option<(u64, u64)>,
}

/// Bytes per window.
const WRITEBACK_WINDOW: u64 = 32 << 20;

impl Writeback {
    fn written(&mut self, file: &File, offset: u64, len: u64) {
        let (lo, hi) = self.cur.unwrap_or((offset, offset + len));
        self.cur = Some((lo.min(offset), hi.max(offset + len)));
        self.cur_bytes += len;
        if self.cur_bytes < WRITEBACK_WINDOW {
            return;
        }
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        // Staged bytes of this window may not be written yet; what is gets started.
        if let Some((lo, hi)) = self.cur.take() {
            // SAFETY: plain syscalls on an open fd; failures only lose the optimisation.
            unsafe {
                libc::sync_file_range(fd, lo as i64, (hi - lo) as i64, libc::SYNC_FILE_RANGE_WRITE);
            }
            if let Some((plo, phi)) = self.prev.replace((lo, hi)) {
                unsafe {
                    libc::sync_file_range(
                        fd,
                        plo as i64,
                        (phi - plo) as i64,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                    libc::posix_fadvise(
                        fd,
                        plo as i64,
                        (phi - plo) as i64,
                        libc::POSIX_FADV_DONTNEED,
                    );
                }
            }
        }
        self.cur_bytes = 0;
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
