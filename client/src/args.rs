//! Command-line value parsers shared by the subcommands, and the deprecation notes of the
//! spellings the 0.1 command line used (kept working for one release).

use std::time::Duration;

/// A duration with its unit (`30s`, `1500ms`, `2m`, `1h30m`), as every duration flag takes it.
pub fn duration(s: &str) -> Result<Duration, String> {
    parse_with_bare_unit(s, None)
}

/// A duration; a bare number is read in seconds, as the 0.1 flags (`--timeout 30`) did, with a
/// deprecation warning.
pub fn duration_or_secs(s: &str) -> Result<Duration, String> {
    parse_with_bare_unit(s, Some(("s", Duration::from_secs)))
}

/// A duration; a bare number is read in milliseconds, as the 0.1 `-ms` flags
/// (`--silence-timeout-ms 3000`) did, with a deprecation warning.
pub fn duration_or_ms(s: &str) -> Result<Duration, String> {
    parse_with_bare_unit(s, Some(("ms", Duration::from_millis)))
}

type BareUnit = (&'static str, fn(u64) -> Duration);

fn parse_with_bare_unit(s: &str, bare: Option<BareUnit>) -> Result<Duration, String> {
    let t = s.trim();
    if let (Some((unit, make)), Ok(n)) = (bare, t.parse::<u64>()) {
        deprecated(&format!(
            "a duration without a unit ({t:?}) is read as {t}{unit}; write \"{t}{unit}\""
        ));
        return Ok(make(n));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{e}: give a number with a unit, e.g. 30s, 1500ms, 2m, 1h"))
}

/// Say that a spelling is deprecated (stderr: logging may not be set up yet while arguments
/// are parsed).
pub fn deprecated(what: &str) {
    eprintln!(
        "mcast-recv: warning: deprecated: {what} (the old spelling goes in the next release)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_old_bare_numbers_keep_their_unit() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(duration("30").unwrap_err().contains("with a unit"));
        assert!(duration("soon").is_err());
        assert_eq!(duration_or_secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration_or_secs("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration_or_ms("3000"), Ok(Duration::from_millis(3000)));
        assert_eq!(duration_or_ms("3s"), Ok(Duration::from_secs(3)));
    }
}
