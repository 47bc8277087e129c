//! How every flowattr binary logs: through `tracing`, to stderr, one event a line, filtered
//! by `RUST_LOG` (default `info`; e.g. `RUST_LOG=flowattr_collector=debug,rdkafka=warn`), as
//! text, or as one JSON object a line with `FLOWATTR_LOG_FORMAT=json` (for a log shipper).
//! Lines a script waits for (`... ready: ...`) and a start-up failure's one line are not logs:
//! the binaries print those plainly.

use tracing_subscriber::EnvFilter;

/// The environment variable that picks the format: `text` (the default) or `json`.
pub const FORMAT_VARIABLE: &str = "FLOWATTR_LOG_FORMAT";

/// Installs the subscriber. A `RUST_LOG` that does not parse is said, and `info` used.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) => EnvFilter::try_new(&text).unwrap_or_else(|error| {
            eprintln!("RUST_LOG={text:?} does not parse ({error}): logging at info");
            EnvFilter::new("info")
        }),
        Err(_) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match std::env::var(FORMAT_VARIABLE).as_deref() {
        Ok("json") => builder.json().try_init(),
        _ => builder.with_ansi(false).try_init(),
    };
}
