//! The titles this server can loop: the catalog (by name and by archive id), catalog replies,
//! withdrawal of a title whose archive became unreadable, and the signed heads receivers fetch
//! in chunks. A head may live in memory or stay with the driver ([`HeadBytes::External`]):
//! then a chunk request becomes a [`HeadRead`] the driver performs and hands back, so the engine
//! never reads a file and the server's memory does not grow with what it serves.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use super::loops::Close;
use super::ChannelManager;
use crate::archive::Head;
use crate::wire::control::{ArchiveId, CatalogItem, Control, Envelope, ErrorCode, HEAD_CHUNK};

/// A title this server can loop.
#[derive(Clone, Debug)]
pub struct TitleInfo {
    /// The verified head; the server may drop its block-hash list (it never checks packets).
    pub head: Arc<Head>,
    pub head_bytes: HeadBytes,
    pub archive_len: u64,
}

/// The signed head's bytes, which receivers fetch in chunks.
#[derive(Clone, Debug)]
pub enum HeadBytes {
    /// Held here (the simulator, tests, small heads): chunks are answered at once.
    Memory(Arc<Vec<u8>>),
    /// `len` bytes held by the driver (a server reads them from the archive file when asked,
    /// so its memory does not grow with the size of what it serves: a 4 GiB title's head is
    /// ~5 MB at 1280-byte symbols). Chunk requests come out of
    /// [`ChannelManager::poll_head_read`].
    External { len: u32 },
}

impl HeadBytes {
    pub fn len(&self) -> usize {
        match self {
            HeadBytes::Memory(b) => b.len(),
            HeadBytes::External { len } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A head chunk a receiver asked for, of a title whose head is [`HeadBytes::External`]: the
/// driver reads `len` bytes at `offset` of archive `archive_id`'s head and hands them to
/// [`ChannelManager::head_read_done`], which queues the `HeadChunk` reply (or the error reply
/// if the read failed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadRead {
    pub archive_id: ArchiveId,
    /// Offset within the head (not the archive file), and bytes to read: at most
    /// [`HEAD_CHUNK`], clipped to the head.
    pub offset: u32,
    pub len: u32,
    /// Who asked (the reply's address, receiver and request ids), and the head's length.
    to: SocketAddr,
    receiver_id: u64,
    req_id: u32,
    total: u32,
}

impl HeadRead {
    /// Where the reply goes.
    pub fn to(&self) -> SocketAddr {
        self.to
    }
}

/// What [`ChannelManager::hot_add_title`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotAdd {
    /// A new title.
    Added,
    /// The same archive was already served.
    Unchanged,
    /// The title's archive changed and the old one (this id) was replaced.
    Replaced(ArchiveId),
    /// The title's archive changed, but a channel still loops the old one: try later.
    Busy,
}

/// Titles by name, and names by archive id.
#[derive(Default)]
pub(super) struct Catalog {
    titles: BTreeMap<String, TitleInfo>,
    by_id: HashMap<ArchiveId, String>,
    /// Head chunks waiting for the driver to read them.
    head_reads: std::collections::VecDeque<HeadRead>,
}

impl Catalog {
    pub(super) fn get(&self, title: &str) -> Option<&TitleInfo> {
        self.titles.get(title)
    }

    pub(super) fn title_of(&self, archive_id: &ArchiveId) -> Option<&str> {
        self.by_id.get(archive_id).map(String::as_str)
    }

    fn by_id(&self, archive_id: &ArchiveId) -> Option<&TitleInfo> {
        self.title_of(archive_id).and_then(|n| self.titles.get(n))
    }
}

impl ChannelManager {
    /// Add or replace a title (a re-packed title takes effect for channels opened later).
    pub fn add_title(&mut self, t: TitleInfo) {
        let c = &mut self.catalog;
        c.by_id.insert(t.head.archive_id, t.head.title.clone());
        c.titles.insert(t.head.title.clone(), t);
    }

    /// The archive currently served as `title`.
    pub fn title_archive(&self, title: &str) -> Option<ArchiveId> {
        self.catalog.titles.get(title).map(|t| t.head.archive_id)
    }

    /// Whether any channel loops `archive_id`.
    pub fn archive_in_use(&self, archive_id: &ArchiveId) -> bool {
        self.channels.values().any(|c| &c.archive_id == archive_id)
    }

    /// Add a title that appeared while serving (hot-add), or replace one whose archive file
    /// changed. A replacement waits while a channel loops the old archive (receivers are
    /// mid-download): then nothing changes and [`HotAdd::Busy`] says to try again later.
    /// On [`HotAdd::Replaced`] the old archive is forgotten (the driver may close its file).
    pub fn hot_add_title(&mut self, t: TitleInfo) -> HotAdd {
        match self.title_archive(&t.head.title) {
            None => {
                self.add_title(t);
                HotAdd::Added
            }
            Some(old) if old == t.head.archive_id => HotAdd::Unchanged,
            Some(old) if self.archive_in_use(&old) => HotAdd::Busy,
            Some(old) => {
                self.catalog.by_id.remove(&old);
                self.stopped_at.retain(|(id, _), _| *id != old);
                self.add_title(t);
                HotAdd::Replaced(old)
            }
        }
    }

    /// Titles this server can loop (for heartbeats and health checks).
    pub fn title_names(&self) -> impl Iterator<Item = &str> {
        self.catalog.titles.keys().map(|t| t.as_str())
    }

    /// Stop serving `archive_id` (its file became unreadable): its channels close at once and
    /// later joins get NotHere, so receivers stop waiting for packets that cannot come.
    /// False if it was not served (already withdrawn).
    pub fn withdraw_title(&mut self, archive_id: &ArchiveId) -> bool {
        let c = &mut self.catalog;
        let Some(title) = c.by_id.remove(archive_id) else {
            return false;
        };
        if c.titles
            .get(&title)
            .is_some_and(|t| &t.head.archive_id == archive_id)
        {
            c.titles.remove(&title);
        }
        let ids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| &c.archive_id == archive_id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close_channel(id, Close::Withdrawn);
        }
        self.counters.archives_withdrawn += 1;
        true
    }

    pub(super) fn catalog_request(&mut self, from: SocketAddr, env: &Envelope, start: u16) {
        let titles = &self.catalog.titles;
        // Pages of at most 40 items and ~8 KB (associations make items long).
        let mut items: Vec<CatalogItem> = Vec::new();
        let mut bytes = 0;
        for t in titles.values().skip(start as usize).take(40) {
            let h = &t.head;
            let item = CatalogItem {
                title: h.title.clone(),
                plain_len: h.plain_len,
                archive_len: t.archive_len,
                advert: h.advert,
                plugin: h.plugin,
                trailer: h.placement == crate::archive::head::Placement::Trailer,
                advert_for: h.advert_for.clone(),
                watermark: h.watermark.clone(),
            };
            bytes += item.encoded_len();
            if bytes > 8 * 1024 && !items.is_empty() {
                break;
            }
            items.push(item);
        }
        let more = start as usize + items.len() < titles.len();
        self.reply(from, env, Control::CatalogReply { items, more });
    }

    /// A receiver asks for `HEAD_CHUNK` bytes of a head at `offset`: answered at once from
    /// memory, or handed to the driver as a [`HeadRead`].
    pub(super) fn head_request(
        &mut self,
        from: SocketAddr,
        env: &Envelope,
        archive_id: ArchiveId,
        offset: u32,
    ) {
        let Some(t) = self.catalog.by_id(&archive_id) else {
            self.error(from, env, ErrorCode::UnknownSession, "unknown archive");
            return;
        };
        let off = offset as usize;
        let total = t.head_bytes.len();
        if off > total {
            self.error(from, env, ErrorCode::BadRequest, "head offset out of range");
            return;
        }
        let end = (off + HEAD_CHUNK).min(total);
        match &t.head_bytes {
            HeadBytes::Memory(b) => {
                let msg = Control::HeadChunk {
                    archive_id,
                    offset,
                    total: total as u32,
                    bytes: b[off..end].to_vec(),
                };
                self.counters.head_chunks_sent += 1;
                self.reply(from, env, msg);
            }
            HeadBytes::External { .. } => self.catalog.head_reads.push_back(HeadRead {
                archive_id,
                offset,
                len: (end - off) as u32,
                to: from,
                receiver_id: env.receiver_id,
                req_id: env.req_id,
                total: total as u32,
            }),
        }
    }

    /// The next head chunk the driver must read (see [`HeadRead`]). Call until `None`, and
    /// answer each with [`ChannelManager::head_read_done`].
    pub fn poll_head_read(&mut self) -> Option<HeadRead> {
        self.catalog.head_reads.pop_front()
    }

    /// The driver read `read` (`None`: the read failed): queue the receiver's reply.
    pub fn head_read_done(&mut self, read: HeadRead, bytes: Option<Vec<u8>>) {
        let msg = match bytes.filter(|b| b.len() == read.len as usize) {
            Some(bytes) => {
                self.counters.head_chunks_sent += 1;
                Control::HeadChunk {
                    archive_id: read.archive_id,
                    offset: read.offset,
                    total: read.total,
                    bytes,
                }
            }
            None => {
                let title = self.catalog.title_of(&read.archive_id).unwrap_or("?");
                tracing::warn!(%title, "cannot read the archive's head");
                Control::Error {
                    code: ErrorCode::BadRequest,
                    message: "head unreadable on server".to_string(),
                }
            }
        };
        self.reply_to(read.to, read.receiver_id, read.req_id, msg);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::channel::Params;

    fn manager(head_bytes: HeadBytes) -> (ChannelManager, ArchiveId) {
        let head = crate::sim::sim_head(100, 1280);
        let id = head.archive_id;
        let info = TitleInfo {
            head: Arc::new(head),
            head_bytes,
            archive_len: 0,
        };
        let m = ChannelManager::new(Params::for_tests(1_000_000), vec![info], Instant::now());
        (m, id)
    }

    fn ask(m: &mut ChannelManager, id: ArchiveId, offset: u32) {
        let req = Envelope::new(
            9,
            42,
            Control::HeadRequest {
                archive_id: id,
                offset,
            },
        );
        let from: SocketAddr = "10.0.0.9:4000".parse().unwrap();
        let now = Instant::now();
        let req = req.with_token(Some(m.address_token(from.ip(), now)));
        m.handle_control(now, from, &req.encode());
    }

    fn reply(m: &mut ChannelManager) -> Option<Envelope> {
        m.poll_reply()
            .map(|(to, b)| {
                assert_eq!(to, "10.0.0.9:4000".parse().unwrap());
                Envelope::decode(&b).unwrap()
            })
            .inspect(|e| assert_eq!((e.receiver_id, e.req_id), (9, 42)))
    }

    #[test]
    fn memory_and_external_heads_answer_alike() {
        let head: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let (mut mem, id) = manager(HeadBytes::Memory(Arc::new(head.clone())));
        let (mut ext, _) = manager(HeadBytes::External { len: 2500 });
        for offset in [0u32, 1024, 2048, 2500] {
            ask(&mut mem, id, offset);
            assert!(mem.poll_head_read().is_none());
            let from_memory = reply(&mut mem).expect("answered at once");

            ask(&mut ext, id, offset);
            assert!(reply(&mut ext).is_none(), "waits for the driver");
            let r = ext.poll_head_read().expect("a read for the driver");
            assert!(ext.poll_head_read().is_none());
            let end = (offset as usize + HEAD_CHUNK).min(head.len());
            assert_eq!((r.archive_id, r.offset), (id, offset));
            assert_eq!(r.len as usize, end - offset as usize);
            let bytes = head[offset as usize..end].to_vec();
            ext.head_read_done(r, Some(bytes.clone()));
            let from_driver = reply(&mut ext).expect("the chunk");
            assert_eq!(from_driver, from_memory);
            assert_eq!(
                from_driver.msg,
                Control::HeadChunk {
                    archive_id: id,
                    offset,
                    total: 2500,
                    bytes
                }
            );
        }
        assert_eq!(mem.counters().head_chunks_sent, 4);
        assert_eq!(ext.counters().head_chunks_sent, 4);
    }

    /// Hot-add: a new title at once; the same archive again changes nothing; a changed
    /// archive waits while a channel loops the old one, then replaces it (the old archive
    /// id is forgotten, the new one answers).
    #[test]
    fn hot_added_titles_and_replacements() {
        let (mut m, old) = manager(HeadBytes::External { len: 2500 });
        let info = |title: &str, id: ArchiveId| {
            let mut h = crate::sim::sim_head(100, 1280);
            h.title = title.into();
            h.archive_id = id;
            TitleInfo {
                head: Arc::new(h),
                head_bytes: HeadBytes::External { len: 2500 },
                archive_len: 1,
            }
        };
        let sim = m.title_names().next().unwrap().to_string();
        assert_eq!(m.hot_add_title(info("doc", [7; 16])), HotAdd::Added);
        assert_eq!(m.title_names().count(), 2);
        assert_eq!(m.hot_add_title(info("doc", [7; 16])), HotAdd::Unchanged);
        let now = Instant::now();
        m.open_scheduled(now, &sim, None).expect("a channel");
        assert!(m.archive_in_use(&old));
        assert_eq!(m.hot_add_title(info(&sim, [8; 16])), HotAdd::Busy);
        assert_eq!(m.title_archive(&sim), Some(old));
        m.close_scheduled(&sim, false);
        assert!(!m.archive_in_use(&old));
        assert_eq!(m.hot_add_title(info(&sim, [8; 16])), HotAdd::Replaced(old));
        assert_eq!(m.title_archive(&sim), Some([8; 16]));
        ask(&mut m, old, 0);
        assert!(matches!(
            reply(&mut m).unwrap().msg,
            Control::Error {
                code: ErrorCode::UnknownSession,
                ..
            }
        ));
        ask(&mut m, [8; 16], 0);
        assert_eq!(m.poll_head_read().unwrap().archive_id, [8; 16]);
    }

    #[test]
    fn head_errors_keep_their_replies() {
        let (mut m, id) = manager(HeadBytes::External { len: 2500 });
        ask(&mut m, id, 2501);
        assert!(m.poll_head_read().is_none());
        assert!(matches!(
            reply(&mut m).unwrap().msg,
            Control::Error { code: ErrorCode::BadRequest, message } if message == "head offset out of range"
        ));
        ask(&mut m, [0xee; 16], 0);
        assert!(matches!(
            reply(&mut m).unwrap().msg,
            Control::Error {
                code: ErrorCode::UnknownSession,
                ..
            }
        ));
        for bytes in [None, Some(vec![0u8; 3])] {
            ask(&mut m, id, 0);
            let r = m.poll_head_read().unwrap();
            m.head_read_done(r, bytes);
            assert!(matches!(
                reply(&mut m).unwrap().msg,
                Control::Error { code: ErrorCode::BadRequest, message } if message == "head unreadable on server"
            ));
        }
        assert_eq!(m.counters().head_chunks_sent, 0);
    }
}
