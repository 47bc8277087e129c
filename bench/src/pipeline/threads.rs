//! Where the collector's CPU goes, by what its threads do: attribution on the shards, the sink
//! threads' formatting and writing, the Kafka client's compression and sending. Read from
//! the threads' names (`flowattr_collector::threads`), so a run shows what a sink costs and on
//! which side, with no profiler attached.

use std::collections::BTreeMap;

use flowattr_collector::threads::{SHARD, SINK};

/// Collector cores used over a window, by the threads' work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoresByWork {
    pub shards: f64,
    pub sink_threads: f64,
    /// librdkafka's threads (`rdk:`...) and the Rust client's polling thread.
    pub kafka_client: f64,
    /// The rest: io_uring's workers, the HTTP server, the memory sampler, threads that ended.
    pub other: f64,
}

impl CoresByWork {
    /// From the CPU seconds by thread name at the window's two ends, `total` cores in all
    /// (the process's own count, which keeps ended threads').
    pub fn between(
        first: &BTreeMap<String, f64>,
        last: &BTreeMap<String, f64>,
        seconds: f64,
        total: f64,
    ) -> CoresByWork {
        let mut cores = CoresByWork::default();
        for (name, &end) in last {
            let used = (end - first.get(name).copied().unwrap_or(0.0)) / seconds;
            if name.starts_with(SHARD) {
                cores.shards += used;
            } else if name == SINK {
                cores.sink_threads += used;
            } else if name.starts_with("rdk:") || name.starts_with("producer poll") {
                cores.kafka_client += used;
            }
        }
        cores.other = (total - cores.shards - cores.sink_threads - cores.kafka_client).max(0.0);
        cores
    }
}

impl std::fmt::Display for CoresByWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shards {:.2}, sink threads {:.2}, Kafka client {:.2}, other {:.2}",
            self.shards, self.sink_threads, self.kafka_client, self.other
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_grouped_by_their_names_and_the_rest_is_other() {
        let names = |entries: &[(&str, f64)]| -> BTreeMap<String, f64> {
            entries
                .iter()
                .map(|&(name, seconds)| (name.to_owned(), seconds))
                .collect()
        };
        let first = names(&[
            ("flowattr-shard-", 10.0),
            ("flowattr-sink", 1.0),
            ("rdk:broker1", 2.0),
        ]);
        // A thread started inside the window counts from zero.
        let last = names(&[
            ("flowattr-shard-", 30.0),
            ("flowattr-sink", 3.0),
            ("rdk:broker1", 4.0),
            ("producer pollin", 0.2),
            ("iou-wrk-123", 0.4),
        ]);
        let cores = CoresByWork::between(&first, &last, 20.0, 1.25);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(cores.shards, 1.0), "{cores:?}");
        assert!(close(cores.sink_threads, 0.1), "{cores:?}");
        assert!(close(cores.kafka_client, 0.11), "{cores:?}");
        assert!(close(cores.other, 0.04), "{cores:?}");
    }
}
