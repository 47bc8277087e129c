//! The node's flags: each overrides the same key of the config file.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flowattr_collector::config::{Config, SinkConfig, StorageKind};

/// Node settings. Each overrides the same key of the config file; docs/operations.md lists
/// them all.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeFlags {
    /// TOML config file. Flags override its keys.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Exporters connect here [ingest.listen; default 127.0.0.1:7400].
    #[arg(long, global = true)]
    pub listen: Option<SocketAddr>,
    /// Control plane address, or `none` [http.listen; default 127.0.0.1:7401].
    #[arg(long, global = true)]
    pub http_listen: Option<String>,
    /// Executors, one pinned per CPU; 0 means all CPUs [node.cpus; default 0].
    #[arg(long, global = true)]
    pub cpus: Option<usize>,
    /// Delay buffer storage: disk or memory [delay.storage; default disk].
    #[arg(long, global = true, value_parser = parse_storage)]
    pub storage: Option<StorageKind>,
    /// Delay buffer directory [delay.dir; default ./flowattr-data].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// How long flows wait for heartbeats before attribution, e.g. 60s [delay.delay].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub delay: Option<Duration>,
    /// Arrival time one segment file covers, e.g. 2s [delay.segment_span].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub segment_span: Option<Duration>,
    /// Wait before retrying a flow that found no evidence, e.g. 30s [delay.retry_delay].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub retry_delay: Option<Duration>,
    /// Retries before a flow is emitted unattributed (no_evidence), 0-3 [delay.max_retries].
    #[arg(long, global = true)]
    pub max_retries: Option<u8>,
    /// Clock error allowed around every lookup, e.g. 1s [ownership.slack].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub slack: Option<Duration>,
    /// Gap of no evidence bridged between two heartbeats of one owner, e.g. 90s
    /// [ownership.merge_gap].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub merge_gap: Option<Duration>,
    /// How often exporters send, e.g. 60s: only to check delay against it
    /// [ingest.exporter_interval].
    #[arg(long, global = true, value_parser = flowattr_collector::config::parse_duration)]
    pub exporter_interval: Option<Duration>,
    /// The region's Kafka brokers: share ownership with the region's other nodes
    /// [cluster.brokers; default: none, this node runs alone].
    #[arg(long, global = true)]
    pub brokers: Option<String>,
    /// This node's id in its region [cluster.node_id; default: one kept in the data directory].
    #[arg(long, global = true)]
    pub node_id: Option<u64>,
    /// Another node of the region's control plane, HOST:PORT, for the console's region map;
    /// repeat for each [http.region_nodes].
    #[arg(long = "region-node", global = true)]
    pub region_nodes: Vec<flowattr_common::collector_address::CollectorAddress>,
    /// Output: stdout, discard, file:PATH (JSON lines), parquet:DIR, kafka:BROKERS/TOPIC
    /// (protobuf), kafka-columns:BROKERS/TOPIC (protobuf by column) or
    /// kafka-json:BROKERS/TOPIC; repeat for several [sinks; default stdout].
    #[arg(long = "sink", global = true, value_parser = SinkConfig::parse_flag)]
    pub sinks: Vec<SinkConfig>,
}

fn parse_storage(text: &str) -> Result<StorageKind, String> {
    match text {
        "disk" => Ok(StorageKind::Disk),
        "memory" => Ok(StorageKind::Memory),
        _ => Err(format!("`{text}` is neither disk nor memory")),
    }
}

impl NodeFlags {
    /// The config file (or defaults) with these flags applied.
    pub fn config(&self, default_sinks: &[SinkConfig]) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.ingest.listen = listen;
        }
        if let Some(http) = &self.http_listen {
            config.http.listen = match http.as_str() {
                "none" => None,
                addr => Some(
                    addr.parse()
                        .with_context(|| format!("--http-listen {addr}"))?,
                ),
            };
        }
        if let Some(cpus) = self.cpus {
            config.node.cpus = cpus;
        }
        if let Some(storage) = self.storage {
            config.delay.storage = storage;
        }
        if let Some(dir) = &self.data_dir {
            config.delay.dir = dir.clone();
        }
        if let Some(delay) = self.delay {
            config.delay.delay = delay;
        }
        if let Some(span) = self.segment_span {
            config.delay.segment_span = span;
        }
        if let Some(retry_delay) = self.retry_delay {
            config.delay.retry_delay = retry_delay;
        }
        if let Some(max_retries) = self.max_retries {
            config.delay.max_retries = max_retries;
        }
        if let Some(slack) = self.slack {
            config.ownership.slack = slack;
        }
        if let Some(merge_gap) = self.merge_gap {
            config.ownership.merge_gap = merge_gap;
        }
        if let Some(interval) = self.exporter_interval {
            config.ingest.exporter_interval = interval;
        }
        if let Some(brokers) = &self.brokers {
            config.cluster.brokers = Some(brokers.clone());
        }
        if let Some(id) = self.node_id {
            config.cluster.node_id = Some(id);
        }
        if !self.sinks.is_empty() {
            config.sinks = self.sinks.clone();
        }
        if !self.region_nodes.is_empty() {
            config.http.region_nodes = self.region_nodes.clone();
        }
        if config.sinks.is_empty() {
            config.sinks = default_sinks.to_vec();
        }
        config.validate()?;
        Ok(config)
    }
}

/// Flags given before the subcommand and after it are the same flags.
pub fn merge(before: &NodeFlags, after: NodeFlags) -> NodeFlags {
    NodeFlags {
        config: after.config.or(before.config.clone()),
        listen: after.listen.or(before.listen),
        http_listen: after.http_listen.or(before.http_listen.clone()),
        cpus: after.cpus.or(before.cpus),
        storage: after.storage.or(before.storage),
        data_dir: after.data_dir.or(before.data_dir.clone()),
        delay: after.delay.or(before.delay),
        segment_span: after.segment_span.or(before.segment_span),
        retry_delay: after.retry_delay.or(before.retry_delay),
        max_retries: after.max_retries.or(before.max_retries),
        slack: after.slack.or(before.slack),
        merge_gap: after.merge_gap.or(before.merge_gap),
        exporter_interval: after.exporter_interval.or(before.exporter_interval),
        brokers: after.brokers.or(before.brokers.clone()),
        node_id: after.node_id.or(before.node_id),
        sinks: if after.sinks.is_empty() {
            before.sinks.clone()
        } else {
            after.sinks
        },
        region_nodes: if after.region_nodes.is_empty() {
            before.region_nodes.clone()
        } else {
            after.region_nodes
        },
    }
}

/// The config's warnings, one line each, before the node starts.
pub fn warn(config: &Config) {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let host = flowattr_collector::host::HostSettings::read();
    for shortfall in flowattr_collector::host::shortfalls(config, &host) {
        tracing::warn!(
            "host: {}; fix: {} (docs/operations.md, \"Host tuning\")",
            shortfall.what,
            shortfall.fix
        );
    }
}
