//! `mcastd.toml`: one file, every field optional with a default that works on one machine.
//! `conf/mcastd.toml` documents every field. Unknown fields are errors, so a typo is reported
//! with its file, line and key instead of being silently ignored.

use std::path::{Path, PathBuf};

use mcast_keys::Cipher;
use serde::Deserialize;

use crate::archive::CompressMode;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub pack: PackConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of archives (`<title>.mca`), the catalogue this server loops.
    pub archive_dir: PathBuf,
    /// Key store: server identity and per-title master keys (0700 dir, 0600 files).
    pub key_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PackConfig {
    pub frame_size: u32,
    pub symbol_size: u32,
    pub cipher: String,
    pub compress: String,
    pub zstd_level: i32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "mcast=debug". `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: StoreConfig::default(),
            pack: PackConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            archive_dir: PathBuf::from("mcast-data/archives"),
            key_dir: PathBuf::from("mcast-data/keys"),
        }
    }
}

impl Default for PackConfig {
    fn default() -> Self {
        PackConfig {
            frame_size: crate::archive::pack::DEFAULT_FRAME_SIZE,
            symbol_size: crate::archive::pack::DEFAULT_SYMBOL_SIZE,
            cipher: "aes-256-gcm".into(),
            compress: "auto".into(),
            zstd_level: 3,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// A config problem, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field {field}: {why}")]
    Field {
        path: PathBuf,
        field: &'static str,
        why: String,
    },
}

impl Config {
    /// Load `path`, or the built-in defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let field = |field: &'static str, why: String| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            why,
        };
        self.pack_cipher()
            .map_err(|why| field("pack.cipher", why))?;
        self.pack_compress()
            .map_err(|why| field("pack.compress", why))?;
        let p = &self.pack;
        if p.frame_size == 0 || p.frame_size > crate::archive::head::MAX_FRAME_SIZE {
            return Err(field(
                "pack.frame_size",
                format!("{} is out of range 1..=67108864", p.frame_size),
            ));
        }
        if p.symbol_size % 32 != 0
            || !(crate::archive::head::MIN_SYMBOL_SIZE..=crate::archive::head::MAX_SYMBOL_SIZE)
                .contains(&p.symbol_size)
        {
            return Err(field(
                "pack.symbol_size",
                format!("{} must be a multiple of 32 in 256..=65504", p.symbol_size),
            ));
        }
        if !(1..=22).contains(&p.zstd_level) {
            return Err(field(
                "pack.zstd_level",
                format!("{} is out of range 1..=22", p.zstd_level),
            ));
        }
        Ok(())
    }

    pub fn pack_cipher(&self) -> Result<Cipher, String> {
        match Cipher::from_name(&self.pack.cipher) {
            Some(Cipher::None) | None => Err(format!(
                "{:?} is not a cipher; use \"aes-256-gcm\" or \"chacha20-poly1305\"",
                self.pack.cipher
            )),
            Some(c) => Ok(c),
        }
    }

    pub fn pack_compress(&self) -> Result<CompressMode, String> {
        CompressMode::from_name(&self.pack.compress).ok_or_else(|| {
            format!(
                "{:?} is not a compression mode; use \"auto\", \"zstd\" or \"none\"",
                self.pack.compress
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_parses_to_the_defaults() {
        let text = include_str!("../conf/mcastd.toml");
        let cfg = Config::parse(text, Path::new("conf/mcastd.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn bad_fields_are_named() {
        let p = Path::new("x.toml");
        let e = Config::parse("[pack]\ncipher = \"rot13\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("pack.cipher"), "{e}");
        let e = Config::parse("[pack]\nsymbol_size = 1000\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pack.symbol_size"), "{e}");
        let e = Config::parse("[store]\narchive_dri = \"x\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("archive_dri") && e.contains("x.toml"), "{e}");
        let e = Config::parse("[pack]\nframe_size = \"big\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame_size"), "{e}");
    }
}
