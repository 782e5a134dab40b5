//! Adverts that go with a title (FIG. 3: association rules, leader or trailer).
//!
//! Two sources, two uses. The server's catalogue (unauthenticated UDP) only *names candidates*:
//! adverts worth fetching with a title. What plays with a title is decided solely by the
//! signed heads of the archives on disk: an advert plays with `film` only if its head, signed
//! by the key that signed `film`'s head, is an advert associated with `film`. A forged
//! catalogue can waste a download, never put an advert in front of a film.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mcast_io::archive::head::Placement;
use mcast_io::archive::{self, ArchiveFile, ARCHIVE_EXT};
use mcast_keys::PublicIdentity;
use mcast_proto::wire::control::{CatalogItem, Control};
use serde::Serialize;

use crate::control::ControlClient;
use crate::error::{Failure, RecvError};
use crate::get::{get, GetOptions};

/// The server's whole catalogue (paged), with `tries` × `per_try` per page.
pub fn catalog(
    server: SocketAddr,
    dscp: mcast_io::dscp::Dscp,
    tries: u32,
    per_try: Duration,
) -> Result<Vec<CatalogItem>, RecvError> {
    let mut c = ControlClient::new(server, rand::random())?;
    // Marked like everything else this receiver sends (`--dscp`).
    dscp.apply(&c.sock)
        .map_err(|e| RecvError::new(Failure::Other, format!("control socket (--dscp): {e}")))?;
    let mut all = Vec::new();
    let mut start = 0u16;
    loop {
        match c.request(Control::CatalogRequest { start }, tries, per_try)? {
            Control::CatalogReply { items, more } => {
                let n = items.len();
                all.extend(items);
                if !more || n == 0 || all.len() >= u16::MAX as usize {
                    return Ok(all);
                }
                start = start.saturating_add(n as u16);
            }
            other => {
                return Err(RecvError::new(
                    Failure::Other,
                    format!("unexpected reply to a catalogue request: {other:?}"),
                ))
            }
        }
    }
}

/// Adverts the catalogue says go with `title`: candidates to fetch, nothing more.
pub fn candidates(items: &[CatalogItem], title: &str) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .filter(|i| i.advert && i.title != title && i.advert_for.iter().any(|t| t == title))
        .filter(|i| mcast_keys::store::validate_title(&i.title).is_ok())
        .map(|i| i.title.clone())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// A complete advert archive on disk whose head, signed by `trusted`, associates it with
/// `title`; `None` (with the reason) otherwise.
pub fn verified_advert(
    dir: &Path,
    advert: &str,
    title: &str,
    trusted: &PublicIdentity,
) -> Result<ArchiveFile, String> {
    let path = archive::archive_path(dir, advert);
    if !path.exists() {
        let part = dir.join(format!("{advert}.{ARCHIVE_EXT}.part"));
        return Err(if part.exists() {
            "its download is not complete".into()
        } else {
            "it has not been downloaded".into()
        });
    }
    let a = ArchiveFile::open(&path).map_err(|e| e.to_string())?;
    a.verify_signature(trusted).map_err(|e| e.to_string())?;
    let h = &a.head;
    if h.title != advert {
        return Err(format!("{} holds title {:?}", path.display(), h.title));
    }
    if !h.advert || !h.advert_for.iter().any(|t| t == title) {
        return Err(format!(
            "its signed head does not associate it with {title:?}"
        ));
    }
    Ok(a)
}

/// The adverts on disk that play with `title`: every complete `*.mca` in `dir` whose signed
/// head (by `trusted`) associates it with `title`, as (leaders, trailers), each by title.
pub fn local_adverts(
    dir: &Path,
    title: &str,
    trusted: &PublicIdentity,
) -> (Vec<ArchiveFile>, Vec<ArchiveFile>) {
    let (mut leaders, mut trailers) = (Vec::new(), Vec::new());
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (leaders, trailers);
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension().and_then(|x| x.to_str()) == Some(ARCHIVE_EXT))
                .then(|| p.file_stem()?.to_str().map(str::to_string))
                .flatten()
        })
        .filter(|n| n != title && mcast_keys::store::validate_title(n).is_ok())
        .collect();
    names.sort();
    for n in names {
        // Cheap first look (head only) before the signature check.
        let Ok(a) = ArchiveFile::open(&archive::archive_path(dir, &n)) else {
            continue;
        };
        if !a.head.advert || !a.head.advert_for.iter().any(|t| t == title) {
            continue;
        }
        match verified_advert(dir, &n, title, trusted) {
            Ok(a) => match a.head.placement {
                Placement::Leader => leaders.push(a),
                Placement::Trailer => trailers.push(a),
            },
            Err(why) => tracing::warn!(advert = %n, %title, %why, "advert not played"),
        }
    }
    (leaders, trailers)
}

/// What became of one advert of a `get`.
#[derive(Clone, Debug, Serialize)]
pub struct AdvertFetch {
    pub event: &'static str,
    pub title: String,
    pub advert_for: String,
    /// `present` (already complete), `fetched`, `not-associated` (its signed head does not
    /// name the title: it will not play with it), `failed`.
    pub status: &'static str,
    pub placement: Option<&'static str>,
    pub reason: String,
}

/// After `get` of `o.title`: fetch the adverts the catalogue names for it into the same
/// directory (skipping those already complete), and check each one's signed head. Failures
/// are reported, never fatal: the title itself is on disk.
pub fn fetch_for(o: &GetOptions, stop: Arc<AtomicBool>) -> Vec<AdvertFetch> {
    let items = match catalog(o.server, o.dscp, 2, Duration::from_millis(300)) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(title = %o.title, error = %e.message, "cannot read the catalogue: adverts not fetched");
            return Vec::new();
        }
    };
    // The key that signed the title (the download checked it against --server-key or the
    // known-servers file): adverts must be signed by the same server.
    let trusted = match ArchiveFile::open(&archive::archive_path(&o.out_dir, &o.title)) {
        Ok(a) => o.server_key.unwrap_or(a.head.server_key),
        Err(e) => {
            tracing::warn!(title = %o.title, error = %e, "title not on disk: adverts not fetched");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for ad in candidates(&items, &o.title) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut r = AdvertFetch {
            event: "advert",
            title: ad.clone(),
            advert_for: o.title.clone(),
            status: "present",
            placement: None,
            reason: String::new(),
        };
        if verified_advert(&o.out_dir, &ad, &o.title, &trusted).is_err() {
            let mut ao = o.clone();
            ao.title = ad.clone();
            ao.json = false;
            ao.progress_bar = false;
            ao.start_block = None;
            match get(&ao, stop.clone()) {
                Ok(_) => r.status = "fetched",
                Err(e) => {
                    r.status = "failed";
                    r.reason = e.message;
                }
            }
        }
        if r.status != "failed" {
            match verified_advert(&o.out_dir, &ad, &o.title, &trusted) {
                Ok(a) => r.placement = Some(a.head.placement.name()),
                Err(why) => {
                    r.status = "not-associated";
                    r.reason = why;
                }
            }
        }
        match r.status {
            "failed" | "not-associated" => {
                tracing::warn!(advert = %ad, title = %o.title, status = r.status, reason = %r.reason, "advert")
            }
            _ => {
                tracing::info!(advert = %ad, title = %o.title, status = r.status, placement = ?r.placement, "advert")
            }
        }
        if o.json {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
        }
        out.push(r);
    }
    out
}

/// Header of `mcast-recv catalog`.
pub fn catalog_header() -> String {
    format!(
        "{:<24} {:>14} {:>14} {:<7} {:<28} WATERMARK (unverified)",
        "TITLE", "PLAIN", "ARCHIVE", "KIND", "PLAYS WITH"
    )
}

/// One line of `mcast-recv catalog`. Associations and watermark are as the server lists
/// them (unauthenticated); `play` acts on and shows the signed ones.
pub fn catalog_line(i: &CatalogItem) -> String {
    let kind = if i.plugin {
        "plugin"
    } else if i.advert {
        "advert"
    } else {
        "title"
    };
    let with = if i.advert_for.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{}:{}",
            if i.trailer { "trailer" } else { "leader" },
            i.advert_for.join(",")
        )
    };
    // Control characters from the network are not written to the terminal.
    let clean = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
    format!(
        "{:<24} {:>14} {:>14} {:<7} {:<28} {}",
        clean(&i.title),
        crate::human::bytes(i.plain_len),
        crate::human::bytes(i.archive_len),
        kind,
        clean(&with),
        clean(&i.watermark)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_adverts_naming_the_title() {
        let item = |t: &str, advert: bool, f: &[&str]| CatalogItem {
            title: t.into(),
            advert,
            advert_for: f.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let items = [
            item("ad-2", true, &["film-1"]),
            item("ad-1", true, &["film-2", "film-1"]),
            item("ad-3", true, &["film-2"]),
            item("film-1", false, &[]),
            item("not-advert", false, &["film-1"]),
            item("film-1", true, &["film-1"]),
            item("../evil", true, &["film-1"]),
        ];
        assert_eq!(candidates(&items, "film-1"), ["ad-1", "ad-2"]);
        assert!(candidates(&items, "film-9").is_empty());
    }

    #[test]
    fn catalog_line_strips_control_characters() {
        let i = CatalogItem {
            title: "ad".into(),
            advert: true,
            trailer: true,
            advert_for: vec!["f".into()],
            watermark: "own\x1b[2Jer".into(),
            ..Default::default()
        };
        let l = catalog_line(&i);
        assert!(l.contains("trailer:f") && l.contains("own[2Jer") && !l.contains('\x1b'));
    }
}
