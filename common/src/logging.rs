//! How every flowattr binary logs: through `tracing`, to stderr, one event a line, filtered
//! by `RUST_LOG` (default `info`; e.g. `RUST_LOG=flowattr_collector=debug,librdkafka=warn`),
//! as text, or as one JSON object a line with `--log-format json` (or
//! `FLOWATTR_LOG_FORMAT=json`; for a log shipper). What the libraries underneath log through
//! the `log` crate (glommio, rustls, and librdkafka's own log, target `librdkafka`) comes out
//! the same way. A line a script waits for (`... ready: ...`, through [`announce`]) and a
//! start-up failure's one line are not logs: they are written plainly, in either format.

use tracing_subscriber::EnvFilter;

/// The environment variable that picks the format when `--log-format` is not given.
pub const FORMAT_VARIABLE: &str = "FLOWATTR_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

impl LogFormat {
    /// As [`FORMAT_VARIABLE`] says, for a process with no `--log-format` of its own (a child
    /// of a binary that sets it for them: see [`init`]).
    pub fn from_environment() -> LogFormat {
        std::env::var(FORMAT_VARIABLE)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or_default()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

static CHOSEN: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format [`init`] installed, for the child processes a binary starts (they log to the
/// same stderr, so they must write as it does).
pub fn format() -> LogFormat {
    CHOSEN.get().copied().unwrap_or_default()
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is neither text nor json")),
        }
    }
}

/// Writes `line` on stderr as it is, in either log format: the one line a script or test waits
/// for before it uses a binary (`flowattr-collector ready: ...`), whose words are a contract.
pub fn announce(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Installs the subscriber, writing `format`. A `RUST_LOG` that does not parse is said, and
/// `info` used.
pub fn init(format: LogFormat) {
    let _ = CHOSEN.set(format);
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) => EnvFilter::try_new(&text).unwrap_or_else(|error| {
            eprintln!("RUST_LOG={text:?} does not parse ({error}): logging at info");
            EnvFilter::new("info")
        }),
        // glommio says ERROR whenever a file's device has no polled I/O, which is normal and
        // changes nothing, and warns over five lines per executor when RLIMIT_MEMLOCK is too
        // short to register its I/O buffers (any container without CAP_IPC_LOCK), which
        // measured no difference (docs/benchmarks.md, "Host tuning"); rdkafka's error
        // callback repeats, every second, what librdkafka's own log (target `librdkafka`) says
        // once per failure. RUST_LOG brings all three back.
        Err(_) => EnvFilter::new(
            "info,glommio::reactor=off,glommio::sys::uring=error,rdkafka::client=off",
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // try_init also routes the `log` crate's records into tracing (tracing-log).
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
