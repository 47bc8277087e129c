//! The minimum retention: how long evidence must live for every lookup that needs it.

use std::time::Duration;

/// How often each shard evicts evidence older than retention.
pub const EVICTION_PERIOD: Duration = Duration::from_secs(5);

/// The terms of [`Config::minimum_retention`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinimumRetention {
    pub exporter_interval: Duration,
    pub exporter_send_time: Duration,
    pub delay: Duration,
    /// `delay.retry_delay` times `delay.max_retries`.
    pub retries: Duration,
    pub slack: Duration,
    pub eviction_period: Duration,
}

impl MinimumRetention {
    pub fn total(&self) -> Duration {
        self.exporter_interval
            + self.exporter_send_time
            + self.delay
            + self.retries
            + self.slack
            + self.eviction_period
    }
}

impl std::fmt::Display for MinimumRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ingest.exporter_interval {} + ingest.exporter_send_time {} + delay.delay {} + delay.retry_delay x delay.max_retries {} + ownership.slack {} + eviction period {}",
            text(self.exporter_interval),
            text(self.exporter_send_time),
            text(self.delay),
            text(self.retries),
            text(self.slack),
            text(self.eviction_period)
        )
    }
}

/// A duration as the config file would write it.
pub(super) fn text(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}
