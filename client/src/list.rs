//! `mcast-recv list DIR`: the titles a download directory holds, complete or partial, and
//! whether what is there still verifies.

use std::path::{Path, PathBuf};

use mcast_io::archive::{self, ArchiveFile};
use serde::Serialize;

use crate::get::file_names;

/// One title found in the directory.
#[derive(Clone, Debug, Serialize)]
pub struct Held {
    pub title: String,
    /// `complete`, `partial`, or `damaged` (an archive or part file that does not open).
    pub state: &'static str,
    /// Payload held, in percent of what the title needs (100 for a complete archive).
    pub percent: f64,
    /// Archive bytes (of the finished file).
    pub archive_bytes: u64,
    /// `packets` (signature and every packet checked: `--verify`), `signature` (the signed
    /// head checked against the key that signed it), `no` (a partial download: its packets
    /// were checked as they arrived), or why the check failed.
    pub verified: String,
    /// Advert (plays without a ticket).
    pub advert: bool,
    /// The signed owner label (`mcastd pack --watermark`).
    pub owner: String,
    /// Fingerprint of the server key that signed the head.
    pub signed_by: String,
    pub path: PathBuf,
}

/// Scan `dir`; with `full`, every complete archive's packets are checked too (reads it all).
pub fn scan(dir: &Path, full: bool) -> std::io::Result<Vec<Held>> {
    let ext = archive::ARCHIVE_EXT;
    let mut titles: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        let stem = name
            .strip_suffix(&format!(".{ext}.part"))
            .or_else(|| name.strip_suffix(&format!(".{ext}")));
        if let Some(t) = stem {
            if !titles.iter().any(|x| x == t) {
                titles.push(t.to_string());
            }
        }
    }
    titles.sort();
    Ok(titles.into_iter().map(|t| one(dir, t, full)).collect())
}

fn one(dir: &Path, title: String, full: bool) -> Held {
    let (fin, part, _) = file_names(dir, &title);
    let partial = part.exists();
    let path = if partial { part } else { fin };
    let mut h = Held {
        title,
        state: "damaged",
        percent: 0.0,
        archive_bytes: 0,
        verified: "no".into(),
        advert: false,
        owner: String::new(),
        signed_by: String::new(),
        path,
    };
    let a = match ArchiveFile::open(&h.path) {
        Ok(a) => a,
        Err(e) => {
            h.verified = e.to_string();
            return h;
        }
    };
    h.archive_bytes = a.layout.file_len();
    h.advert = a.head.advert;
    h.owner = a.head.watermark.clone();
    h.signed_by = a.head.server_key.fingerprint();
    if partial {
        h.state = "partial";
        if let Some((have, all, _)) = crate::batch::held(dir, &h.title) {
            h.percent = if all == 0 {
                0.0
            } else {
                (have as f64 * 1000.0 / all as f64).floor() / 10.0
            };
        }
        return h;
    }
    let key = a.head.server_key;
    let checked = if full {
        archive::verify(&a, &key).map(|()| "packets")
    } else {
        a.verify_signature(&key).map(|()| "signature")
    };
    match checked {
        Ok(v) => {
            h.state = "complete";
            h.percent = 100.0;
            h.verified = v.into();
        }
        Err(e) => h.verified = format!("FAILED: {e}"),
    }
    h
}

/// A table for people.
pub fn table(items: &[Held]) -> String {
    let mut s = format!(
        "{:<24} {:<9} {:>6} {:>14} {:<6} {:<16} VERIFIED\n",
        "TITLE", "STATE", "HELD", "ARCHIVE", "KIND", "OWNER"
    );
    for h in items {
        s.push_str(&format!(
            "{:<24} {:<9} {:>5.1}% {:>14} {:<6} {:<16} {}\n",
            h.title,
            h.state,
            h.percent,
            crate::human::bytes(h.archive_bytes),
            if h.advert { "advert" } else { "title" },
            if h.owner.is_empty() { "-" } else { &h.owner },
            h.verified
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_foreign_directory_lists_nothing_and_junk_is_damaged() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("notes.txt"), b"x").unwrap();
        assert!(scan(d.path(), false).unwrap().is_empty());
        std::fs::write(d.path().join("film.mca"), b"not an archive").unwrap();
        let l = scan(d.path(), false).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].title.as_str(), l[0].state), ("film", "damaged"));
        assert!(table(&l).contains("damaged"));
    }
}
