//! The `mcastd` binary end to end: keygen, pack, catalog, verify, unpack, and how it reports
//! bad input (exit status 1), bad usage or config (2) and failed integrity checks (3).

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

const EXIT_FAILURE: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_INTEGRITY: i32 = 3;

mod common;
use common::random_bytes;

fn text_bytes(len: usize) -> Vec<u8> {
    b"a multicast carousel loops pre-encrypted archives. "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    fn failed(self, code: i32) -> Out {
        assert_eq!(self.code, code, "wrong exit status: {self:#?}");
        self
    }

    fn stderr_has(&self, parts: &[&str]) -> &Out {
        for p in parts {
            assert!(
                self.stderr.contains(p),
                "stderr does not contain {p:?}: {self:#?}"
            );
        }
        self
    }
}

fn mcastd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mcastd"));
    c.env_remove("MCASTD_CONFIG").env_remove("RUST_LOG");
    c
}

fn run(mut c: Command) -> Out {
    let o = c.output().expect("run mcastd");
    Out {
        code: o.status.code().expect("mcastd killed by a signal"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A temp dir with a config pointing the archive and key dirs into it.
struct Site {
    dir: TempDir,
    cfg: PathBuf,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::Builder::new()
            .prefix("mcast-cli-")
            .tempdir_in(std::env::temp_dir())
            .unwrap();
        let site = Site {
            cfg: dir.path().join("mcastd.toml"),
            dir,
        };
        site.write_config(&site.archive_dir(), &site.key_dir(), "");
        fs::create_dir_all(site.out_dir()).unwrap();
        site
    }

    fn write_config(&self, archive_dir: &Path, key_dir: &Path, extra: &str) {
        fs::write(
            &self.cfg,
            format!(
                "[store]\narchive_dir = '{}'\nkey_dir = '{}'\n\n[pack]\nframe_size = 65536\n\
                 symbol_size = 1280\n{extra}\n[log]\nlevel = \"warn\"\n",
                archive_dir.display(),
                key_dir.display()
            ),
        )
        .unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn archive_dir(&self) -> PathBuf {
        self.path("archives")
    }

    fn key_dir(&self) -> PathBuf {
        self.path("keys")
    }

    fn out_dir(&self) -> PathBuf {
        self.path("out")
    }

    fn archive(&self, title: &str) -> PathBuf {
        self.archive_dir().join(format!("{title}.mca"))
    }

    fn input(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        p
    }

    fn cmd<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        let mut c = mcastd();
        c.current_dir(self.dir.path())
            .arg("--config")
            .arg(&self.cfg);
        c.args(args);
        run(c)
    }

    fn keygen(&self) {
        self.cmd(&["keygen"]).ok();
    }

    fn pack(&self, input: &Path, title: &str, extra: &[&str]) -> Out {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("pack"),
            input.as_os_str(),
            OsStr::new("--title"),
            OsStr::new(title),
        ];
        args.extend(extra.iter().map(OsStr::new));
        self.cmd(&args)
    }

    fn unpack(&self, archive: &str, out: &Path) -> Out {
        self.cmd(&[
            OsStr::new("unpack"),
            OsStr::new(archive),
            OsStr::new("-o"),
            out.as_os_str(),
        ])
    }

    /// The output dir holds exactly `names` (no temp files, nothing else).
    fn assert_out_dir(&self, names: &[&str]) {
        let mut got: Vec<String> = fs::read_dir(self.out_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "output dir contents");
    }

    /// The single key file of a title.
    fn key_file(&self, title: &str) -> PathBuf {
        let dir = self.key_dir().join("titles").join(title);
        let files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.into_iter().next().unwrap()
    }
}

/// Run mcastd with `args` in a fresh temp dir (never in the source tree: some commands
/// create `./mcast-data` under the built-in defaults).
fn run_in_temp(args: &[&str]) -> Out {
    let dir = tempfile::Builder::new()
        .prefix("mcast-cli-")
        .tempdir_in(std::env::temp_dir())
        .unwrap();
    let mut c = mcastd();
    c.current_dir(dir.path()).args(args);
    run(c)
}

#[test]
fn help_and_version() {
    let o = run_in_temp(&["--help"]).ok();
    for word in [
        "keygen",
        "pack",
        "unpack",
        "verify",
        "catalog",
        "--config",
        "Exit status",
    ] {
        assert!(
            o.stdout.contains(word),
            "--help lacks {word:?}:\n{}",
            o.stdout
        );
    }
    let o = run_in_temp(&["help", "pack"]).ok();
    for word in ["--title", "--cipher", "--compress", "--advert", "--force"] {
        assert!(o.stdout.contains(word), "help pack lacks {word:?}");
    }
    let o = run_in_temp(&["pack", "--help"]).ok();
    assert!(o.stdout.contains("--watermark"), "{o:?}");
    let o = run_in_temp(&["--version"]).ok();
    assert!(o.stdout.starts_with("mcastd "), "{}", o.stdout);
    // An unknown subcommand or option is a usage error.
    run_in_temp(&["frobnicate"]).failed(EXIT_USAGE);
    run_in_temp(&["catalog", "--frobnicate"]).failed(EXIT_USAGE);
    // A required argument missing.
    run_in_temp(&["pack", "x.raw"])
        .failed(EXIT_USAGE)
        .stderr_has(&["--title"]);
}

#[test]
fn keygen_pack_catalog_verify_unpack() {
    let site = Site::new();
    let o = site.cmd(&["keygen"]).ok();
    assert!(o.stdout.starts_with("server identity "), "{}", o.stdout);
    let hex_key = o.stdout.split_whitespace().nth(2).unwrap();
    assert_eq!(hex_key.len(), 64);
    assert!(site.key_dir().join("identity.ed25519").exists());
    // A second keygen refuses to replace the identity.
    site.cmd(&["keygen"])
        .failed(EXIT_FAILURE)
        .stderr_has(&["already exists", "--force"]);

    let movie = random_bytes(300_000, 1);
    let ad = text_bytes(70_000);
    let doc = text_bytes(200_001);
    let movie_in = site.input("movie.raw", &movie);
    let ad_in = site.input("ad.raw", &ad);
    let doc_in = site.input("doc.raw", &doc);

    let o = site.pack(&movie_in, "movie", &[]).ok();
    assert!(
        o.stdout.contains("packed") && o.stdout.contains("movie.mca"),
        "{o:?}"
    );
    assert!(o.stdout.contains("aes-256-gcm"), "{o:?}");
    site.pack(&ad_in, "ad", &["--advert", "--watermark", "sponsor-9"])
        .ok();
    let o = site
        .pack(
            &doc_in,
            "doc",
            &[
                "--cipher",
                "chacha20-poly1305",
                "--compress",
                "zstd",
                "--frame-size",
                "100000",
                "--symbol-size",
                "512",
            ],
        )
        .ok();
    assert!(o.stdout.contains("chacha20-poly1305"), "{o:?}");
    for t in ["movie", "ad", "doc"] {
        assert!(site.archive(t).exists(), "{t}");
    }
    // No temp files in the archive dir.
    for e in fs::read_dir(site.archive_dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".mca") && !name.starts_with('.'), "{name}");
    }

    // Catalogue, as a table...
    let o = site.cmd(&["catalog"]).ok();
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines[0].starts_with("TITLE"), "{}", o.stdout);
    assert_eq!(lines.len(), 4, "{}", o.stdout);
    // Sorted by title.
    assert!(lines[1].starts_with("ad "), "{}", o.stdout);
    assert!(lines[2].starts_with("doc "), "{}", o.stdout);
    assert!(lines[3].starts_with("movie "), "{}", o.stdout);
    assert!(lines[1].contains("yes") && lines[1].contains("sponsor-9"));
    assert!(lines[1].contains("none"), "adverts are not encrypted");
    assert!(lines[2].contains("chacha20-poly1305") && lines[2].contains("200001"));
    assert!(lines[3].contains("aes-256-gcm") && lines[3].contains("300000"));
    assert!(lines[3].contains(" no "), "{}", lines[3]);

    // ...and as JSON lines.
    let o = site.cmd(&["catalog", "--json"]).ok();
    let entries: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 3);
    let titles: Vec<&str> = entries
        .iter()
        .map(|e| e["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["ad", "doc", "movie"]);
    let fingerprint = &hex_key[..16];
    for (e, (plain, cipher, advert)) in entries.iter().zip([
        (70_000u64, "none", true),
        (200_001, "chacha20-poly1305", false),
        (300_000, "aes-256-gcm", false),
    ]) {
        assert_eq!(e["plain_bytes"].as_u64(), Some(plain), "{e}");
        assert_eq!(e["cipher"], cipher, "{e}");
        assert_eq!(e["advert"], advert, "{e}");
        assert_eq!(e["signed_by"], fingerprint, "{e}");
        assert!(e["error"].is_null(), "{e}");
        let path = PathBuf::from(e["path"].as_str().unwrap());
        assert_eq!(
            e["archive_bytes"].as_u64(),
            Some(fs::metadata(&path).unwrap().len())
        );
        assert!(e["packets_per_loop"].as_u64().unwrap() > 0);
    }
    assert_eq!(entries[0]["watermark"], "sponsor-9");
    assert_eq!(entries[1]["compression"], "zstd");
    assert!(
        entries[1]["ratio"].as_f64().unwrap() > 5.0,
        "text compresses: {}",
        entries[1]
    );
    assert_eq!(entries[2]["frames"].as_u64(), Some(5)); // 300000 / 65536 from the config

    // Verify by title and by path.
    let o = site.cmd(&["verify", "movie"]).ok();
    assert!(o.stdout.contains("verified"), "{o:?}");
    let doc_path = site.archive("doc");
    site.cmd(&[OsStr::new("verify"), doc_path.as_os_str()]).ok();

    // Unpack each, by title and by path, byte exact.
    for (arg, want, name) in [
        ("movie".to_string(), &movie, "movie.out"),
        ("ad".to_string(), &ad, "ad.out"),
        (doc_path.display().to_string(), &doc, "doc.out"),
    ] {
        let out = site.out_dir().join(name);
        let o = site.unpack(&arg, &out).ok();
        assert!(o.stdout.contains("unpacked") && o.stdout.contains("verified"));
        assert!(fs::read(&out).unwrap() == *want, "{arg}");
    }
    site.assert_out_dir(&["ad.out", "doc.out", "movie.out"]);

    // An empty input packs and unpacks to an empty file.
    let empty_in = site.input("empty.raw", b"");
    site.pack(&empty_in, "empty", &[]).ok();
    let out = site.out_dir().join("empty.out");
    site.unpack("empty", &out).ok();
    assert_eq!(fs::read(&out).unwrap(), b"");
}

#[test]
fn catalog_of_an_empty_archive_dir() {
    let site = Site::new();
    site.keygen();
    fs::create_dir_all(site.archive_dir()).unwrap();
    let o = site.cmd(&["catalog"]).ok();
    assert!(o.stdout.contains("(no archives in"), "{o:?}");
    let o = site.cmd(&["catalog", "--json"]).ok();
    assert_eq!(o.stdout, "");
    // A broken file is listed with its error, not fatal.
    fs::write(site.archive("junk"), b"not an archive at all, just text").unwrap();
    let o = site.cmd(&["catalog"]).ok();
    assert!(
        o.stdout.contains("junk") && o.stdout.contains("unreadable"),
        "{o:?}"
    );
    let o = site.cmd(&["catalog", "--json"]).ok();
    let e: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains("not an mcast archive"));
}

#[test]
fn missing_input_file_is_named() {
    let site = Site::new();
    site.keygen();
    let missing = site.path("no/such/movie.raw");
    let o = site.pack(&missing, "movie", &[]);
    assert_ne!(o.code, 0);
    o.failed(EXIT_FAILURE)
        .stderr_has(&[missing.to_str().unwrap(), "cannot open input"]);
    assert!(!site.archive("movie").exists());

    // A directory as input.
    let o = site
        .pack(&site.out_dir(), "movie", &[])
        .failed(EXIT_FAILURE);
    o.stderr_has(&["directory"]);

    // Unpacking or verifying a title that was never packed names the file it looked for.
    let out = site.out_dir().join("x");
    let o = site.unpack("nothing", &out);
    assert_ne!(o.code, 0);
    o.stderr_has(&["nothing.mca"]);
    assert!(!out.exists());
    let o = site.cmd(&["verify", "nothing"]);
    assert_ne!(o.code, 0);
    o.stderr_has(&["nothing.mca"]);
}

#[test]
fn unusable_key_store_is_named() {
    let site = Site::new();
    // key_dir below a regular file: cannot be created or read (even by root).
    let blocker = site.input("blocker", b"I am a file");
    let key_dir = blocker.join("keys");
    site.write_config(&site.archive_dir(), &key_dir, "");
    let input = site.input("movie.raw", &random_bytes(1000, 2));
    let blocker_s = blocker.to_str().unwrap();
    let o = site.cmd(&["keygen"]).failed(EXIT_FAILURE);
    o.stderr_has(&["key store", blocker_s]);
    let o = site.pack(&input, "movie", &[]).failed(EXIT_FAILURE);
    o.stderr_has(&["key store", blocker_s]);
    assert!(!site.archive("movie").exists());
    let out = site.out_dir().join("m");
    site.unpack("movie", &out)
        .failed(EXIT_FAILURE)
        .stderr_has(&[blocker_s]);

    // A key store without an identity: pack says to run keygen.
    site.write_config(&site.archive_dir(), &site.key_dir(), "");
    let o = site.pack(&input, "movie", &[]).failed(EXIT_FAILURE);
    o.stderr_has(&["no server identity", "keygen"]);
    assert!(!site.archive("movie").exists());

    // An identity file of the wrong size is reported as corrupt, naming the file.
    site.keygen();
    let id = site.key_dir().join("identity.ed25519");
    fs::write(&id, b"short").unwrap();
    let o = site.pack(&input, "movie", &[]).failed(EXIT_FAILURE);
    o.stderr_has(&[id.to_str().unwrap(), "expected 32 bytes"]);
}

#[test]
fn existing_title_needs_force() {
    let site = Site::new();
    site.keygen();
    let v1 = random_bytes(100_000, 3);
    let v2 = random_bytes(150_000, 4);
    let in1 = site.input("v1.raw", &v1);
    let in2 = site.input("v2.raw", &v2);
    site.pack(&in1, "film", &[]).ok();
    let before = fs::read(site.archive("film")).unwrap();
    let key_before = site.key_file("film");

    let o = site.pack(&in2, "film", &[]).failed(EXIT_FAILURE);
    o.stderr_has(&["already exists", "--force", "film"]);
    assert_eq!(fs::read(site.archive("film")).unwrap(), before);
    assert_eq!(site.key_file("film"), key_before);

    site.pack(&in2, "film", &["--force"]).ok();
    assert_ne!(site.key_file("film"), key_before, "old key pruned");
    let out = site.out_dir().join("film.out");
    site.unpack("film", &out).ok();
    assert!(fs::read(&out).unwrap() == v2);
}

#[test]
fn bad_config_is_a_usage_error_naming_file_and_field() {
    let site = Site::new();
    let cases: &[(&str, &[&str])] = &[
        (
            "[store]\narchive_dri = 'x'\n",
            &["archive_dri", "unknown field"],
        ),
        ("[paack]\nframe_size = 1\n", &["paack"]),
        ("[pack]\ncipher = 'rot13'\n", &["pack.cipher", "rot13"]),
        ("[pack]\ncipher = 'none'\n", &["pack.cipher"]),
        (
            "[pack]\nframe_size = 'big'\n",
            &["frame_size", "invalid type"],
        ),
        ("[store]\nkey_dir = 5\n", &["key_dir", "invalid type"]),
        (
            "[pack]\nsymbol_size = 1000\n",
            &["pack.symbol_size", "1000"],
        ),
        ("[pack]\nframe_size = 0\n", &["pack.frame_size"]),
        ("[pack]\nzstd_level = 0\n", &["pack.zstd_level"]),
        ("[pack]\ncompress = 'lz4'\n", &["pack.compress", "lz4"]),
        ("[log]\nlevel = 3\n", &["level"]),
        ("[pack\n", &["TOML parse error"]),
    ];
    let cfg = site.cfg.to_str().unwrap();
    for (text, want) in cases {
        fs::write(&site.cfg, text).unwrap();
        for sub in [&["catalog"][..], &["keygen"][..]] {
            let o = site.cmd(sub).failed(EXIT_USAGE);
            o.stderr_has(&[cfg]).stderr_has(want);
        }
        // MCASTD_CONFIG is read the same way.
        let mut c = mcastd();
        c.current_dir(site.dir.path())
            .env("MCASTD_CONFIG", &site.cfg)
            .arg("catalog");
        run(c)
            .failed(EXIT_USAGE)
            .stderr_has(&[cfg])
            .stderr_has(want);
    }
    // Nothing was created by the refused commands.
    assert!(!site.key_dir().exists());

    // A config file that does not exist.
    let missing = site.path("nope.toml");
    let mut c = mcastd();
    c.current_dir(site.dir.path())
        .arg("--config")
        .arg(&missing)
        .arg("catalog");
    run(c)
        .failed(EXIT_USAGE)
        .stderr_has(&[missing.to_str().unwrap(), "cannot read"]);

    // Bad values on the command line are usage errors too.
    site.write_config(&site.archive_dir(), &site.key_dir(), "");
    site.keygen();
    let input = site.input("m.raw", b"hello");
    site.pack(&input, "m", &["--cipher", "rot13"])
        .failed(EXIT_USAGE)
        .stderr_has(&["--cipher", "rot13"]);
    site.pack(&input, "m", &["--cipher", "none"])
        .failed(EXIT_USAGE)
        .stderr_has(&["--cipher"]);
    site.pack(&input, "m", &["--compress", "lz4"])
        .failed(EXIT_USAGE)
        .stderr_has(&["--compress", "lz4"]);
    site.pack(&input, "m", &["--frame-size", "big"])
        .failed(EXIT_USAGE);
    // Options the library refuses are named.
    let o = site.pack(&input, "m", &["--symbol-size", "1000"]);
    assert_ne!(o.code, 0);
    o.stderr_has(&["symbol size 1000"]);
    let o = site.pack(&input, "../evil", &[]);
    assert_ne!(o.code, 0);
    o.stderr_has(&["invalid title"]);
    assert!(!site.archive("m").exists());
}

#[test]
fn tampered_archive_exits_3_and_writes_nothing() {
    let site = Site::new();
    site.keygen();
    let data = random_bytes(200_000, 5);
    let input = site.input("film.raw", &data);
    site.pack(&input, "film", &["--compress", "none"]).ok();
    let path = site.archive("film");
    let pristine = fs::read(&path).unwrap();
    let out = site.out_dir().join("film.out");

    // A bit in the frames region: data packet 0 (bytes 16..16+1280) no longer matches.
    let mut t = pristine.clone();
    t[16 + 100] ^= 0x01;
    fs::write(&path, &t).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["data packet 0 ", "film.mca"]);
    assert!(!out.exists());
    site.assert_out_dir(&[]);
    site.cmd(&["verify", "film"])
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["data packet 0 "]);

    // A bit deep in the frames region names that packet.
    let mut t = pristine.clone();
    let serial = 100;
    t[16 + serial * 1280 + 7] ^= 0x40;
    fs::write(&path, &t).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&[&format!("data packet {serial} ")]);
    site.assert_out_dir(&[]);

    // The signature at the end of the head.
    let mut t = pristine.clone();
    let at = t.len() - 16 - 10;
    t[at] ^= 0x01;
    fs::write(&path, &t).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["signature"]);
    site.cmd(&["verify", "film"])
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["signature"]);
    site.assert_out_dir(&[]);

    // Truncated.
    fs::write(&path, &pristine[..pristine.len() - 1]).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["not an mcast archive"]);
    site.assert_out_dir(&[]);

    // The key file holds another key: wrong key, also an integrity failure.
    fs::write(&path, &pristine).unwrap();
    let key_file = site.key_file("film");
    let real_key = fs::read(&key_file).unwrap();
    fs::write(&key_file, [0x5au8; 32]).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["not the key", "\"film\""]);
    site.assert_out_dir(&[]);
    // A key file of the wrong size is a key store failure (1).
    fs::write(&key_file, [0x5au8; 31]).unwrap();
    site.unpack("film", &out)
        .failed(EXIT_FAILURE)
        .stderr_has(&[key_file.to_str().unwrap()]);

    // Restored: it unpacks, and an existing output file is replaced atomically.
    fs::write(&key_file, &real_key).unwrap();
    fs::write(&out, b"old").unwrap();
    site.unpack("film", &out).ok();
    assert!(fs::read(&out).unwrap() == data);
    site.assert_out_dir(&["film.out"]);

    // A refused unpack leaves an existing output file alone.
    let mut t = pristine.clone();
    t[16 + 5000] ^= 0x08;
    fs::write(&path, &t).unwrap();
    site.unpack("film", &out).failed(EXIT_INTEGRITY);
    assert!(fs::read(&out).unwrap() == data);
    site.assert_out_dir(&["film.out"]);
}

/// Offset of the archive id in the head of the archive at `path`.
fn archive_id_offset(path: &Path) -> usize {
    let raw = fs::read(path).unwrap();
    let n = raw.len();
    let head_len = u64::from_le_bytes(raw[n - 16..n - 8].try_into().unwrap()) as usize;
    // "MCHD" version flags cipher compression, then archive_id.
    n - 16 - head_len + 8
}

#[test]
fn tampered_head_identity_fields_exit_3() {
    let site = Site::new();
    site.keygen();
    let input = site.input("film.raw", &random_bytes(10_000, 6));
    site.pack(&input, "film", &[]).ok();
    let path = site.archive("film");
    let mut t = fs::read(&path).unwrap();
    t[archive_id_offset(&path)] ^= 0x01;
    fs::write(&path, &t).unwrap();
    let out = site.out_dir().join("film.out");
    // `verify` gets it right...
    site.cmd(&["verify", "film"])
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["signature"]);
    // ...`unpack` must too.
    site.unpack("film", &out)
        .failed(EXIT_INTEGRITY)
        .stderr_has(&["signature"]);
    site.assert_out_dir(&[]);
}

/// Logs: a filter that does not parse (`--log`, or `RUST_LOG`) is a usage error naming it,
/// not a silent fall-back to `info`; and logs written to a pipe carry no colour codes.
#[test]
fn log_filters_are_checked_and_pipes_get_no_colour() {
    run_in_temp(&["--log", "mcastd=loud", "keygen"])
        .failed(2)
        .stderr_has(&["log level \"mcastd=loud\" is not a log filter"]);
    let mut c = mcastd();
    c.env("RUST_LOG", "=[").args(["--help"]);
    // --help is answered before logging starts.
    assert_eq!(run(c).code, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut c = mcastd();
    c.current_dir(dir.path())
        .env("RUST_LOG", "x=[")
        .arg("keygen");
    run(c)
        .failed(2)
        .stderr_has(&["RUST_LOG=\"x=[\" is not a log filter"]);
    let o = Command::new(common::recv_bin())
        .args(["--log", "what=ever=now", "stats", "--server", "127.0.0.1:9"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // Info lines of a real command, on a pipe: plain text.
    let dir = tempfile::tempdir().unwrap();
    let mut c = mcastd();
    c.current_dir(dir.path()).arg("keygen");
    let out = run(c).ok();
    assert!(out.stderr.contains("server identity created"), "{out:#?}");
    assert!(
        !out.stderr.contains('\u{1b}'),
        "colour codes on a pipe: {out:#?}"
    );
}

/// `completions SHELL` and the hidden `man DIR` (the Debian package's completions and manual
/// pages) of every program work without a config, even with a broken one named.
#[test]
fn completions_and_man_pages_need_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    fs::write(&broken, "[server\n").unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mcastd"));
    for (name, path) in [
        ("mcastd", bin.clone()),
        (
            "mcast-director",
            PathBuf::from(env!("CARGO_BIN_EXE_mcast-director")),
        ),
        ("mcast-recv", bin.with_file_name("mcast-recv")),
    ] {
        let cmd = |args: &[&str]| {
            let mut c = Command::new(&path);
            c.args(args).env_remove("RUST_LOG");
            if name != "mcast-recv" {
                c.arg("--config").arg(&broken);
            }
            run(c)
        };
        for shell in ["bash", "zsh", "fish"] {
            let o = cmd(&["completions", shell]).ok();
            assert!(
                o.stdout.contains(name) && o.stdout.contains("completions"),
                "{name} completions {shell}: {o:?}"
            );
        }
        cmd(&["completions", "tcsh"]).failed(EXIT_USAGE);
        let man = dir.path().join(format!("man-{name}"));
        let o = cmd(&["man", man.to_str().unwrap()]).ok();
        let page = fs::read_to_string(man.join(format!("{name}.1"))).unwrap();
        assert!(
            page.contains(".TH") && page.contains("completions"),
            "{page}"
        );
        assert!(o.stdout.contains(&format!("{name}.1")), "{o:?}");
        // One page per visible subcommand, none for the hidden `man`.
        assert!(man.join(format!("{name}-completions.1")).exists());
        assert!(!man.join(format!("{name}-man.1")).exists());
        // `man` is not advertised in --help.
        let help = cmd(&["--help"]).ok();
        assert!(!help.stdout.contains("\n  man "), "{}", help.stdout);
        // An unwritable place is a failure naming it.
        cmd(&["man", broken.join("x").to_str().unwrap()])
            .failed(EXIT_FAILURE)
            .stderr_has(&["broken.toml", "writable"]);
    }
    assert!(fs::metadata(dir.path().join("man-mcastd/mcastd-ticket-issue.1")).is_ok());
}
