//! What every program of the suite (`mcastd`, `mcast-director`, `mcast-recv`) sets up the same
//! way: logs to stderr through `tracing`, a stop flag raised by SIGINT/SIGTERM, and the wall
//! clock ([`unix_ms`] for heartbeats, [`unix_secs`] for tickets, schedules and archive heads):
//! the one place the suite reads the time of day.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Logs to stderr at `level` (an `EnvFilter` directive, e.g. `info` or `mcastd=debug`);
/// `RUST_LOG` wins when set. Colour only when stderr is a terminal and `NO_COLOR` is unset
/// (no escape codes in log files and pipes). A directive that does not parse is an error
/// naming it, for the caller to report as a usage error.
pub fn init_logging(level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => tracing_subscriber::EnvFilter::try_new(&env)
            .map_err(|e| format!("RUST_LOG={env:?} is not a log filter: {e}"))?,
        _ => tracing_subscriber::EnvFilter::try_new(level).map_err(|e| {
            format!(
                "log level {level:?} is not a log filter (try info, debug, or mcastd=debug): {e}"
            )
        })?,
    };
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

/// A flag that SIGINT and SIGTERM set: long-running loops check it and stop cleanly.
pub fn stop_flag() -> std::io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(stop)
}

/// Time since the Unix epoch (zero if the clock is before it).
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}
