//! HTTP fetch and repair (`mcast-recv get --http URL[,URL…]`): the missing packets of an
//! archive from plain web servers (nginx, a CDN, `mcastd`'s `[server] archive_http_listen`)
//! with range requests. The mirrors are not trusted: every packet is verified against the
//! signed head exactly as on the multicast path ([`Download::on_packet`]); the planning and
//! the judging of mirrors is [`mcast_proto::receiver::range_fetch`]. This file moves bytes:
//!
//! 1. The head: from the part file when a state file resumes it (the multicast phase of a
//!    mixed `get` left it there), else the archive's 16-byte tail and then its head from the
//!    first mirror that serves them; its signature is checked against `--server-key`, else
//!    the key the state file was pinned to, else trusted on first use with a warning.
//! 2. The part file and state file of `get` ([`crate::get::open_part`], [`State`]): a resume
//!    re-verifies what it holds and fetches only the rest.
//! 3. Up to `parallel` requests in flight (worker threads), round-robin over the live
//!    mirrors, hash ranges before data; each verified payload is
//!    written at its offset; the state file is checkpointed every `checkpoint` (fdatasync
//!    first), so a crash or Ctrl-C resumes with what was saved.
//! 4. Done: [`crate::get::finish_part`], the same finish as `get` (durable, FEC repair region,
//!    signature, rename into place).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcast_io::archive::{self, ArchiveFile, Head};
use mcast_keys::PublicIdentity;
use mcast_proto::archive::{Layout, PacketId, TAIL_LEN};
use mcast_proto::receiver::download::{Download, Verdict};
use mcast_proto::receiver::range_fetch::{self, Next, RangeConfig, RangeFetch};

use crate::error::{Failure, RecvError};
use crate::get::{file_names, finish_part, open_part, GetReport, ProgressLine};
use crate::state::State;

/// Rounds of planning: a round re-plans what is still missing after the last one (packets
/// parked or refused on the way); more than this and something is wrong.
const MAX_ROUNDS: u32 = 4;

#[derive(Clone, Debug)]
pub struct HttpFetchOptions {
    pub title: String,
    pub out_dir: PathBuf,
    /// Mirror URLs as given: ending in `/` a directory (`<title>.mca` is appended), else the
    /// archive file itself.
    pub mirrors: Vec<String>,
    /// Pinned server identity (else the state file's, else trust on first use).
    pub server_key: Option<PublicIdentity>,
    /// How often the state file is saved.
    pub checkpoint: Duration,
    /// Give up (state kept, resumable) after this long.
    pub timeout: Option<Duration>,
    /// Largest body one request asks for.
    pub max_request: u64,
    /// A request (connect, headers and body) that takes longer drops its mirror.
    pub request_timeout: Duration,
    /// Requests in flight at once (over the mirrors, round-robin).
    pub parallel: usize,
    pub json: bool,
    pub progress_bar: bool,
}

impl HttpFetchOptions {
    pub fn new(title: &str, out_dir: &Path, mirrors: Vec<String>) -> HttpFetchOptions {
        HttpFetchOptions {
            title: title.to_string(),
            out_dir: out_dir.to_path_buf(),
            mirrors,
            server_key: None,
            checkpoint: Duration::from_secs(1),
            timeout: None,
            max_request: RangeConfig::default().max_request,
            request_timeout: Duration::from_secs(30),
            parallel: 4,
            json: false,
            progress_bar: false,
        }
    }
}

/// The archive's URL on a mirror given as `url`.
pub fn mirror_url(url: &str, title: &str) -> String {
    if url.ends_with('/') {
        format!("{url}{title}.{}", archive::ARCHIVE_EXT)
    } else {
        url.to_string()
    }
}

/// Check the mirror URLs (`--http`): http or https, something after the scheme.
pub fn check_urls(urls: &[String]) -> Result<(), RecvError> {
    if urls.is_empty() {
        return Err(RecvError::new(Failure::Usage, "--http: no URL given"));
    }
    for u in urls {
        let ok = reqwest::Url::parse(u)
            .ok()
            .filter(|p| matches!(p.scheme(), "http" | "https") && p.host_str().is_some());
        if ok.is_none() {
            return Err(RecvError::new(
                Failure::Usage,
                format!("--http {u:?}: not an http:// or https:// URL (a directory ends in /, e.g. http://mirror/archives/)"),
            ));
        }
    }
    Ok(())
}

/// One answer: status, `Content-Range`, body.
struct Answer {
    status: u16,
    content_range: Option<String>,
    body: Vec<u8>,
}

struct Http {
    client: reqwest::blocking::Client,
    urls: Vec<String>,
    bytes: u64,
    requests: u64,
}

impl Http {
    /// GET `range` (a `Range` header value) of mirror `m`, reading at most `limit` body bytes
    /// (plus one, to tell a longer body).
    fn get(&mut self, m: usize, range: &str, limit: u64) -> Result<Answer, String> {
        self.requests += 1;
        let (n, r) = get_range(&self.client, &self.urls[m], range, limit);
        self.bytes += n;
        r
    }
}

/// One range request: the body bytes read (counted even when the answer is cut short), and
/// the answer.
fn get_range(
    client: &reqwest::blocking::Client,
    url: &str,
    range: &str,
    limit: u64,
) -> (u64, Result<Answer, String>) {
    let resp = match client.get(url).header(reqwest::header::RANGE, range).send() {
        Ok(r) => r,
        Err(e) => return (0, Err(format!("request failed: {}", error_chain(&e)))),
    };
    let status = resp.status().as_u16();
    let content_range = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = Vec::new();
    let r = resp.take(limit + 1).read_to_end(&mut body);
    let n = body.len() as u64;
    match r {
        Ok(_) => (
            n,
            Ok(Answer {
                status,
                content_range,
                body,
            }),
        ),
        Err(e) => (n, Err(format!("reading the answer failed: {e}"))),
    }
}

/// A request for a worker thread.
struct Job {
    id: u64,
    mirror: usize,
    range: String,
    limit: u64,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// The verified head: decoded, its bytes and the key it was checked against.
struct HeadFound {
    head: Arc<Head>,
    bytes: Vec<u8>,
    trusted: PublicIdentity,
}

/// The trust decision of `get` (see the session's head check).
fn check_head(
    head: &Head,
    title: &str,
    pinned: Option<PublicIdentity>,
    prior: Option<&State>,
    whence: &str,
) -> Result<PublicIdentity, RecvError> {
    let prior_key = prior
        .filter(|s| s.archive_id == head.archive_id)
        .map(|s| PublicIdentity(s.server_key));
    let trusted = match (pinned, prior_key) {
        (Some(k), _) => k,
        (None, Some(k)) => k,
        (None, None) => {
            tracing::warn!(key = %hex::encode(head.server_key.0), "server key not pinned (--server-key): trusting the key of the head from {whence} on first use");
            head.server_key
        }
    };
    if head.verify_with(&trusted).is_err() {
        return Err(RecvError::new(
            Failure::Integrity,
            format!(
                "archive head for {title:?} from {whence} is not signed by the trusted server key {}",
                trusted.fingerprint()
            ),
        ));
    }
    if head.title != title {
        return Err(RecvError::new(
            Failure::Integrity,
            format!(
                "asked for {title:?}, but {whence} serves the signed archive of {:?}: refused",
                head.title
            ),
        ));
    }
    Ok(trusted)
}

/// The head of a part file a state file resumes (left by an earlier run, multicast or HTTP).
fn local_head(part: &Path, state: &State, opts: &HttpFetchOptions) -> Option<HeadFound> {
    let f = File::open(part).ok()?;
    let len = f.metadata().ok()?.len();
    let mut tail = [0u8; TAIL_LEN as usize];
    f.read_exact_at(&mut tail, len.checked_sub(TAIL_LEN)?)
        .ok()?;
    let head_len = range_fetch::parse_tail(&tail, len).ok()?;
    let mut bytes = vec![0u8; head_len as usize];
    f.read_exact_at(&mut bytes, len - TAIL_LEN - head_len)
        .ok()?;
    let head = Head::decode(&bytes).ok()?;
    if head.archive_id != state.archive_id || Layout::of(&head, head_len).file_len() != len {
        return None;
    }
    let trusted = check_head(
        &head,
        &opts.title,
        opts.server_key,
        Some(state),
        "the part file",
    )
    .ok()?;
    Some(HeadFound {
        head: Arc::new(head),
        bytes,
        trusted,
    })
}

/// The head from the first mirror that serves a valid, trusted one; mirrors that do not are
/// marked in `bad` with the reason.
fn remote_head(
    http: &mut Http,
    opts: &HttpFetchOptions,
    prior: Option<&State>,
    bad: &mut [Option<String>],
) -> Result<HeadFound, RecvError> {
    let mut integrity = None;
    for (m, slot) in bad.iter_mut().enumerate() {
        let url = http.urls[m].clone();
        let r = (|| -> Result<HeadFound, RecvError> {
            let other = |m: String| RecvError::new(Failure::Unreachable, m);
            let a = http
                .get(m, &format!("bytes=-{TAIL_LEN}"), TAIL_LEN)
                .map_err(other)?;
            if a.status != 206 {
                return Err(other(format!(
                    "answered HTTP {} to a range request for the tail{}",
                    a.status,
                    if a.status == 404 {
                        " (no such file)"
                    } else {
                        ""
                    }
                )));
            }
            let total = a
                .content_range
                .as_deref()
                .and_then(range_fetch::parse_content_range)
                .and_then(|(_, _, t)| t)
                .ok_or_else(|| other(format!("no valid Content-Range ({:?})", a.content_range)))?;
            let head_len = range_fetch::parse_tail(&a.body, total).map_err(other)?;
            let start = total - TAIL_LEN - head_len;
            let h = http
                .get(
                    m,
                    &format!("bytes={start}-{}", total - TAIL_LEN - 1),
                    head_len,
                )
                .map_err(other)?;
            let want = Some((start, total - TAIL_LEN - 1, Some(total)));
            if h.status != 206
                || h.content_range
                    .as_deref()
                    .and_then(range_fetch::parse_content_range)
                    != want
                || h.body.len() as u64 != head_len
            {
                return Err(other(format!(
                    "answered HTTP {} ({:?}, {} bytes) to the range request for the head",
                    h.status,
                    h.content_range,
                    h.body.len()
                )));
            }
            let head = Head::decode(&h.body).map_err(|e| {
                RecvError::new(Failure::Integrity, format!("bad archive head: {e}"))
            })?;
            if Layout::of(&head, head_len).file_len() != total {
                return Err(RecvError::new(
                    Failure::Integrity,
                    "the head does not describe a file of the length served".to_string(),
                ));
            }
            let trusted = check_head(&head, &opts.title, opts.server_key, prior, &url)?;
            Ok(HeadFound {
                head: Arc::new(head),
                bytes: h.body,
                trusted,
            })
        })();
        match r {
            Ok(h) => return Ok(h),
            Err(e) => {
                tracing::warn!(mirror = %url, error = %e.message, "mirror dropped");
                if e.kind == Failure::Integrity {
                    integrity = Some(e.message.clone());
                }
                *slot = Some(e.message);
            }
        }
    }
    let reasons = dropped_text(&http.urls, bad);
    Err(match integrity {
        Some(_) => RecvError::new(
            Failure::Integrity,
            format!("no mirror serves a trusted head of {:?}: {reasons}", opts.title),
        ),
        None => RecvError::new(
            Failure::Unreachable,
            format!(
                "no mirror serves {:?}: {reasons}; check the URLs (a directory ends in /), then run again",
                opts.title
            ),
        ),
    })
}

fn dropped_text(urls: &[String], bad: &[Option<String>]) -> String {
    bad.iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| format!("{} {r}", urls[i])))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Fetch `opts.title` from the mirrors into `opts.out_dir` (resuming a part and state file),
/// verify it and put it in place, as `get` does.
pub fn fetch(opts: &HttpFetchOptions, stop: Arc<AtomicBool>) -> Result<GetReport, RecvError> {
    let started = Instant::now();
    mcast_keys::title::validate_title(&opts.title)
        .map_err(|e| RecvError::new(Failure::Usage, e.to_string()))?;
    check_urls(&opts.mirrors)?;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| RecvError::io("cannot create output directory", &opts.out_dir, e))?;
    let (final_path, part_path, state_path) = file_names(&opts.out_dir, &opts.title);
    let client = reqwest::blocking::Client::builder()
        .user_agent(concat!("mcast-recv/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10).min(opts.request_timeout))
        .timeout(opts.request_timeout)
        .build()
        .map_err(|e| RecvError::new(Failure::Other, format!("HTTP client: {}", error_chain(&e))))?;
    let mut http = Http {
        client,
        urls: opts
            .mirrors
            .iter()
            .map(|u| mirror_url(u, &opts.title))
            .collect(),
        bytes: 0,
        requests: 0,
    };
    let prior = State::load(&state_path);
    let mut bad: Vec<Option<String>> = vec![None; http.urls.len()];
    let found = match prior.as_ref().and_then(|s| local_head(&part_path, s, opts)) {
        Some(h) => h,
        None => remote_head(&mut http, opts, prior.as_ref(), &mut bad)?,
    };
    let head_len = found.bytes.len() as u64;
    let head = found.head.clone();
    let layout = Layout::of(&head, head_len);

    // Already complete on disk (a run killed between rename and state removal, or a repeat).
    if let Ok(a) = ArchiveFile::open(&final_path) {
        if a.head.archive_id == head.archive_id && archive::verify(&a, &found.trusted).is_ok() {
            let _ = std::fs::remove_file(&state_path);
            let mut r =
                GetReport::already_complete(&opts.title, &final_path, &head, head_len, started);
            r.http_bytes = http.bytes;
            r.http_requests = http.requests;
            return Ok(r);
        }
    }
    let prior = prior.filter(|s| s.archive_id == head.archive_id);
    let (part, resumable) = open_part(&part_path, &head, &found.bytes, prior.is_some())?;
    let have = if resumable {
        prior.as_ref().map(|s| s.have.clone())
    } else {
        None
    };
    let mut dl = Download::new(head.clone(), head_len, have);
    let units_failed_recheck = if resumable {
        dl.recheck_held(|off, buf| part.read_exact_at(buf, off).is_ok())
    } else {
        0
    };
    if units_failed_recheck > 0 {
        tracing::warn!(
            units = units_failed_recheck,
            "units held before the restart no longer verify on disk: fetching them again"
        );
    }
    let units_at_start = dl.have_count();
    let mut state = State {
        archive_id: head.archive_id,
        server_key: found.trusted.0,
        units: head.loop_packets(),
        have: dl.have_bits().to_vec(),
    };
    state
        .save(&state_path)
        .map_err(|e| RecvError::io("cannot write state file", &state_path, e))?;

    let shape = *dl.shape();
    let need = range_fetch::needed_packets(&shape, |u| dl.has(u));
    let missing = range_fetch::packet_bytes(&layout, &need);
    let cfg = RangeConfig {
        max_request: opts.max_request.max(layout.symbol_size),
        merge_gap: 0,
    };
    let mut plan = RangeFetch::new(layout, &need, http.urls.len(), cfg);
    for (m, why) in bad.iter().enumerate() {
        if let Some(why) = why {
            plan.drop_mirror(m, why.clone());
        }
    }
    tracing::info!(title = %opts.title, mirrors = http.urls.len(), packets = need.len(), missing_bytes = missing, "fetching over HTTP");

    let mut run = Run {
        opts,
        part: &part,
        part_path: &part_path,
        state_path: &state_path,
        state: &mut state,
        started,
        last_checkpoint: Instant::now(),
        last_progress: Instant::now(),
        progress_mark: (Instant::now(), 0, 0),
        saved: units_at_start,
        written: 0,
        duplicates: 0,
        bar: None,
    };
    let needed_bytes = head.needed_bytes();
    run.bar = opts.progress_bar.then(|| {
        crate::get::bytes_bar(
            needed_bytes,
            needed_bytes.saturating_sub(missing),
            format!("{} http", opts.title),
        )
    });
    let result = run.fetch_all(&mut dl, &mut plan, &mut http, &stop);
    if let Some(b) = &run.bar {
        b.finish_and_clear();
    }
    let (written, duplicates) = (run.written, run.duplicates);
    if let Err(mut e) = result {
        run.checkpoint(&dl)?;
        e.received_bytes = http.bytes;
        return Err(e);
    }
    run.checkpoint(&dl)?;
    drop(run);
    finish_part(
        part,
        &part_path,
        &final_path,
        &state_path,
        &head,
        head_len,
        &found.trusted,
    )?;
    let c = &plan.counters;
    Ok(GetReport {
        units_at_start,
        units_failed_recheck,
        missing_bytes_at_start: missing,
        written,
        duplicates,
        no_hash_yet: dl.counters.no_hash_yet,
        parked_excess: dl.counters.parked_excess,
        rejected: dl.counters.rejected,
        http_bytes: http.bytes,
        http_requests: http.requests,
        http_packets_rejected: c.packets_rejected,
        mirrors_dropped: (c.mirrors_dropped).max(bad.iter().flatten().count() as u64),
        missing_bytes_at_http_start: missing,
        ..GetReport::already_complete(&opts.title, &final_path, &head, head_len, started)
    })
}

/// The fetch loop's files and display.
struct Run<'a> {
    opts: &'a HttpFetchOptions,
    part: &'a File,
    part_path: &'a Path,
    state_path: &'a Path,
    state: &'a mut State,
    started: Instant,
    last_checkpoint: Instant,
    last_progress: Instant,
    /// (when, HTTP body bytes, held bytes) at the previous progress line.
    progress_mark: (Instant, u64, u64),
    saved: u64,
    written: u64,
    duplicates: u64,
    bar: Option<indicatif::ProgressBar>,
}

impl Run<'_> {
    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), RecvError> {
        self.written += 1;
        self.part
            .write_all_at(bytes, offset)
            .map_err(|e| RecvError::io("cannot write", self.part_path, e))
    }

    /// fdatasync, then the state file: every unit it marks is on disk.
    fn checkpoint(&mut self, dl: &Download) -> Result<(), RecvError> {
        self.part
            .sync_data()
            .map_err(|e| RecvError::io("cannot sync", self.part_path, e))?;
        self.state.have.copy_from_slice(dl.have_bits());
        self.state
            .save(self.state_path)
            .map_err(|e| RecvError::io("cannot write state file", self.state_path, e))?;
        self.saved = dl.have_count();
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// One packet of an answer through the verifier; `Ok(false)` if it was refused.
    fn offer(
        &mut self,
        dl: &mut Download,
        id: PacketId,
        payload: &[u8],
        rejected: &mut Vec<PacketId>,
        retry: &mut Vec<PacketId>,
    ) -> Result<(), RecvError> {
        let mut v = dl.on_packet(id, payload);
        if let Verdict::NeedHash(b) = v {
            // Held, evicted from memory: read it back from the part file.
            let (o, l) = dl
                .layout()
                .packet_range(PacketId::Hash(b))
                .expect("in range");
            let mut hp = vec![0u8; l];
            if self.part.read_exact_at(&mut hp, o).is_ok() && dl.restore_hash(b, hp) {
                v = dl.on_packet(id, payload);
            } else {
                retry.push(PacketId::Hash(b));
                retry.push(id);
                return Ok(());
            }
        }
        match v {
            Verdict::Write { offset } => self.write(offset, payload)?,
            Verdict::Duplicate => self.duplicates += 1,
            Verdict::Rejected => rejected.push(id),
            Verdict::Parked | Verdict::NoHashYet | Verdict::NeedHash(_) | Verdict::Kept => {
                retry.push(id)
            }
        }
        for (off, bytes) in dl.take_released() {
            self.write(off, &bytes)?;
        }
        for u in dl.take_unpark_rejects() {
            retry.push(dl.shape().unit_packet(u));
        }
        Ok(())
    }

    fn fetch_all(
        &mut self,
        dl: &mut Download,
        plan: &mut RangeFetch,
        http: &mut Http,
        stop: &AtomicBool,
    ) -> Result<(), RecvError> {
        let parallel = self.opts.parallel.max(1);
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
        let job_rx = std::sync::Mutex::new(job_rx);
        let (done_tx, done_rx) =
            std::sync::mpsc::channel::<(u64, usize, u64, Result<Answer, String>)>();
        let (client, urls) = (http.client.clone(), http.urls.clone());
        std::thread::scope(|scope| {
            for _ in 0..parallel {
                let (job_rx, done_tx, client, urls) = (&job_rx, done_tx.clone(), &client, &urls);
                scope.spawn(move || loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let (n, r) = get_range(client, &urls[job.mirror], &job.range, job.limit);
                    if done_tx.send((job.id, job.mirror, n, r)).is_err() {
                        return;
                    }
                });
            }
            drop(done_tx);
            let r = self.fetch_loop(dl, plan, http, stop, parallel, &job_tx, &done_rx);
            // Workers end once the job queue closes (after their request in progress).
            drop(job_tx);
            r
        })
    }

    /// Keep up to `parallel` requests in flight, verify and write each answer as it comes.
    #[allow(clippy::too_many_arguments)]
    fn fetch_loop(
        &mut self,
        dl: &mut Download,
        plan: &mut RangeFetch,
        http: &mut Http,
        stop: &AtomicBool,
        parallel: usize,
        jobs: &std::sync::mpsc::Sender<Job>,
        answers: &std::sync::mpsc::Receiver<(u64, usize, u64, Result<Answer, String>)>,
    ) -> Result<(), RecvError> {
        let mut round = 1;
        let mut in_flight = 0usize;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(RecvError::new(
                    Failure::Interrupted,
                    "interrupted; run the same command again to resume",
                ));
            }
            if let Some(t) = self.opts.timeout {
                if self.started.elapsed() > t {
                    return Err(RecvError::new(
                        Failure::Timeout,
                        format!(
                            "gave up after {t:?} with {}/{} packets; run again to resume",
                            dl.have_count(),
                            dl.shape().required_units()
                        ),
                    ));
                }
            }
            if self.last_checkpoint.elapsed() >= self.opts.checkpoint {
                self.checkpoint(dl)?;
            }
            self.progress(dl, http, false);
            // Fill the window.
            while in_flight < parallel {
                match plan.next_request() {
                    Ok(Next::Fetch(r)) => {
                        http.requests += 1;
                        in_flight += 1;
                        let job = Job {
                            id: r.id,
                            mirror: r.mirror,
                            range: r.range.header(),
                            limit: r.range.len(),
                        };
                        if jobs.send(job).is_err() {
                            return Err(RecvError::new(Failure::Other, "HTTP workers ended"));
                        }
                    }
                    Ok(Next::Wait) => break,
                    Ok(Next::Done) if in_flight > 0 => break,
                    Ok(Next::Done) if dl.is_complete() => {
                        self.progress(dl, http, true);
                        return Ok(());
                    }
                    Ok(Next::Done) => {
                        round += 1;
                        let again = range_fetch::needed_packets(dl.shape(), |u| dl.has(u));
                        if round > MAX_ROUNDS {
                            return Err(RecvError::new(
                                Failure::Other,
                                format!(
                                    "{} packets still missing after {MAX_ROUNDS} rounds of HTTP fetches; run again to resume",
                                    again.len()
                                ),
                            ));
                        }
                        plan.add(&again);
                    }
                    Err(_) if in_flight > 0 => break,
                    Err(all) => {
                        let reasons: Vec<String> = all
                            .reasons
                            .iter()
                            .map(|(m, r)| format!("{} {r}", http.urls[*m]))
                            .collect();
                        let kind = if plan.counters.packets_rejected > 0 {
                            Failure::Integrity
                        } else {
                            Failure::Unreachable
                        };
                        return Err(RecvError::new(
                            kind,
                            format!(
                                "every HTTP mirror was dropped with {}/{} packets held (state kept): {}",
                                dl.have_count(),
                                dl.shape().required_units(),
                                reasons.join("; ")
                            ),
                        ));
                    }
                }
            }
            if in_flight == 0 {
                continue;
            }
            let (id, mirror, n, answer) = match answers.recv_timeout(Duration::from_millis(100)) {
                Ok(x) => x,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(e) => return Err(RecvError::new(Failure::Other, format!("HTTP workers: {e}"))),
            };
            in_flight -= 1;
            http.bytes += n;
            let a = match answer {
                Ok(a) => a,
                Err(why) => {
                    tracing::warn!(mirror = %http.urls[mirror], error = %why, "mirror dropped");
                    plan.on_error(id, why);
                    continue;
                }
            };
            let Some(packets) = plan.on_response(
                id,
                a.status,
                a.content_range.as_deref(),
                a.body.len() as u64,
            ) else {
                tracing::warn!(mirror = %http.urls[mirror], reason = plan.dropped_reason(mirror).unwrap_or(""), "mirror dropped");
                continue;
            };
            let (mut rejected, mut retry) = (Vec::new(), Vec::new());
            for (pid, r) in packets {
                self.offer(dl, pid, &a.body[r], &mut rejected, &mut retry)?;
            }
            plan.on_verified(id, &rejected, &retry);
            if !rejected.is_empty() {
                tracing::warn!(mirror = %http.urls[mirror], packets = rejected.len(), "mirror served packets that fail verification: dropped");
            }
        }
    }

    fn progress(&mut self, dl: &Download, http: &Http, last: bool) {
        let now = Instant::now();
        if !last && now.duration_since(self.last_progress) < Duration::from_millis(500) {
            return;
        }
        self.last_progress = now;
        let total_bytes = dl.head().needed_bytes();
        let held = total_bytes.saturating_sub(mcast_proto::receiver::resume::missing_bytes(dl));
        let (at, b0, h0) = self.progress_mark;
        self.progress_mark = (now, http.bytes, held);
        let secs = now.saturating_duration_since(at).as_secs_f64().max(1e-3);
        let rate_mbps = http.bytes.saturating_sub(b0) as f64 * 8.0 / secs / 1e6;
        let new_per_s = held.saturating_sub(h0) as f64 / secs;
        let eta_s = (new_per_s > 0.0)
            .then(|| (total_bytes.saturating_sub(held) as f64 / new_per_s * 10.0).round() / 10.0);
        if let Some(b) = &self.bar {
            b.set_position(held);
        }
        if self.opts.json {
            let (have, total) = (dl.have_count(), dl.shape().required_units());
            let line = ProgressLine {
                event: "progress",
                title: &self.opts.title,
                have,
                total,
                percent: 100.0 * have as f64 / total.max(1) as f64,
                received_packets: self.written + self.duplicates,
                rejected: dl.counters.rejected,
                via: "http",
                saved: self.saved,
                bytes: held,
                total_bytes,
                rate_mbps: (rate_mbps * 100.0).round() / 100.0,
                eta_s,
                tier: 0,
            };
            println!("{}", serde_json::to_string(&line).unwrap());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(mirror_url("http://m/a/", "film"), "http://m/a/film.mca");
        assert_eq!(mirror_url("http://m/a/x.mca", "film"), "http://m/a/x.mca");
        assert!(check_urls(&["http://m/".into(), "https://n/f.mca".into()]).is_ok());
        for bad in ["ftp://m/", "m/", "http://"] {
            let e = check_urls(&[bad.into()]).unwrap_err();
            assert_eq!(e.kind, Failure::Usage, "{bad}");
        }
    }
}
