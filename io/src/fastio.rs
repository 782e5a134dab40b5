//! Batched UDP and file I/O for the data path (Linux only).
//!
//! * [`PacketBatch`]: packets laid out back to back in one reusable buffer; payloads that come
//!   from an archive are read with one `preadv` per run of contiguous file bytes.
//! * [`BatchSender`]: sends a batch to one destination with one `sendmmsg`, each message a
//!   UDP GSO super-datagram (`UDP_SEGMENT`) of up to 64 equal-size packets. If the kernel
//!   refuses GSO the sender logs it once and sends one datagram per message from then on.
//! * [`RecvBatch`]: `recvmmsg` into reusable buffers, splitting `UDP_GRO` super-datagrams, and
//!   reading the socket's drop counter (`SO_RXQ_OVFL`, see [`enable_rxq_ovfl`]).
//! * [`WriteStage`]: received data written in large contiguous runs.
//!
//! Nothing here allocates once the buffers have grown to their working size.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use socket2::SockAddr;

/// `UDP_SEGMENT` / `UDP_GRO` (linux/udp.h); not exported by libc for every target.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Segments per GSO send (`UDP_MAX_SEGMENTS` is 64 on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes per GSO send: under the 65507-byte UDP/IPv4 payload limit.
const MAX_GSO_BYTES: usize = 65_000;
/// Aligned control-message space per message: room for the two a receive socket may carry,
/// `UDP_GRO` and `SO_RXQ_OVFL` (CMSG_SPACE of an int is 24 bytes on 64-bit Linux: 48 in all).
type CmsgSpace = [u64; 8];

/// Packets of one send batch, back to back in one buffer.
#[derive(Default)]
pub struct PacketBatch {
    buf: Vec<u8>,
    /// (start, len) of each packet in `buf`.
    pkts: Vec<(usize, usize)>,
    /// Pending archive reads: (file offset, start in `buf`, len).
    reads: Vec<(u64, usize, usize)>,
}

impl PacketBatch {
    pub fn with_capacity(packets: usize, max_packet: usize) -> PacketBatch {
        PacketBatch {
            buf: Vec::with_capacity(packets * max_packet),
            pkts: Vec::with_capacity(packets),
            reads: Vec::with_capacity(packets),
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.pkts.clear();
        self.reads.clear();
    }

    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// Append a packet made of `head` then `tail`.
    pub fn push(&mut self, head: &[u8], tail: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(head);
        self.buf.extend_from_slice(tail);
        self.pkts.push((start, head.len() + tail.len()));
    }

    /// Append a packet made of `head` then `len` bytes of the file at `offset`, read by the
    /// next [`PacketBatch::fill`].
    pub fn push_file(&mut self, head: &[u8], offset: u64, len: usize) {
        let start = self.buf.len();
        self.buf.extend_from_slice(head);
        self.reads.push((offset, self.buf.len(), len));
        self.buf.resize(self.buf.len() + len, 0);
        self.pkts.push((start, head.len() + len));
    }

    /// Do the pending reads from `file`: one `preadv` per run of contiguous file bytes.
    pub fn fill(&mut self, file: &File) -> io::Result<()> {
        let mut i = 0;
        let mut iov: [libc::iovec; 64] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        while i < self.reads.len() {
            let (off0, _, _) = self.reads[i];
            let mut j = i;
            let mut end = off0;
            let mut total = 0usize;
            while j < self.reads.len() && j - i < iov.len() && self.reads[j].0 == end {
                let (_, at, len) = self.reads[j];
                iov[j - i] = libc::iovec {
                    iov_base: self.buf[at..at + len].as_mut_ptr().cast(),
                    iov_len: len,
                };
                end += len as u64;
                total += len;
                j += 1;
            }
            // SAFETY: every iovec points into `self.buf`, which is not touched until the call
            // returns; the file descriptor is valid for the call.
            let n = unsafe {
                libc::preadv(
                    file.as_raw_fd(),
                    iov.as_ptr(),
                    (j - i) as libc::c_int,
                    off0 as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if (n as usize) < total {
                // Short read: finish each packet of the run on its own (reports EOF properly).
                let mut done = n as usize;
                for k in i..j {
                    let (off, at, len) = self.reads[k];
                    let skip = done.min(len);
                    done -= skip;
                    if skip < len {
                        file.read_exact_at(&mut self.buf[at + skip..at + len], off + skip as u64)?;
                    }
                }
            }
            i = j;
        }
        self.reads.clear();
        Ok(())
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        let (s, l) = self.pkts[i];
        &self.buf[s..s + l]
    }
}

/// Outcome of one [`BatchSender::send`].
#[derive(Debug, Default)]
pub struct SendOutcome {
    /// Datagrams handed to the kernel.
    pub sent: usize,
    /// Datagrams dropped on a send error.
    pub failed: usize,
    pub last_error: Option<io::Error>,
    /// `sendmmsg` calls made.
    pub syscalls: usize,
}

/// `sendmmsg` + UDP GSO sender for one socket. Reuses its message arrays.
pub struct BatchSender {
    gso: bool,
    /// (first packet, packet count, segment size) of each message.
    runs: Vec<(usize, usize, usize)>,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgSpace>,
}

impl BatchSender {
    /// A sender for `sock`; GSO is used when the kernel knows `UDP_SEGMENT` and `try_gso`.
    pub fn new(sock: &impl AsRawFd, try_gso: bool) -> BatchSender {
        let gso = try_gso && gso_supported(sock.as_raw_fd());
        if try_gso && !gso {
            tracing::info!("UDP GSO (UDP_SEGMENT) not available: one datagram per packet");
        }
        BatchSender {
            gso,
            runs: Vec::new(),
            msgs: Vec::new(),
            iovs: Vec::new(),
            cmsgs: Vec::new(),
        }
    }

    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Send every packet of `batch` to `dest` (blocking socket).
    pub fn send(&mut self, sock: RawFd, batch: &PacketBatch, dest: &SockAddr) -> SendOutcome {
        let mut out = SendOutcome::default();
        let mut from = 0;
        while from < batch.len() {
            from = self.send_from(sock, batch, from, dest, &mut out);
        }
        out
    }

    /// Plan messages for packets `from..`, send them; returns the first packet not yet dealt
    /// with (less than `batch.len()` only when GSO was just switched off).
    fn send_from(
        &mut self,
        sock: RawFd,
        batch: &PacketBatch,
        from: usize,
        dest: &SockAddr,
        out: &mut SendOutcome,
    ) -> usize {
        self.runs.clear();
        let mut i = from;
        while i < batch.len() {
            let seg = batch.pkts[i].1;
            let mut n = 1;
            let mut bytes = seg;
            if self.gso {
                while i + n < batch.len() && n < MAX_GSO_SEGMENTS {
                    let l = batch.pkts[i + n].1;
                    if l > seg || bytes + l > MAX_GSO_BYTES {
                        break;
                    }
                    n += 1;
                    bytes += l;
                    if l < seg {
                        break; // a shorter segment can only be the last one
                    }
                }
            }
            self.runs.push((i, n, seg));
            i += n;
        }
        let m = self.runs.len();
        self.iovs.clear();
        self.cmsgs.clear();
        self.msgs.clear();
        for &(first, n, _) in &self.runs {
            let start = batch.pkts[first].0;
            let (ls, ll) = batch.pkts[first + n - 1];
            self.iovs.push(libc::iovec {
                iov_base: batch.buf[start..].as_ptr() as *mut libc::c_void,
                iov_len: ls + ll - start,
            });
            self.cmsgs.push([0u64; 8]);
        }
        for k in 0..m {
            let (_, n, seg) = self.runs[k];
            // SAFETY: an all-zero mmsghdr is a valid "no name, no data" message.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = dest.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = dest.len();
            h.msg_hdr.msg_iov = &mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            if n > 1 {
                let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) };
                h.msg_hdr.msg_control = self.cmsgs[k].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = space as _;
                // SAFETY: the control buffer is 64 bytes, 8-aligned, larger than `space`.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                }
            }
            self.msgs.push(h);
        }
        let mut k = 0;
        while k < m {
            // SAFETY: msgs[k..m] are initialised and point into `self.iovs`, `self.cmsgs`,
            // `batch.buf` and `dest`, all alive and unmoved for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(
                    sock,
                    self.msgs.as_mut_ptr().add(k),
                    (m - k) as libc::c_uint,
                    0,
                )
            };
            out.syscalls += 1;
            if r >= 0 {
                for &(_, n, _) in &self.runs[k..k + r as usize] {
                    out.sent += n;
                }
                k += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (first, n, _) = self.runs[k];
            let gso_refused = matches!(
                e.raw_os_error(),
                Some(libc::EIO)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOPROTOOPT)
                    | Some(libc::EOPNOTSUPP)
            );
            if n > 1 && self.gso && gso_refused {
                tracing::warn!(error = %e, "kernel refused UDP GSO: sending one datagram per packet from now on");
                self.gso = false;
                return first;
            }
            out.failed += n;
            out.last_error = Some(e);
            k += 1;
        }
        batch.len()
    }
}

fn gso_supported(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

/// Ask for UDP GRO on a receive socket; true if the kernel accepted it.
pub fn enable_gro(sock: &impl AsRawFd) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Ask the kernel to carry the socket's drop counter (`SO_RXQ_OVFL`) on received datagrams;
/// true if it accepted. The counter is how a receiver learns it is short of CPU: datagrams
/// that arrived while its receive buffer was full never reach it, so they look like network
/// loss unless the socket says it dropped them itself.
pub fn enable_rxq_ovfl(sock: &impl AsRawFd) -> bool {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// One socket's `SO_RXQ_OVFL` counter, turned into drops since the last look.
///
/// The kernel's counter is cumulative since the socket was created, a `u32` that wraps, and
/// rides only on datagrams queued after a drop (none at all while nothing was dropped). Keep
/// one per socket, fresh for a new socket (a reused file descriptor restarts from zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct OverflowCounter {
    last: u32,
}

impl OverflowCounter {
    /// Drops since the previous call, given the counter a batch carried
    /// ([`RecvBatch::overflow_count`]; `None`: no news, no drops).
    pub fn delta(&mut self, count: Option<u32>) -> u64 {
        let Some(c) = count else {
            return 0;
        };
        let d = c.wrapping_sub(self.last);
        self.last = c;
        d as u64
    }
}

/// `recvmmsg` into `n` reusable slots of `slot` bytes, splitting GRO super-datagrams.
pub struct RecvBatch {
    bufs: Vec<u8>,
    slot: usize,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgSpace>,
    /// Source address of each message.
    names: Vec<libc::sockaddr_storage>,
    /// (len, segment size or 0, source) of each message received by the last call.
    got: Vec<(usize, usize, Option<SocketAddr>)>,
    /// The socket's cumulative drop counter as carried by the last call's newest datagram.
    ovfl: Option<u32>,
}

impl RecvBatch {
    pub fn new(n: usize, slot: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![0u8; n * slot],
            slot,
            msgs: Vec::with_capacity(n),
            iovs: Vec::with_capacity(n),
            cmsgs: vec![[0u64; 8]; n],
            // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
            names: vec![unsafe { std::mem::zeroed() }; n],
            got: Vec::with_capacity(n),
            ovfl: None,
        }
    }

    /// Slots (messages one call can return).
    pub fn capacity(&self) -> usize {
        self.cmsgs.len()
    }

    /// Receive what is queued on `sock` without blocking; returns the number of messages
    /// (0 when nothing is queued).
    pub fn recv(&mut self, sock: RawFd) -> io::Result<usize> {
        let n = self.capacity();
        self.iovs.clear();
        self.msgs.clear();
        self.got.clear();
        self.ovfl = None;
        for k in 0..n {
            self.iovs.push(libc::iovec {
                iov_base: self.bufs[k * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            });
        }
        for k in 0..n {
            // SAFETY: an all-zero mmsghdr is valid; pointers are filled in below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = &mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[k].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = std::mem::size_of::<CmsgSpace>() as _;
            h.msg_hdr.msg_name = (&mut self.names[k] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            self.msgs.push(h);
        }
        let r = loop {
            // SAFETY: every message points into buffers owned by `self`, alive and unmoved
            // for the duration of the call.
            let r = unsafe {
                libc::recvmmsg(
                    sock,
                    self.msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for (k, h) in self.msgs[..r].iter().enumerate() {
            let from = sockaddr_of(&self.names[k], h.msg_hdr.msg_namelen);
            let mut seg = 0usize;
            // SAFETY: the kernel filled msg_control/msg_controllen; CMSG_* walk within it.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                        seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>())
                            as usize;
                    } else if (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SO_RXQ_OVFL
                    {
                        // Messages come in queue order and the counter only grows (mod 2^32):
                        // the last one carried is the newest.
                        self.ovfl =
                            Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            let len = (h.msg_len as usize).min(self.slot);
            self.got.push((len, seg, from));
        }
        Ok(r)
    }

    /// The socket's cumulative drop counter (`SO_RXQ_OVFL`) as of the last
    /// [`RecvBatch::recv`]'s newest datagram; `None` if none carried it (nothing dropped yet,
    /// or the option is off). Feed it to the socket's [`OverflowCounter`].
    pub fn overflow_count(&self) -> Option<u32> {
        self.ovfl
    }

    /// The datagrams of the last [`RecvBatch::recv`], GRO super-datagrams split.
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.datagrams_from().map(|(_, d)| d)
    }

    /// The datagrams of the last [`RecvBatch::recv`] with their source addresses
    /// (`0.0.0.0:0` if the kernel gave none).
    pub fn datagrams_from(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.got
            .iter()
            .enumerate()
            .flat_map(move |(k, &(len, seg, from))| {
                let b = &self.bufs[k * self.slot..k * self.slot + len];
                let step = if seg == 0 { len.max(1) } else { seg };
                let from = from.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
                b.chunks(step).map(move |c| (from, c))
            })
    }
}

/// The socket address the kernel wrote into `ss` (`None` for an unknown family).
fn sockaddr_of(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match ss.ss_family as libc::c_int {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is big enough for.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((
                a.sin6_addr.s6_addr,
                u16::from_be(a.sin6_port),
            )))
        }
        _ => None,
    }
}

/// File-offset and memory alignment of direct (`O_DIRECT`) writes.
const DIRECT_ALIGN: usize = 4096;

/// Collects writes that follow each other in the file and writes them in large runs, one
/// system call for hundreds of packets. With a direct (`O_DIRECT`) handle to the same file,
/// the block-aligned middle of each run bypasses the page cache: no copy into it, no dirty
/// pages for the kernel to throttle on, no reclaim of other files' pages to make room (on a
/// busy host, buffered writes of a multi-GiB file ran at a third of the disk's speed and
/// stalled the receive thread into losses). The unaligned edges go through the page cache;
/// an unaligned tail is kept staged when the run may continue. A write that does not continue
/// the run flushes it. Callers flush before anything that assumes the data is in the file.
pub struct WriteStage {
    /// `cap + DIRECT_ALIGN` bytes; staged data starts at `mem[base + lead]`, where `base` is
    /// aligned in memory and `lead = start % DIRECT_ALIGN`, so aligned file offsets sit at
    /// aligned addresses.
    mem: Vec<u8>,
    base: usize,
    lead: usize,
    len: usize,
    start: u64,
    cap: usize,
    direct: Option<File>,
    /// Bytes written directly / through the page cache (for the report and tests).
    pub direct_bytes: u64,
    pub buffered_bytes: u64,
}

impl WriteStage {
    /// `cap` is rounded up to the alignment. `direct`: the same file opened with `O_DIRECT`,
    /// or `None` to write everything through the page cache.
    pub fn new(cap: usize, direct: Option<File>) -> WriteStage {
        let cap = cap.max(DIRECT_ALIGN).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mem = vec![0u8; cap + DIRECT_ALIGN];
        let base = mem.as_ptr().align_offset(DIRECT_ALIGN);
        WriteStage {
            mem,
            base,
            lead: 0,
            len: 0,
            start: 0,
            cap,
            direct,
            direct_bytes: 0,
            buffered_bytes: 0,
        }
    }

    /// Open `path` for direct writes, if the file system allows it: a second descriptor of
    /// `same_as` (already open). Never through a symbolic link, and `None` unless `path` is
    /// still the very file `same_as` is (not one swapped in at that path meanwhile).
    pub fn open_direct(path: &std::path::Path, same_as: &File) -> Option<File> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
            .open(path)
            .ok()?;
        let (a, b) = (f.metadata().ok()?, same_as.metadata().ok()?);
        (a.dev() == b.dev() && a.ino() == b.ino()).then_some(f)
    }

    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub fn write(&mut self, file: &File, offset: u64, mut bytes: &[u8]) -> io::Result<()> {
        if self.len > 0 && offset != self.start + self.len as u64 {
            self.flush(file)?;
        }
        if self.len == 0 {
            self.start = offset;
            self.lead = (offset % DIRECT_ALIGN as u64) as usize;
        }
        while !bytes.is_empty() {
            let at = self.lead + self.len;
            let n = (self.cap - at).min(bytes.len());
            self.mem[self.base + at..self.base + at + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
            if self.lead + self.len == self.cap {
                self.write_out(file, false)?;
            }
        }
        Ok(())
    }

    /// Write out what is staged.
    pub fn flush(&mut self, file: &File) -> io::Result<()> {
        self.write_out(file, true)
    }

    /// Write the staged run: unaligned head through the page cache, aligned middle directly,
    /// the unaligned tail too if `all`, else kept staged (moved to the front).
    fn write_out(&mut self, file: &File, all: bool) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let a = DIRECT_ALIGN as u64;
        let end = self.start + self.len as u64;
        let mut pos = self.start;
        // Memory index of file offset x: base + lead + (x - start).
        let idx = |x: u64, s: &WriteStage| s.base + s.lead + (x - s.start) as usize;
        if self.direct.is_some() {
            let mid_start = self.start.div_ceil(a) * a;
            let mid_end = end / a * a;
            if mid_end > mid_start {
                if mid_start > pos {
                    let r = idx(pos, self)..idx(mid_start, self);
                    file.write_all_at(&self.mem[r], pos)?;
                    self.buffered_bytes += mid_start - pos;
                }
                let r = idx(mid_start, self)..idx(mid_end, self);
                let d = self.direct.as_ref().expect("checked");
                match d.write_all_at(&self.mem[r.clone()], mid_start) {
                    Ok(()) => self.direct_bytes += mid_end - mid_start,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // The file system refuses direct I/O after all: page cache from now on.
                        tracing::info!(
                            "direct writes refused ({e}); writing through the page cache"
                        );
                        self.direct = None;
                        file.write_all_at(&self.mem[r], mid_start)?;
                        self.buffered_bytes += mid_end - mid_start;
                    }
                    Err(e) => return Err(e),
                }
                pos = mid_end;
            }
        }
        if pos < end && (all || self.direct.is_none()) {
            let r = idx(pos, self)..idx(end, self);
            file.write_all_at(&self.mem[r], pos)?;
            self.buffered_bytes += end - pos;
            pos = end;
        }
        if pos == end {
            // Nothing left: a write that continues the run starts at `end`.
            self.start = end;
            self.lead = (end % a) as usize;
            self.len = 0;
        } else {
            // Keep the unaligned tail; it starts on an aligned offset, so its lead is 0.
            let r = idx(pos, self)..idx(end, self);
            let n = r.len();
            self.mem.copy_within(r, self.base);
            self.start = pos;
            self.lead = 0;
            self.len = n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn write_stage_writes_runs_and_breaks_on_gaps() {
        let f = tempfile::tempfile().unwrap();
        let mut w = WriteStage::new(10, None);
        w.write(&f, 0, b"abc").unwrap();
        w.write(&f, 3, b"def").unwrap();
        w.write(&f, 20, b"xy").unwrap(); // gap: "abcdef" goes out
        let mut got = [0u8; 22];
        assert_eq!(f.read_at(&mut got, 0).unwrap(), 6);
        w.write(&f, 22, b"0123456789").unwrap();
        w.write(&f, 6, b"ghij").unwrap();
        w.flush(&f).unwrap();
        let mut got = [0u8; 32];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..10], b"abcdefghij");
        assert_eq!(&got[20..], b"xy0123456789");
    }

    /// The direct descriptor is only ever a second one of the same file: not through a
    /// symbolic link, not another file swapped in at the path.
    #[test]
    fn direct_open_is_the_same_file_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let (path, other) = (dir.path().join("f"), dir.path().join("g"));
        let f = std::fs::File::create(&path).unwrap();
        std::fs::write(&other, b"other").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&other, &path).unwrap();
        assert!(
            WriteStage::open_direct(&path, &f).is_none(),
            "through a link"
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::copy(&other, &path).unwrap();
        assert!(WriteStage::open_direct(&path, &f).is_none(), "another file");
    }

    /// Direct writes of the aligned middle, page-cache writes of the edges, carried tails and
    /// gaps: the file ends up exactly as if every piece had been written where it belongs.
    #[test]
    fn direct_write_stage_matches_plain_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let total = 300_000usize;
        f.set_len(total as u64).unwrap();
        let direct = WriteStage::open_direct(&path, &f);
        let mut w = WriteStage::new(16 << 10, direct);
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        // 1280-byte pieces from offset 16, in order, with a hole and a late fill of it.
        let mut expect = vec![0u8; total];
        let mut off = 16usize;
        let mut hole = None;
        while off + 1280 <= total {
            if off > 100_000 && hole.is_none() {
                hole = Some(off);
            } else {
                w.write(&f, off as u64, &data[off..off + 1280]).unwrap();
                expect[off..off + 1280].copy_from_slice(&data[off..off + 1280]);
            }
            off += 1280;
        }
        let h = hole.unwrap();
        w.write(&f, h as u64, &data[h..h + 1280]).unwrap();
        expect[h..h + 1280].copy_from_slice(&data[h..h + 1280]);
        w.flush(&f).unwrap();
        let mut got = vec![0u8; total];
        f.read_exact_at(&mut got, 0).unwrap();
        if let Some(i) = (0..total).find(|&i| got[i] != expect[i]) {
            panic!(
                "file differs at {i}: got {:?} want {:?} (hole {h}, direct {}, buffered {})",
                &got[i..i + 4],
                &expect[i..i + 4],
                w.direct_bytes,
                w.buffered_bytes
            );
        }
        if w.is_direct() {
            assert!(w.direct_bytes > 200_000, "direct {}", w.direct_bytes);
        }
        assert_eq!(w.direct_bytes + w.buffered_bytes, (off - 16) as u64);
    }

    #[test]
    fn batch_reads_contiguous_and_scattered_payloads() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let mut b = PacketBatch::with_capacity(8, 2000);
        b.push_file(b"h0", 0, 100);
        b.push_file(b"h1", 100, 100);
        b.push(b"s", b"sync");
        b.push_file(b"h2", 5000, 37);
        b.push_file(b"h3", 9990, 10);
        b.fill(&f).unwrap();
        assert_eq!(b.len(), 5);
        assert_eq!(&b.packet(0)[..2], b"h0");
        assert_eq!(&b.packet(0)[2..], &data[..100]);
        assert_eq!(&b.packet(1)[2..], &data[100..200]);
        assert_eq!(b.packet(2), b"ssync");
        assert_eq!(&b.packet(3)[2..], &data[5000..5037]);
        assert_eq!(&b.packet(4)[2..], &data[9990..]);
        b.clear();
        b.push_file(b"x", 9995, 10);
        assert!(b.fill(&f).is_err(), "reading past the end is an error");
    }

    #[test]
    fn overflow_counter_reports_deltas_across_a_wrap() {
        let mut c = OverflowCounter::default();
        assert_eq!(c.delta(None), 0);
        assert_eq!(c.delta(Some(5)), 5);
        assert_eq!(c.delta(None), 0, "no news is no drops");
        assert_eq!(c.delta(Some(5)), 0);
        assert_eq!(c.delta(Some(u32::MAX - 1)), (u32::MAX - 6) as u64);
        assert_eq!(c.delta(Some(3)), 5, "the kernel's u32 wrapped");
    }

    /// A socket with a tiny buffer that is not read overflows: every datagram sent is either
    /// received or counted as dropped by the socket itself. The count rides on the datagrams
    /// queued after the drops, so one more is sent once the burst is drained.
    #[test]
    fn socket_overruns_are_counted() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4096);
        assert!(enable_rxq_ovfl(&rx), "SO_RXQ_OVFL refused");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut r = RecvBatch::new(16, 2048);
        let mut c = OverflowCounter::default();
        let (mut got, mut dropped) = (0u64, 0u64);
        let mut drain = |r: &mut RecvBatch, c: &mut OverflowCounter| loop {
            let n = r.recv(rx.as_raw_fd()).unwrap();
            if n == 0 {
                break;
            }
            got += r.datagrams().count() as u64;
            dropped += c.delta(r.overflow_count());
        };
        let burst = 300u64;
        for i in 0..burst {
            tx.send_to(&[i as u8; 1200], to).unwrap();
        }
        drain(&mut r, &mut c);
        for _ in 0..2 {
            // Loopback delivers on send: the datagram is queued when send_to returns.
            tx.send_to(b"after", to).unwrap();
            drain(&mut r, &mut c);
        }
        println!(
            "sent {}: received {got}, socket dropped {dropped}",
            burst + 2
        );
        assert!(dropped > 0, "a 4 KiB buffer took {got} datagrams");
        assert_eq!(
            got + dropped,
            burst + 2,
            "each datagram received or counted once"
        );
    }

    #[test]
    fn sends_and_receives_every_datagram_with_or_without_gso() {
        for try_gso in [true, false] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(4 << 20);
            let gro = enable_gro(&rx);
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut s = BatchSender::new(&tx, try_gso);
            let mut b = PacketBatch::with_capacity(200, 1400);
            // 150 equal packets, a short one, more equal ones: several GSO runs.
            for i in 0..200u32 {
                let len = if i == 150 { 300 } else { 1300 };
                let body = vec![(i % 256) as u8; len - 4];
                b.push(&i.to_be_bytes(), &body);
            }
            let out = s.send(tx.as_raw_fd(), &b, &rx.local_addr().unwrap().into());
            assert_eq!((out.sent, out.failed), (200, 0), "{out:?}");
            let mut r = RecvBatch::new(16, 65_536);
            let mut seen = Vec::new();
            // Not a timing test: the deadline only turns a lost datagram into a failure.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while seen.len() < 200 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "lost datagrams: {seen:?}"
                );
                let n = r.recv(rx.as_raw_fd()).unwrap();
                if n == 0 {
                    std::thread::yield_now();
                    continue;
                }
                for d in r.datagrams() {
                    let i = u32::from_be_bytes(d[..4].try_into().unwrap());
                    let want = if i == 150 { 300 } else { 1300 };
                    assert_eq!(d.len(), want, "datagram {i} (gso {try_gso}, gro {gro})");
                    assert!(d[4..].iter().all(|&x| x == (i % 256) as u8));
                    seen.push(i);
                }
            }
            assert_eq!(seen, (0..200).collect::<Vec<_>>());
        }
    }
}
