//! Node configuration: a TOML file, then command-line flags over it. Every default runs a
//! single node on this machine with no external service. A bad file fails at start naming the
//! key and the reason; nothing is silently ignored (unknown keys are errors).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ownership::SEGMENTS_PER_KEY_LIMIT;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub ingest: IngestConfig,
    pub delay: DelayConfig,
    pub ownership: OwnershipSection,
    /// Where attributed flows go; several at once is fine. Default: stdout.
    pub sinks: Vec<SinkConfig>,
    pub output: OutputConfig,
    pub http: HttpConfig,
    /// The region's other nodes, reached through Kafka.
    pub cluster: ClusterConfig,
    /// The fallback for IPs that run no exporter.
    pub events: EventsConfig,
    /// Every region, this node's own included, for forwarding by remote IP.
    pub regions: Vec<RegionConfig>,
    pub tls: Option<TlsSection>,
}

mod retention;
mod sections;

use retention::text;
pub use retention::{EVICTION_PERIOD, MinimumRetention};
pub use sections::*;

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    /// What the node holds by its own bounds: a shard's unwritten bytes, twice while a write
    /// of them is under way, and 64 MiB for the rest of a small node (the capacity planner
    /// counts it too).
    pub fn memory_held_by_bounds(&self) -> u64 {
        (64 << 20) + 2 * self.delay.max_unwritten_bytes as u64 * self.executor_count() as u64
    }

    /// The least `node.max_memory_bytes` can be: [`Self::memory_held_by_bounds`] must fit under
    /// the 80% mark at which paused ingest resumes, or ingest could stay paused for good.
    pub fn memory_floor(&self) -> u64 {
        self.memory_held_by_bounds() / 8 * 10
    }

    /// The checks serde cannot express. Run after the flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.delay.delay.is_zero() {
            return invalid("delay.delay", "must be more than zero");
        }
        if self.delay.segment_span.is_zero() || self.delay.segment_span > self.delay.delay {
            return invalid(
                "delay.segment_span",
                "must be more than zero and at most delay.delay",
            );
        }
        if self.delay.retry_delay.is_zero() {
            return invalid("delay.retry_delay", "must be more than zero");
        }
        if self.delay.max_retries > MAX_RETRIES_LIMIT {
            return invalid("delay.max_retries", "must be at most 3");
        }
        if self.delay.max_unwritten_bytes < 1 << 20 {
            return invalid("delay.max_unwritten_bytes", "must be at least 1 MiB");
        }
        if self.delay.max_buffer_bytes
            < (self.delay.max_unwritten_bytes as u64) * self.executor_count() as u64
        {
            return invalid(
                "delay.max_buffer_bytes",
                "must be at least delay.max_unwritten_bytes for each shard",
            );
        }
        if self.node.max_memory_bytes != 0 && self.node.max_memory_bytes < self.memory_floor() {
            return Err(ConfigError::Invalid {
                key: "node.max_memory_bytes",
                reason: format!(
                    "must be 0 (no cap) or at least {} MiB: 64 MiB, and twice delay.max_unwritten_bytes for each shard (held while written), all under the 80% mark ingest resumes at",
                    self.memory_floor().div_ceil(1 << 20)
                ),
            });
        }
        if self.ingest.max_frame_bytes < 1024
            || self.ingest.max_frame_bytes > flowattr_common::wire::FRAME_PAYLOAD_BYTES_MAX
        {
            return invalid("ingest.max_frame_bytes", "must be between 1 KiB and 16 MiB");
        }
        if self.ingest.max_connections == 0 {
            return invalid("ingest.max_connections", "must be at least 1");
        }
        if self.ingest.max_connections_per_address == 0 {
            return invalid("ingest.max_connections_per_address", "must be at least 1");
        }
        if self.ingest.idle_timeout < Duration::from_secs(1) {
            return invalid("ingest.idle_timeout", "must be at least 1s");
        }
        if self.ingest.max_partial_frame_bytes < self.ingest.max_frame_bytes as u64 {
            // Below one frame, an exporter sending the largest frame would wait for ever.
            return invalid(
                "ingest.max_partial_frame_bytes",
                "must be at least ingest.max_frame_bytes",
            );
        }
        if self.ingest.max_unacked_batches == 0 {
            return invalid("ingest.max_unacked_batches", "must be at least 1");
        }
        if self.ownership.segments_per_key_max == 0
            || self.ownership.segments_per_key_max > SEGMENTS_PER_KEY_LIMIT
        {
            return Err(ConfigError::Invalid {
                key: "ownership.segments_per_key_max",
                reason: format!("must be between 1 and {SEGMENTS_PER_KEY_LIMIT}"),
            });
        }
        let minimum = self.minimum_retention();
        if self.ownership.retention < minimum.total() {
            return Err(ConfigError::Invalid {
                key: "ownership.retention",
                reason: format!(
                    "is {}, below the minimum of {} ({minimum}): evidence would be evicted before the flows that need it are attributed, and they would come out expired",
                    text(self.ownership.retention),
                    text(minimum.total())
                ),
            });
        }
        if self
            .ingest
            .max_clock_skew
            .is_some_and(|skew| skew > self.delay.delay)
        {
            return invalid(
                "ingest.max_clock_skew",
                "must be at most delay.delay: evidence further ahead than that could reach the map after the flows it contradicts were attributed",
            );
        }
        if self.cluster.brokers.is_some() {
            if self.cluster.topic.is_empty() {
                return invalid("cluster.topic", "must not be empty");
            }
            if self.cluster.partitions == 0 {
                return invalid("cluster.partitions", "must be at least 1");
            }
            if self.cluster.publish_interval.is_zero()
                || self.cluster.publish_interval >= self.delay.delay
            {
                return invalid(
                    "cluster.publish_interval",
                    "must be more than zero and less than delay.delay: a peer's evidence must arrive before the flows that need it are attributed",
                );
            }
            if self.cluster.peer_timeout < self.cluster.publish_interval * 3 {
                return invalid(
                    "cluster.peer_timeout",
                    "must be at least three publish intervals: a peer that is only slow must not be forgotten",
                );
            }
        }
        if let Some(own) = &self.node.region {
            if let Err(problem) =
                flowattr_common::check_identifier(own, flowattr_common::wire::REGION_BYTES_MAX)
            {
                return invalid("node.region", &format!("the name {problem}"));
            }
            for (index, region) in self.regions.iter().enumerate() {
                if let Err(problem) = flowattr_common::check_identifier(
                    &region.name,
                    flowattr_common::wire::REGION_BYTES_MAX,
                ) {
                    return invalid("regions", &format!("region #{index}'s name {problem}"));
                }
                if self.regions[..index]
                    .iter()
                    .any(|earlier| earlier.name == region.name)
                {
                    return invalid(
                        "regions",
                        &format!("region {} is listed twice", region.name),
                    );
                }
                if region.name != *own && region.collectors.is_empty() {
                    return invalid(
                        "regions",
                        &format!("region {} lists no collectors to forward to", region.name),
                    );
                }
            }
        } else if !self.regions.is_empty() {
            return invalid(
                "node.region",
                "must name this node's region when [[regions]] are listed",
            );
        }
        if let Some(listen) = self.http.listen
            && !listen.ip().is_loopback()
            && self.http.bearer_token_file.is_none()
            && !self.http.allow_unauthenticated
        {
            return Err(ConfigError::Invalid {
                key: "http.listen",
                reason: format!(
                    "{listen} is reachable beyond this host: set http.bearer_token_file, or http.allow_unauthenticated = true where a network policy guards it"
                ),
            });
        }
        if let Some(tls) = &self.tls {
            if tls.handshake_timeout.is_zero() || tls.handshake_timeout > Duration::from_secs(60) {
                return invalid(
                    "tls.handshake_timeout",
                    "must be more than zero and at most 60s",
                );
            }
            for (index, client) in tls.clients.iter().enumerate() {
                if client.name.is_empty() {
                    return invalid("tls.clients", &format!("client #{index} has an empty name"));
                }
                if tls.clients[..index]
                    .iter()
                    .any(|earlier| earlier.name == client.name)
                {
                    return invalid(
                        "tls.clients",
                        &format!("client {} is listed twice", client.name),
                    );
                }
            }
        }
        if self.events.enabled() {
            if self.cluster.brokers.is_none() {
                return invalid(
                    "events.fallback_cidrs",
                    "needs cluster.brokers: the events are read from the cluster's Kafka",
                );
            }
            if self.events.topic.is_empty() {
                return invalid("events.topic", "must not be empty");
            }
            // The last attempt at a flow comes this long after it arrived; an event answer for
            // it needs the stream complete through its time, `max_lateness` (and a progress
            // check, 1 s at most) before that.
            for producer in &self.events.watermark_producers {
                if let Err(problem) = flowattr_common::check_workload_name(producer) {
                    return invalid(
                        "events.watermark_producers",
                        &format!("{producer:?} {problem}"),
                    );
                }
            }
            if self.events.assignment_lifetime <= self.ownership.slack * 2 {
                return invalid(
                    "events.assignment_lifetime",
                    "must exceed twice ownership.slack: an event must be able to speak for a whole lookup window",
                );
            }
            let budget =
                self.delay.delay + self.delay.retry_delay * u32::from(self.delay.max_retries);
            if self.events.watermark_producers.is_empty()
                && self.events.max_lateness + self.ownership.slack + Duration::from_secs(1) > budget
            {
                return invalid(
                    "events.max_lateness",
                    &format!(
                        "{} plus ownership.slack and 1 s exceeds delay.delay + delay.retry_delay x delay.max_retries ({}): no flow could wait long enough for an event answer; raise the delay or the retries",
                        humantime::format_duration(self.events.max_lateness),
                        humantime::format_duration(budget)
                    ),
                );
            }
        }
        let files: Vec<_> = self
            .sinks
            .iter()
            .filter_map(|sink| match sink {
                SinkConfig::File { path } | SinkConfig::Parquet { dir: path, .. } => Some(path),
                _ => None,
            })
            .collect();
        if (1..files.len()).any(|i| files[..i].contains(&files[i])) {
            return invalid("sinks", "two file or parquet sinks name the same path");
        }
        for sink in &self.sinks {
            if let SinkConfig::Parquet {
                max_file_bytes,
                max_file_age,
                ..
            } = sink
                && (*max_file_bytes < 1 << 20 || max_file_age.is_zero())
            {
                return invalid(
                    "sinks.max_file_bytes",
                    "a parquet sink needs max_file_bytes of at least 1 MiB and a max_file_age above zero",
                );
            }
        }
        for sink in &self.sinks {
            if let SinkConfig::Kafka {
                flows_per_message, ..
            } = sink
                && flows_per_message
                    .is_some_and(|flows| !(1..=FLOWS_PER_MESSAGE_MAX).contains(&flows))
            {
                return invalid(
                    "sinks.flows_per_message",
                    &format!("must be 1 to {FLOWS_PER_MESSAGE_MAX}"),
                );
            }
        }
        if self.output.batch_flows == 0 {
            return invalid("output.batch_flows", "must be at least 1");
        }
        if !(1..=64).contains(&self.output.threads_per_shard) {
            return invalid("output.threads_per_shard", "must be 1 to 64");
        }
        Ok(())
    }

    /// How old evidence may be when the last lookup that needs it happens, term by term: a
    /// record is up to an exporter interval plus its send time old when it arrives, waits the
    /// delay and every retry, is looked up with a window reaching `slack` further back, and
    /// eviction runs only every [`EVICTION_PERIOD`].
    pub fn minimum_retention(&self) -> MinimumRetention {
        MinimumRetention {
            exporter_interval: self.ingest.exporter_interval,
            exporter_send_time: self.ingest.exporter_send_time,
            delay: self.delay.delay,
            retries: self.delay.retry_delay * u32::from(self.delay.max_retries),
            slack: self.ownership.slack,
            eviction_period: EVICTION_PERIOD,
        }
    }

    /// How long before its arrival a flow's lookup instant may lie and still be inside
    /// retention at its last lookup: retention less the delay, every retry, the slack and the
    /// eviction period. Never less than the exporters' interval plus send time in a valid
    /// config, so a flow that started in the interval it was reported in is looked up at its
    /// start (see [`crate::ownership::lookup_instant`]).
    pub fn lookup_reach(&self) -> Duration {
        let minimum = self.minimum_retention();
        let used = minimum.delay + minimum.retries + minimum.slack + minimum.eviction_period;
        self.ownership.retention.saturating_sub(used)
    }

    /// How much of the events topic a node keeps and reads at start: every event that can
    /// still speak for a flow inside the ownership retention.
    pub fn events_retention(&self) -> Duration {
        self.ownership.retention + self.events.assignment_lifetime
    }

    /// How far ahead of this node's clock a record may end: `ingest.max_clock_skew`, by
    /// default the lookup slack.
    pub fn max_clock_skew(&self) -> Duration {
        self.ingest.max_clock_skew.unwrap_or(self.ownership.slack)
    }

    /// Settings that are valid but will cost attribution, one line each, for the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let arrival = self.ingest.exporter_interval + self.ingest.exporter_send_time;
        if self.delay.delay <= arrival {
            warnings.push(format!(
                "delay.delay ({:?}) does not exceed ingest.exporter_interval + ingest.exporter_send_time ({:?}): a remote side's heartbeats can arrive after its flows are attributed, and those flows come out unattributed or wait for retries; raise delay.delay above {:?}",
                self.delay.delay, arrival, arrival
            ));
        }
        if self.ingest.idle_timeout <= self.ingest.exporter_interval {
            warnings.push(format!(
                "ingest.idle_timeout ({:?}) does not exceed ingest.exporter_interval ({:?}): exporters' connections are closed between their batches and each batch opens a new one; raise ingest.idle_timeout above {:?}",
                self.ingest.idle_timeout, self.ingest.exporter_interval, self.ingest.exporter_interval
            ));
        }
        warnings
    }

    /// The executors to run: `node.cpus`, or every CPU this process may run on.
    pub fn executor_count(&self) -> usize {
        if self.node.cpus > 0 {
            self.node.cpus
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_run_without_external_services() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.delay.delay, Duration::from_secs(75));
        assert!(config.ingest.listen.ip().is_loopback());
        assert_eq!(config.warnings(), Vec::<String>::new());
    }

    #[test]
    fn a_full_file_parses() {
        let config = Config::from_toml(
            r#"
            [node]
            cpus = 2
            [ingest]
            listen = "0.0.0.0:9000"
            dedup_window = "5m"
            [delay]
            storage = "memory"
            delay = "10s"
            segment_span = "1s"
            retry_delay = "5s"
            max_retries = 3
            [ownership]
            slack = "500ms"
            [[sinks]]
            kind = "file"
            path = "/tmp/out.jsonl"
            [[sinks]]
            kind = "stdout"
            [[sinks]]
            kind = "kafka"
            brokers = "127.0.0.1:9092"
            topic = "flows"
            format = "json"
            flows_per_message = 500
            properties = { "compression.type" = "zstd", "security.protocol" = "SSL" }
            [output]
            threads_per_shard = 4
            [http]
            listen = "127.0.0.1:0"
            [cluster]
            brokers = "k1:9092,k2:9092"
            node_id = 7
            publish_interval = "2s"
            kafka = { "sasl.mechanism" = "SCRAM-SHA-512" }
            [events]
            fallback_cidrs = ["10.200.0.0/16", "2001:db8:1b::/48"]
            max_lateness = "20s"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        // A lateness the retries cannot wait out is refused, with the budget it must fit.
        let mut late = config.clone();
        late.events.max_lateness = Duration::from_secs(24);
        let error = late.validate().unwrap_err().to_string();
        assert!(
            error.contains("events.max_lateness") && error.contains("(25s)"),
            "{error}"
        );
        late.events.watermark_producers = vec!["ipam".into()];
        late.validate().unwrap();
        assert_eq!(config.node.cpus, 2);
        assert_eq!(config.delay.storage, StorageKind::Memory);
        assert_eq!(config.ownership.slack, Duration::from_millis(500));
        assert_eq!(config.sinks.len(), 3);
        let SinkConfig::Kafka {
            properties,
            format,
            flows_per_message,
            ..
        } = &config.sinks[2]
        else {
            panic!("{:?}", config.sinks[2])
        };
        assert_eq!(properties["compression.type"], "zstd");
        assert_eq!(
            (*format, *flows_per_message),
            (KafkaFormat::Json, Some(500))
        );
        assert_eq!(config.output.threads_per_shard, 4);
        assert_eq!(config.cluster.node_id, Some(7));
        assert_eq!(config.cluster.kafka["sasl.mechanism"], "SCRAM-SHA-512");
        assert!(config.events.covers("10.200.3.4".parse().unwrap()));
        assert!(config.events.covers("2001:db8:1b::9".parse().unwrap()));
        assert!(!config.events.covers("10.201.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_files_name_the_key_and_the_reason() {
        let unknown = Config::from_toml("[delay]\ndelya = \"5s\"").unwrap_err();
        assert!(unknown.contains("delya"), "{unknown}");
        let duration = Config::from_toml("[delay]\ndelay = \"soon\"").unwrap_err();
        assert!(
            duration.contains("delay") && duration.contains("soon"),
            "{duration}"
        );
        // Found by the config fuzz target: three retries of this overflowed the minimum
        // retention's sum, and the node panicked at start.
        let huge =
            Config::from_toml("[delay]\nretry_delay = \"500000000000years\"\nmax_retries = 3")
                .unwrap_err();
        assert!(
            huge.contains("retry_delay") && huge.contains("ten years"),
            "{huge}"
        );
        assert!(parse_duration("3650days").is_ok() && parse_duration("3651days").is_err());
        let kind = Config::from_toml("[[sinks]]\nkind = \"kafka2\"").unwrap_err();
        assert!(kind.contains("kafka2"), "{kind}");
        let format = Config::from_toml(
            "[[sinks]]\nkind = \"kafka\"\nbrokers = \"b\"\ntopic = \"t\"\nformat = \"avro\"",
        )
        .unwrap_err();
        assert!(format.contains("avro"), "{format}");
        let config = Config {
            sinks: vec![SinkConfig::Kafka {
                brokers: "b".into(),
                topic: "t".into(),
                format: KafkaFormat::Protobuf,
                flows_per_message: Some(0),
                properties: Default::default(),
            }],
            ..Config::default()
        };
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("sinks.flows_per_message"), "{error}");
        // A memory cap below what the node's own bounds hold would leave ingest paused for
        // good: 2 shards x 2 x 16 MiB unwritten + 64 MiB = 128 MiB, over 80% of the cap.
        let mut config = Config::default();
        config.node.cpus = 2;
        config.delay.max_unwritten_bytes = 16 << 20;
        config.node.max_memory_bytes = 159 << 20;
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("node.max_memory_bytes") && error.contains("160 MiB"),
            "{error}"
        );
        config.node.max_memory_bytes = 160 << 20;
        assert!(config.validate().is_ok());
        // The region goes into every output record: a name, not a document.
        config.node.region = Some("eu\twest".into());
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("node.region") && error.contains("control character"),
            "{error}"
        );
        let mut config = Config::default();
        config.delay.max_retries = 9;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("delay.max_retries"), "{error}");
        config.delay.max_retries = 1;
        config.ownership.retention = Duration::from_secs(61);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("ownership.retention"), "{error}");
    }

    #[test]
    fn at_the_minimum_retention_a_flow_of_the_current_interval_is_looked_up_at_its_start() {
        let mut config = Config::default();
        let minimum = config.minimum_retention().total();
        assert_eq!(minimum, Duration::from_secs(60 + 10 + 75 + 2 * 30 + 1 + 5));
        config.ownership.retention = minimum;
        config.validate().unwrap();
        // The reach is what the interval and the send time need, no less.
        assert_eq!(
            config.lookup_reach(),
            config.ingest.exporter_interval + config.ingest.exporter_send_time
        );
        config.ownership.retention = minimum - Duration::from_millis(1);
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("minimum of 3m 31s"), "{error}");
    }

    #[test]
    fn a_delay_shorter_than_an_exporter_interval_is_warned_of() {
        let mut config = Config::default();
        config.delay.delay = Duration::from_secs(60);
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("delay.delay") && warnings[0].contains("70s"),
            "{warnings:?}"
        );
    }

    #[test]
    fn sink_flags_parse() {
        assert_eq!(SinkConfig::parse_flag("stdout"), Ok(SinkConfig::Stdout));
        assert_eq!(
            SinkConfig::parse_flag("file:/x.jsonl"),
            Ok(SinkConfig::File {
                path: "/x.jsonl".into()
            })
        );
        assert!(SinkConfig::parse_flag("file:").is_err());
        assert_eq!(
            SinkConfig::parse_flag("kafka:a:9092,b:9092/flows"),
            Ok(SinkConfig::Kafka {
                brokers: "a:9092,b:9092".into(),
                topic: "flows".into(),
                format: KafkaFormat::Protobuf,
                flows_per_message: None,
                properties: Default::default(),
            })
        );
        assert!(matches!(
            SinkConfig::parse_flag("kafka-json:a:9092/flows"),
            Ok(SinkConfig::Kafka {
                format: KafkaFormat::Json,
                ..
            })
        ));
        assert!(matches!(
            SinkConfig::parse_flag("kafka-columns:a:9092/flows"),
            Ok(SinkConfig::Kafka {
                format: KafkaFormat::ProtobufColumns,
                ..
            })
        ));
        // The file's spelling of the same format.
        let sink: SinkConfig = toml::from_str(
            "kind = \"kafka\"\nbrokers = \"a:9092\"\ntopic = \"t\"\nformat = \"protobuf-columns\"\n",
        )
        .unwrap();
        assert!(matches!(
            sink,
            SinkConfig::Kafka {
                format: KafkaFormat::ProtobufColumns,
                ..
            }
        ));
        assert!(matches!(
            SinkConfig::parse_flag("parquet:/data/flows"),
            Ok(SinkConfig::Parquet { .. })
        ));
        assert!(SinkConfig::parse_flag("parquet:").is_err());
        assert!(SinkConfig::parse_flag("kafka:a:9092").is_err());
        assert!(SinkConfig::parse_flag("kafka").is_err());
    }
}
