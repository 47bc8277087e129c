//! The sections of the config file, each with its defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flowattr_common::collector_address::CollectorAddress;
use serde::Deserialize;

use crate::ownership::OwnershipConfig;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Executors (one pinned thread per CPU, each owning a shard of the IP space). 0: all CPUs.
    pub cpus: usize,
    /// The region this node serves, one of `[[regions]]`: flows whose remote IP lies in another
    /// region's CIDRs are forwarded there. Unset: no forwarding.
    pub region: Option<String>,
    /// The resident memory (RSS) the node keeps under: past 90% of it ingest stops reading
    /// sockets (the exporters keep their batches) until it is back under 80%. 0: no cap.
    pub max_memory_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Exporters connect here. Every executor listens on it (SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Open exporter connections per node; past it new ones are closed at once.
    pub max_connections: usize,
    /// Open exporter connections from one address; past it its new ones are closed at once,
    /// so one address cannot take every place.
    pub max_connections_per_address: usize,
    /// A connection's next complete frame must arrive within this of accept or of its last
    /// one, or it is closed (waiting on the node's acks or caps does not count). Above
    /// `exporter_interval`, so an exporter's connection stays open between its batches.
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    /// Bytes all connections together may hold in frames they have begun and not finished,
    /// past the first 512 KiB of each; a connection that needs more waits for it.
    pub max_partial_frame_bytes: u64,
    /// Largest frame payload accepted; a larger frame closes its connection.
    pub max_frame_bytes: usize,
    /// Batches one connection may have sent but not had acked; past it the node stops reading
    /// that connection. With `max_frame_bytes` it bounds a connection's memory.
    pub max_unacked_batches: usize,
    /// How long an (exporter, sequence) is remembered to recognise a retried batch.
    #[serde(with = "duration_text")]
    pub dedup_window: Duration,
    /// How often the exporters cut and send a batch (their `--interval`): a heartbeat can
    /// reach the collector this long after the instant it covers...
    #[serde(with = "duration_text")]
    pub exporter_interval: Duration,
    /// ...plus this long in flight (connecting, sending, a retry or two). `delay.delay` should
    /// exceed the two together; the node warns at start when it does not.
    #[serde(with = "duration_text")]
    pub exporter_send_time: Duration,
    /// How far past this node's clock a record may end before it is refused as a claim from
    /// the future (counted per exporter). Unset: `ownership.slack`.
    #[serde(with = "optional_duration_text")]
    pub max_clock_skew: Option<Duration>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            max_connections: 16384,
            max_connections_per_address: 256,
            idle_timeout: Duration::from_secs(90),
            max_partial_frame_bytes: 256 << 20,
            max_frame_bytes: flowattr_common::wire::FRAME_PAYLOAD_BYTES_MAX,
            max_unacked_batches: 8,
            dedup_window: Duration::from_secs(600),
            exporter_interval: Duration::from_secs(60),
            exporter_send_time: Duration::from_secs(10),
            max_clock_skew: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Segment files under `dir`, written and read with O_DIRECT through io_uring. Survives a
    /// crash: acked flows are on disk.
    Disk,
    /// Segments in memory: for tests and small nodes; a crash loses buffered flows, so batches
    /// are acked as soon as they are buffered.
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayConfig {
    pub storage: StorageKind,
    pub dir: PathBuf,
    /// How long a flow waits before attribution, so that the heartbeats of its remote side
    /// (reported by other hosts, up to an exporter interval later) have arrived.
    #[serde(with = "duration_text")]
    pub delay: Duration,
    /// A segment file covers this much arrival time.
    #[serde(with = "duration_text")]
    pub segment_span: Duration,
    /// A flow with no evidence yet is tried again after this long...
    #[serde(with = "duration_text")]
    pub retry_delay: Duration,
    /// ...at most this many times, then emitted unattributed (no_evidence).
    pub max_retries: u8,
    /// Encoded flows waiting for their write per shard; past it the shard stops taking flows
    /// (and so, through its queues, the node stops reading sockets).
    pub max_unwritten_bytes: usize,
    /// Bytes the whole delay buffer may hold (sealed and open segments and unwritten flows,
    /// split evenly between shards); past it a shard stops taking flows until releases free
    /// room. Each shard may pass its share by the one batch it was taking.
    pub max_buffer_bytes: u64,
}

impl Default for DelayConfig {
    fn default() -> Self {
        DelayConfig {
            storage: StorageKind::Disk,
            dir: PathBuf::from("flowattr-data"),
            // The exporters' 60 s interval plus 10 s to send, and 5 s to spare.
            delay: Duration::from_secs(75),
            segment_span: Duration::from_secs(2),
            retry_delay: Duration::from_secs(30),
            max_retries: 2,
            max_unwritten_bytes: 64 << 20,
            max_buffer_bytes: 8 << 30,
        }
    }
}

/// Retries are counted in 2 bits of each buffered flow.
pub const MAX_RETRIES_LIMIT: u8 = crate::delay::codec::RETRIES_MAX;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipSection {
    #[serde(with = "duration_text")]
    pub slack: Duration,
    #[serde(with = "duration_text")]
    pub merge_gap: Duration,
    /// Bridge less once the platform is seen reusing an IP within `merge_gap`. Turn it off only
    /// to measure what it costs: without it, fast reuse misattributes.
    pub reuse_guard: bool,
    #[serde(with = "duration_text")]
    pub retention: Duration,
    pub segments_per_key_max: usize,
}

impl Default for OwnershipSection {
    fn default() -> Self {
        let defaults = OwnershipConfig::default();
        OwnershipSection {
            slack: defaults.slack,
            merge_gap: defaults.merge_gap,
            reuse_guard: defaults.reuse_guard,
            retention: defaults.retention,
            segments_per_key_max: defaults.segments_per_key_max,
        }
    }
}

impl OwnershipSection {
    pub fn to_ownership_config(&self) -> OwnershipConfig {
        OwnershipConfig {
            slack: self.slack,
            merge_gap: self.merge_gap,
            reuse_guard: self.reuse_guard,
            retention: self.retention,
            segments_per_key_max: self.segments_per_key_max,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file, fsynced before the flows' segment is deleted.
    File { path: PathBuf },
    /// Counted and dropped: for benchmarks.
    Discard,
    /// Kafka messages on `topic` of up to `flows_per_message` flows each (and within the
    /// producer's `message.max.bytes`), as protobuf `FlowBatch`es or `FlowColumns`
    /// (docs/schema/flows.proto) or JSON lines, acknowledged by the brokers before the flows'
    /// segment is deleted. `properties` are any librdkafka producer settings (compression,
    /// linger, batch size, acks, security, SASL, TLS...) over flowattr's defaults (lz4, or zstd
    /// for columns; linger 5 ms, acks=all).
    Kafka {
        brokers: String,
        topic: String,
        #[serde(default)]
        format: KafkaFormat,
        /// [default: the format's, [`KafkaFormat::default_flows_per_message`]]
        #[serde(default)]
        flows_per_message: Option<usize>,
        #[serde(default)]
        properties: std::collections::BTreeMap<String, String>,
    },
    /// Parquet files in `dir`, one row per flow (schema in docs/operations.md), each written
    /// under a temporary name and renamed once complete: past `max_file_bytes`, or
    /// `max_file_age` after it opened. A flow's segment is deleted once its file is complete,
    /// so the age is also how long the delay buffer holds flows beyond the delay.
    Parquet {
        dir: PathBuf,
        #[serde(default = "default_parquet_file_bytes")]
        max_file_bytes: u64,
        #[serde(default = "default_parquet_file_age", with = "duration_text")]
        max_file_age: Duration,
    },
}

fn default_parquet_file_bytes() -> u64 {
    128 << 20
}

fn default_parquet_file_age() -> Duration {
    Duration::from_secs(30)
}

/// How the Kafka sink encodes a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaFormat {
    /// A `FlowBatch` (docs/schema/flows.proto); ClickHouse reads it as `ProtobufSingle` (docs/schema/clickhouse.sql).
    #[default]
    Protobuf,
    /// A `FlowColumns`: the same flows column by column, each name once (ClickHouse:
    /// docs/schema/clickhouse-columns.sql).
    #[serde(rename = "protobuf-columns")]
    ProtobufColumns,
    /// Newline-separated JSON objects, one per flow (ClickHouse: `JSONEachRow`).
    Json,
}

impl KafkaFormat {
    /// Rows and JSON: 1,000 flows, about 100 KB of protobuf or 450 KB of JSON. Columns: 16,384,
    /// about 600 KB before compression for a host's flows, as zstd sends a tenth fewer bytes of
    /// longer columns for less CPU (docs/benchmarks.md). Either way a message is also cut to fit
    /// the producer's `message.max.bytes`.
    pub fn default_flows_per_message(self) -> usize {
        match self {
            KafkaFormat::Protobuf | KafkaFormat::Json => 1000,
            KafkaFormat::ProtobufColumns => 16_384,
        }
    }
}

/// About 100 MB of JSON, cut into messages the producer takes.
pub const FLOWS_PER_MESSAGE_MAX: usize = 200_000;

impl SinkConfig {
    /// `stdout`, `discard`, `file:PATH`, `parquet:DIR`, `kafka:BROKERS/TOPIC` (protobuf),
    /// `kafka-columns:BROKERS/TOPIC` or `kafka-json:BROKERS/TOPIC`, as the `--sink` flag takes
    /// it.
    pub fn parse_flag(text: &str) -> Result<Self, String> {
        let error = || {
            format!(
                "`{text}` is not a sink: use stdout, discard, file:PATH, parquet:DIR, kafka:BROKERS/TOPIC, kafka-columns:BROKERS/TOPIC or kafka-json:BROKERS/TOPIC"
            )
        };
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return Err(error());
            }
            return Ok(SinkConfig::File { path: path.into() });
        }
        if let Some(dir) = text.strip_prefix("parquet:") {
            if dir.is_empty() {
                return Err(error());
            }
            return Ok(SinkConfig::Parquet {
                dir: dir.into(),
                max_file_bytes: default_parquet_file_bytes(),
                max_file_age: default_parquet_file_age(),
            });
        }
        let kafka = [
            ("kafka:", KafkaFormat::Protobuf),
            ("kafka-columns:", KafkaFormat::ProtobufColumns),
            ("kafka-json:", KafkaFormat::Json),
        ]
        .into_iter()
        .find_map(|(prefix, format)| Some((text.strip_prefix(prefix)?, format)));
        if let Some((target, format)) = kafka {
            return match target.rsplit_once('/') {
                Some((brokers, topic)) if !brokers.is_empty() && !topic.is_empty() => {
                    Ok(SinkConfig::Kafka {
                        brokers: brokers.to_owned(),
                        topic: topic.to_owned(),
                        format,
                        flows_per_message: None,
                        properties: Default::default(),
                    })
                }
                _ => Err(error()),
            };
        }
        match text {
            "stdout" => Ok(SinkConfig::Stdout),
            "discard" => Ok(SinkConfig::Discard),
            _ => Err(error()),
        }
    }
}

/// How shards hand attributed flows to the sinks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Flows per batch handed from a shard to a sink thread.
    pub batch_flows: usize,
    /// Sink threads per shard, unpinned: batches a shard has handed over and not yet seen
    /// written. They encode (JSON, protobuf) and write on whichever cores are free; past this
    /// many batches in flight the shard waits, which is the sinks' backpressure.
    pub threads_per_shard: usize,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            batch_flows: 16_384,
            threads_per_shard: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The control plane (/metrics, /healthz, /v1/...). Absent: no HTTP server.
    pub listen: Option<SocketAddr>,
    /// A file holding the token every request but `/healthz` must bring as
    /// `Authorization: Bearer <token>`. Required when `listen` is not a loopback address,
    /// unless `allow_unauthenticated`.
    pub bearer_token_file: Option<PathBuf>,
    /// Serve a non-loopback address without a token (a network policy guards it instead).
    pub allow_unauthenticated: bool,
    /// The control planes (HOST:PORT) of the region's other nodes: the console shows the
    /// whole region's map by asking each for its part, with this node's bearer token.
    pub region_nodes: Vec<flowattr_common::collector_address::CollectorAddress>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            bearer_token_file: None,
            allow_unauthenticated: false,
            region_nodes: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// The bearer token, read from its file (surrounding whitespace trimmed), if one is set.
    pub fn bearer_token(&self) -> Result<Option<String>, std::io::Error> {
        let Some(path) = &self.bearer_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)?.trim().to_owned();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(std::io::Error::other(
                "holds no token, or one with spaces in it",
            ));
        }
        Ok(Some(token))
    }
}

/// Durations as humans write them in TOML: "60s", "500ms", "1h 30m".
pub(super) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text)
    }

    pub(super) fn parse<E: serde::de::Error>(text: &str) -> Result<Duration, E> {
        super::parse_duration(text).map_err(E::custom)
    }
}

/// The longest duration any setting takes. Nothing flowattr waits for or keeps means anything
/// past it, and the bound keeps sums of settings (the minimum retention, a flow's due time)
/// far from overflowing.
pub const DURATION_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration as a flag or the config file writes it ("60s", "500ms", "1h 30m"), at most
/// [`DURATION_MAX`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| {
        format!("`{text}` is not a duration ({error}); write e.g. \"60s\" or \"500ms\"")
    })?;
    if duration > DURATION_MAX {
        return Err(format!(
            "`{text}` is longer than ten years, the longest duration any setting takes"
        ));
    }
    Ok(duration)
}

/// A duration that may be left out.
pub(super) mod optional_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::duration_text::parse(&text).map(Some)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The region's Kafka bootstrap servers. Absent: this node runs alone and broadcasts
    /// nothing.
    pub brokers: Option<String>,
    /// The broadcast topic: every node of the region publishes what its exporters taught it
    /// and reads what every other node learned. Created with `partitions` if missing.
    pub topic: String,
    pub partitions: u32,
    /// Replicas of each partition when the node creates the topic: 3 for a production
    /// region, 1 for a single broker.
    pub replication_factor: u16,
    /// This node's id in the region, unique per node. Absent: a random id kept in the data
    /// directory (`delay.dir/node-id`).
    pub node_id: Option<u64>,
    /// How often each shard publishes what it learned, compacted per (IP, port, owner).
    #[serde(with = "duration_text")]
    pub publish_interval: Duration,
    /// Bytes waiting to be published while the brokers are slow or away; past it, new
    /// updates are dropped and counted (peers attribute less, never wrongly).
    pub publish_backlog_bytes: usize,
    /// A peer silent for longer than this is reported on `/healthz` and `/metrics`.
    #[serde(with = "duration_text")]
    pub peer_silence: Duration,
    /// A peer silent for longer than this, while others are heard, has left the region: its
    /// evidence is no longer waited for. Until then every flow whose lookup needs evidence
    /// from after its last watermark waits, then comes out incomplete.
    #[serde(with = "duration_text")]
    pub peer_timeout: Duration,
    /// Any other librdkafka property, for both the producer and the consumer:
    /// `security.protocol`, `sasl.*`, `ssl.*`...
    pub kafka: std::collections::BTreeMap<String, String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            brokers: None,
            topic: "flowattr-ownership".into(),
            partitions: 16,
            replication_factor: 1,
            node_id: None,
            publish_interval: Duration::from_secs(1),
            publish_backlog_bytes: 256 << 20,
            peer_silence: Duration::from_secs(10),
            peer_timeout: Duration::from_secs(60),
            kafka: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Assign/unassign events about IPs that run no exporter (docs/operations.md has the
    /// schema), read from the cluster's brokers.
    pub topic: String,
    /// Remote IPs inside these are attributed from the events when heartbeats hold no
    /// evidence at the flow's time. Empty: the event fallback is off.
    pub fallback_cidrs: Vec<ipnet::IpNet>,
    /// The IP-tracking service publishes every event at most this long after its `at`: an
    /// event answer is given only for a flow this much older than what the node has read.
    /// Unused with `watermark_producers`.
    #[serde(with = "duration_text")]
    pub max_lateness: Duration,
    /// Producers that publish watermarks: the stream is complete through the oldest of theirs.
    pub watermark_producers: Vec<String>,
    /// An event speaks for its IP until the next one, and for at most this long: producers
    /// re-publish every live assignment more often. A node keeps, and reads again at start,
    /// `ownership.retention` plus this much of the topic.
    #[serde(with = "duration_text")]
    pub assignment_lifetime: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            topic: "flowattr-ip-events".into(),
            fallback_cidrs: Vec::new(),
            max_lateness: Duration::from_secs(60),
            watermark_producers: Vec::new(),
            assignment_lifetime: Duration::from_secs(3_600),
        }
    }
}

impl EventsConfig {
    pub fn enabled(&self) -> bool {
        !self.fallback_cidrs.is_empty()
    }

    /// Whether flows to `ip` may fall back on the events.
    pub fn covers(&self, ip: std::net::IpAddr) -> bool {
        self.fallback_cidrs.iter().any(|cidr| cidr.contains(&ip))
    }
}

/// A region this node may forward flows to (or its own, whose CIDRs are then attributed here).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// The addresses its workloads hold: a flow whose remote IP is inside is attributed there.
    pub cidrs: Vec<ipnet::IpNet>,
    /// Its collectors' ingest addresses (`HOST:PORT`, names resolved at every connect):
    /// forwarded batches go to the first, and to the next after a failure.
    #[serde(default)]
    pub collectors: Vec<CollectorAddress>,
}

/// Mutual TLS on the ingest port, and on this node's own connections when it forwards flows
/// to another region's collectors. Absent: plain TCP, and every client may claim every IP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The CA that signs every exporter's and collector's certificate.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM, leaf first). As a server it is what exporters
    /// verify; as a forwarding client, what the other region's collectors verify, so it
    /// carries this node's IP address as a SAN.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A connection that has not completed its handshake by then is closed: until it does,
    /// it holds a connection slot and its handshake buffer.
    #[serde(with = "duration_text", default = "default_handshake_timeout")]
    pub handshake_timeout: Duration,
    /// IPs a client may claim beyond the IP addresses its certificate carries, by a DNS name
    /// (or common name) in its certificate: peer collectors forwarding a region's flows, or
    /// hosts whose workloads hold addresses from a range.
    #[serde(default)]
    pub clients: Vec<ClientClaims>,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientClaims {
    pub name: String,
    pub claims: Vec<ipnet::IpNet>,
    /// A relay speaks for exporters other than itself (another region's collector forwarding
    /// its flows, a load generator): its batches keep their exporters' ids. Any other client
    /// may send only under the exporter id its certificate gives it.
    #[serde(default)]
    pub relay: bool,
}
