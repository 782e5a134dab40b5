//! `mcastd pack`: raw media file → archive (FIG. 3), streamed, written atomically.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mcast_keys::{frame as aead, Cipher, KeyStore, MasterKey};
use rand::RngCore;

use super::frame::{frame_aad, FrameHeader};
use super::head::{
    frame_size_ok, symbol_size_ok, Compression, Head, Placement, MAX_ADVERT_FOR, MAX_FRAME_SIZE,
    MAX_SYMBOL_SIZE, MAX_WATERMARK_LEN, MIN_SYMBOL_SIZE, SYMBOL_SIZE_STEP,
};
use super::manifest::TreeBuilder;
use super::{archive_path, io_err, preamble_bytes, tail_bytes, ArchiveError};
use crate::fsutil::AtomicFile;

/// Default plaintext bytes per frame.
pub const DEFAULT_FRAME_SIZE: u32 = 1 << 20;
/// Default packet payload: 1280 + our 32-byte data header + IP/UDP = 1340 bytes on the wire.
pub const DEFAULT_SYMBOL_SIZE: u32 = 1280;
/// Default FEC overhead (`[pack] fec_overhead`): none. Measured on the 2-core mixed bed at
/// 10 %, a receiver behind 5 % random loss finished in one loop with no NAK when it had the
/// CPU (4.3 s against 4.8 s), but clean receivers took 10–15 % longer and the lossy one that
/// was also short of CPU gained nothing (7.1–7.6 s, 1.7× the archive, against 6.4–7.4 s
/// without FEC). Re-measured with NAKs answered by extra symbols (step 12, second landing):
/// the CPU-starved lossy receiver gained 0.2 s under IGMPv3 and lost 1.3 s under IGMPv2
/// while clean ones stayed 0.6–1.6 s slower, so FEC remains the operator's choice for
/// audiences with random loss (README, "The same bed with FEC").
pub const DEFAULT_FEC_OVERHEAD: f64 = 0.0;
/// `auto` compresses a sample of this many bytes first and skips frames that do not shrink.
const AUTO_SAMPLE: usize = 64 << 10;

/// Compression policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressMode {
    /// Try a 64 KiB sample of each frame; compress only frames that shrink by at least 3%.
    /// Codec output (H.264, AAC …) does not shrink and costs almost nothing this way.
    Auto,
    /// Compress every frame (kept raw only if zstd made it larger).
    Zstd,
    /// Store frames as they are.
    None,
}

impl CompressMode {
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(CompressMode::Auto),
            "zstd" => Some(CompressMode::Zstd),
            "none" => Some(CompressMode::None),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PackOptions {
    pub title: String,
    pub cipher: Cipher,
    pub compress: CompressMode,
    pub zstd_level: i32,
    pub frame_size: u32,
    pub symbol_size: u32,
    /// Source/owner id carried in the head.
    pub watermark: Option<String>,
    /// Unencrypted advertisement archive (no key is created).
    pub advert: bool,
    /// Titles an advert plays with (signed into the head); empty: none.
    pub advert_for: Vec<String>,
    /// Leader or trailer of `advert_for`.
    pub placement: Placement,
    /// Unencrypted, unwatermarked plug-in/codec archive (no key is created).
    pub plugin: bool,
    /// Leaf hash of the manifest; `None` = [`super::manifest::LeafHash::auto`].
    pub leaf_hash: Option<super::manifest::LeafHash>,
    /// Replace an existing archive of the same title.
    pub force: bool,
    /// FEC repair symbols per data packet (0: none); see [`super::fec`].
    pub fec_overhead: f64,
    /// FEC source block size to aim for, in data packets.
    pub fec_block: u32,
}

impl PackOptions {
    pub fn new(title: &str) -> Self {
        PackOptions {
            title: title.to_string(),
            cipher: Cipher::Aes256Gcm,
            compress: CompressMode::Auto,
            zstd_level: 3,
            frame_size: DEFAULT_FRAME_SIZE,
            symbol_size: DEFAULT_SYMBOL_SIZE,
            watermark: None,
            advert: false,
            advert_for: Vec::new(),
            placement: Placement::Leader,
            plugin: false,
            leaf_hash: None,
            force: false,
            fec_overhead: DEFAULT_FEC_OVERHEAD,
            fec_block: super::fec::DEFAULT_SOURCE_BLOCK,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PackReport {
    pub path: PathBuf,
    pub head: Head,
    pub archive_len: u64,
    pub compressed_frames: u64,
    pub elapsed: Duration,
}

/// Pack `input` into `archive_dir/<title>.mca`, storing the master key in `keys`.
/// `progress` is called with the input bytes consumed so far.
pub fn pack(
    input: &Path,
    archive_dir: &Path,
    keys: &KeyStore,
    opts: &PackOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<PackReport, ArchiveError> {
    let started = Instant::now();
    let bad_opt = |why: String| ArchiveError::Input {
        path: input.to_path_buf(),
        why,
    };
    mcast_keys::store::validate_title(&opts.title)?;
    if !frame_size_ok(opts.frame_size) {
        return Err(bad_opt(format!(
            "frame size {} is out of range 1..={MAX_FRAME_SIZE}",
            opts.frame_size
        )));
    }
    if !symbol_size_ok(opts.symbol_size) {
        return Err(bad_opt(format!(
            "symbol size {} must be a multiple of {SYMBOL_SIZE_STEP} in {MIN_SYMBOL_SIZE}..={MAX_SYMBOL_SIZE}",
            opts.symbol_size
        )));
    }
    let watermark = opts.watermark.clone().unwrap_or_default();
    if watermark.len() > MAX_WATERMARK_LEN {
        return Err(bad_opt(format!(
            "watermark is longer than {MAX_WATERMARK_LEN} bytes"
        )));
    }
    if opts.plugin && opts.advert {
        return Err(bad_opt(
            "an archive is an advert or a plug-in, not both".into(),
        ));
    }
    if opts.plugin && !watermark.is_empty() {
        return Err(bad_opt("plug-in archives carry no watermark".into()));
    }
    if !opts.advert_for.is_empty() && !opts.advert {
        return Err(bad_opt(
            "only adverts (--advert) are associated with titles".into(),
        ));
    }
    if opts.advert_for.is_empty() && opts.placement != Placement::Leader {
        return Err(bad_opt(
            "a trailer needs the titles it follows (--for)".into(),
        ));
    }
    if opts.advert_for.len() > MAX_ADVERT_FOR {
        return Err(bad_opt(format!(
            "an advert is associated with at most {MAX_ADVERT_FOR} titles"
        )));
    }
    for t in &opts.advert_for {
        mcast_keys::store::validate_title(t)?;
        if t == &opts.title {
            return Err(bad_opt("an advert cannot be associated with itself".into()));
        }
    }
    let unencrypted = opts.advert || opts.plugin;
    let cipher = if unencrypted {
        Cipher::None
    } else {
        opts.cipher
    };
    if cipher == Cipher::None && !unencrypted {
        return Err(bad_opt(
            "cipher \"none\" is only for advertisements and plug-ins: use --advert or --plugin"
                .into(),
        ));
    }

    let mut src = File::open(input).map_err(|e| ArchiveError::Input {
        path: input.to_path_buf(),
        why: format!("cannot open input: {e}"),
    })?;
    if src.metadata().map_err(io_err(input))?.is_dir() {
        return Err(bad_opt("input is a directory, not a media file".into()));
    }
    std::fs::create_dir_all(archive_dir).map_err(io_err(archive_dir))?;
    let target = archive_path(archive_dir, &opts.title);
    if target.exists() && !opts.force {
        return Err(ArchiveError::Input {
            path: target,
            why: format!(
                "an archive for title {:?} already exists; use --force to replace it",
                opts.title
            ),
        });
    }
    let identity = keys.identity()?;

    let mut archive_id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut archive_id);
    let master = (!unencrypted).then(MasterKey::generate);
    let key_id = master
        .as_ref()
        .map(|m| m.key_id(&archive_id))
        .unwrap_or([0; 16]);

    let mut out = AtomicFile::create(&target).map_err(io_err(&target))?;
    let tmp_path = out.tmp_path().to_path_buf();
    let mut w = BufWriter::with_capacity(1 << 20, out.file());
    let werr = io_err(&tmp_path);
    w.write_all(&preamble_bytes()).map_err(werr)?;

    let leaf_hash = opts
        .leaf_hash
        .unwrap_or_else(|| super::manifest::LeafHash::auto(opts.symbol_size));
    let mut tree = TreeBuilder::new(&archive_id, opts.symbol_size, leaf_hash);
    // Encrypted titles: keyed, so the public head confirms nothing about the content.
    let mut plain_hasher = match &master {
        Some(k) => k.plain_hasher(&archive_id),
        None => blake3::Hasher::new(),
    };
    let mut zc =
        zstd::bulk::Compressor::new(opts.zstd_level).map_err(|e| bad_opt(format!("zstd: {e}")))?;
    let mut sampler = zstd::bulk::Compressor::new(1).map_err(|e| bad_opt(format!("zstd: {e}")))?;
    let mut plain = vec![0u8; opts.frame_size as usize];
    let mut payload: Vec<u8> = Vec::with_capacity(opts.frame_size as usize + 64);
    let (mut plain_len, mut data_len, mut index, mut compressed_frames) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let n = read_full(&mut src, &mut plain).map_err(|e| ArchiveError::Input {
            path: input.to_path_buf(),
            why: format!("read failed: {e}"),
        })?;
        if n == 0 {
            break;
        }
        let chunk = &plain[..n];
        plain_hasher.update(chunk);
        plain_len += n as u64;

        payload.clear();
        let zstd = compress_frame(opts.compress, chunk, &mut zc, &mut sampler, &mut payload);
        if zstd {
            compressed_frames += 1;
        } else {
            payload.extend_from_slice(chunk);
        }
        let stored_len = (payload.len() + cipher.tag_len()) as u32;
        let header = FrameHeader {
            zstd,
            index,
            plain_len: n as u32,
            stored_len,
            frame_key: aead::random_frame_key(),
        };
        let hb = header.encode();
        if let Some(m) = &master {
            let aad = frame_aad(&archive_id, &opts.title, &hb);
            aead::seal(cipher, m, &header.frame_key, &aad, &mut payload);
        }
        debug_assert_eq!(payload.len() as u32, stored_len);
        w.write_all(&hb).map_err(io_err(&tmp_path))?;
        w.write_all(&payload).map_err(io_err(&tmp_path))?;
        tree.update(&hb);
        tree.update(&payload);
        data_len += (hb.len() + payload.len()) as u64;
        index += 1;
        progress(plain_len);
        if n < plain.len() {
            break;
        }
    }

    // FEC: the frames region is on disk; read it back a source block at a time and append
    // each block's repair symbols (they follow the data in the file and in the manifest).
    w.flush().map_err(io_err(&tmp_path))?;
    let data_packets = data_len.div_ceil(opts.symbol_size as u64);
    // An empty title has nothing to protect.
    let fec = if opts.fec_overhead > 0.0 && data_packets > 0 {
        let fec = super::fec::FecShape::choose(
            data_packets,
            opts.fec_block,
            opts.fec_overhead,
            opts.symbol_size / 32,
        )
        .ok_or_else(|| {
            bad_opt(format!(
                "no FEC code for {data_packets} packets at overhead {}",
                opts.fec_overhead
            ))
        })?;
        let shape = super::fec::FecShape {
            source: fec.0 as u64,
            repair: fec.1 as u64,
            data_packets,
            blocks: data_packets.div_ceil(fec.0 as u64),
        };
        let s = opts.symbol_size as u64;
        let mut buf = Vec::new();
        for f in 0..shape.blocks {
            let r = shape.data_range(f);
            let (a, b) = (r.start * s, (r.end * s).min(data_len));
            buf.resize((b - a) as usize, 0);
            std::os::unix::fs::FileExt::read_exact_at(
                &**w.get_ref(),
                &mut buf,
                super::PREAMBLE_LEN + a,
            )
            .map_err(io_err(&tmp_path))?;
            let refs: Vec<&[u8]> = buf.chunks(s as usize).collect();
            // Every symbol of the code is hashed (extras too, for answers to NAKs); the
            // first `repair` are stored.
            let symbols = super::fec::encode_hashed(&refs, s as usize, shape.repair as usize)
                .map_err(|e| bad_opt(e.to_string()))?;
            for (j, sym) in symbols.iter().enumerate() {
                tree.push_repair(sym, symbols.len());
                if (j as u64) < shape.repair {
                    w.write_all(sym).map_err(io_err(&tmp_path))?;
                }
            }
        }
        Some(fec)
    } else {
        None
    };
    let (hash_region, block_hashes) = tree.finish();
    w.write_all(&hash_region).map_err(io_err(&tmp_path))?;
    let mut head = Head {
        advert: opts.advert,
        plugin: opts.plugin,
        advert_for: opts.advert_for.clone(),
        placement: opts.placement,
        leaf_hash,
        cipher,
        compression: if compressed_frames == 0 {
            Compression::None
        } else {
            Compression::Zstd
        },
        archive_id,
        key_id,
        title: opts.title.clone(),
        watermark,
        created_unix: crate::process::unix_secs(),
        plain_len,
        plain_hash: *plain_hasher.finalize().as_bytes(),
        plain_hash_keyed: master.is_some(),
        frame_size: opts.frame_size,
        frame_count: index,
        data_len,
        symbol_size: opts.symbol_size,
        block_symbols: opts.symbol_size / 32,
        repair_symbols: fec.map_or(0, |f| f.1),
        fec_source: fec.map_or(0, |f| f.0),
        server_key: identity.public(),
        block_hashes,
        signature: [0; 64],
    };
    head.sign(&identity);
    let head_bytes = head.encode();
    w.write_all(&head_bytes).map_err(io_err(&tmp_path))?;
    w.write_all(&tail_bytes(head_bytes.len() as u64))
        .map_err(io_err(&tmp_path))?;
    w.flush().map_err(io_err(&tmp_path))?;
    drop(w);
    let archive_len = out.file().metadata().map_err(io_err(&tmp_path))?.len();

    // Key before archive: a crash in between leaves an orphan key, never a keyless archive.
    if let Some(m) = &master {
        keys.put_title_key(&opts.title, &archive_id, m)?;
    }
    if let Err(e) = out.commit() {
        // The new archive never appeared: its key must not linger either.
        if master.is_some() {
            let _ = keys.remove_title_key(&opts.title, &archive_id);
        }
        return Err(io_err(&target)(e));
    }
    keys.prune_title_keys(&opts.title, master.as_ref().map(|_| &archive_id))?;

    Ok(PackReport {
        path: target,
        head,
        archive_len,
        compressed_frames,
        elapsed: started.elapsed(),
    })
}

/// Compress `chunk` into `out` if the policy says so and it pays; returns whether it did.
fn compress_frame(
    mode: CompressMode,
    chunk: &[u8],
    zc: &mut zstd::bulk::Compressor<'_>,
    sampler: &mut zstd::bulk::Compressor<'_>,
    out: &mut Vec<u8>,
) -> bool {
    match mode {
        CompressMode::None => return false,
        CompressMode::Auto if chunk.len() > AUTO_SAMPLE => {
            let sample = &chunk[..AUTO_SAMPLE];
            match sampler.compress(sample) {
                Ok(c) if c.len() * 100 <= sample.len() * 97 => {}
                _ => return false,
            }
        }
        _ => {}
    }
    out.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
    match zc.compress_to_buffer(chunk, out) {
        Ok(n) if n < chunk.len() && (mode == CompressMode::Zstd || n * 100 <= chunk.len() * 97) => {
            true
        }
        _ => {
            out.clear();
            false
        }
    }
}

/// Read until `buf` is full or the input ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
