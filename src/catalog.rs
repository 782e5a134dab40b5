//! `mcastd catalog`: what the archive directory holds.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::{ArchiveFile, ARCHIVE_EXT};

/// One archive in the catalogue, or the reason it could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    pub path: PathBuf,
    pub title: String,
    pub plain_bytes: u64,
    pub archive_bytes: u64,
    pub frames: u64,
    pub cipher: String,
    pub compression: String,
    /// plaintext bytes / stored frame bytes (1.00 = nothing saved).
    pub ratio: f64,
    pub advert: bool,
    /// A plug-in/codec archive.
    pub plugin: bool,
    /// Titles the advert plays with, and where (`leader`/`trailer`).
    pub advert_for: Vec<String>,
    pub placement: String,
    pub watermark: String,
    pub signed_by: String,
    pub packets_per_loop: u64,
    pub error: Option<String>,
}

/// Read every `*.mca` in `dir`, sorted by title. Unreadable archives are listed with the error.
pub fn scan(dir: &Path) -> std::io::Result<Vec<CatalogEntry>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().and_then(|x| x.to_str()) != Some(ARCHIVE_EXT) {
            continue;
        }
        out.push(match ArchiveFile::open(&path) {
            Ok(a) => {
                let h = &a.head;
                CatalogEntry {
                    title: h.title.clone(),
                    plain_bytes: h.plain_len,
                    archive_bytes: a.layout.file_len(),
                    frames: h.frame_count,
                    cipher: h.cipher.name().into(),
                    compression: h.compression.name().into(),
                    ratio: if h.data_len == 0 {
                        1.0
                    } else {
                        h.plain_len as f64 / h.data_len as f64
                    },
                    advert: h.advert,
                    plugin: h.plugin,
                    advert_for: h.advert_for.clone(),
                    placement: if h.advert_for.is_empty() {
                        String::new()
                    } else {
                        h.placement.name().into()
                    },
                    watermark: h.watermark.clone(),
                    signed_by: h.server_key.fingerprint(),
                    packets_per_loop: h.loop_packets(),
                    error: None,
                    path,
                }
            }
            Err(err) => CatalogEntry {
                title: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                plain_bytes: 0,
                archive_bytes: 0,
                frames: 0,
                cipher: String::new(),
                compression: String::new(),
                ratio: 0.0,
                advert: false,
                plugin: false,
                advert_for: Vec::new(),
                placement: String::new(),
                watermark: String::new(),
                signed_by: String::new(),
                packets_per_loop: 0,
                error: Some(err.to_string()),
                path,
            },
        });
    }
    out.sort_by(|a, b| a.title.cmp(&b.title));
    Ok(out)
}
