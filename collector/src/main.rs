//! `flowattr-collector`: runs a collector node (`run`, the default), or a node fed by a
//! built-in synthetic fleet over loopback whose every answer is checked against the fleet's
//! ground truth (`demo`).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use flowattr_collector::config::{Config, SinkConfig, StorageKind};
use flowattr_collector::deps;
use flowattr_collector::node::Node;
use flowattr_collector::synthetic::{FeedShape, FleetShape, SyntheticFleet};
use flowattr_common::Timestamp;
use flowattr_common::client::CollectorConnection;

/// Attributes the remote side of every TCP flow to the workload that owned the IP at the
/// flow's start, from the heartbeats every flow carries.
#[derive(Debug, Parser)]
#[command(name = "flowattr-collector", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    node: NodeFlags,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a collector node (the default).
    Run(NodeFlags),
    /// Run a node on this machine, feed it a synthetic fleet over loopback, and check every
    /// attributed flow against the fleet's ground truth. Exits non-zero on any misattribution.
    Demo(DemoFlags),
    /// Publish assign/unassign events about IPs that run no exporter (load balancers), as an
    /// IP-tracking service would: for tests and demos.
    Events(EventsFlags),
}

#[derive(Debug, Clone, Args)]
struct EventsFlags {
    /// Kafka brokers [default: --brokers or cluster.brokers of --config].
    #[arg(long = "to")]
    to: Option<String>,
    /// The events topic [events.topic; default flowattr-ip-events].
    #[arg(long)]
    topic: Option<String>,
    /// When it happened: RFC 3339 or nanoseconds since the epoch [default: now].
    #[arg(long)]
    at: Option<String>,
    #[command(subcommand)]
    event: EventKind,
}

#[derive(Debug, Clone, Subcommand)]
enum EventKind {
    /// IP is OWNER's from --at on.
    Assign { ip: std::net::IpAddr, owner: String },
    /// IP is nobody's from --at on.
    Unassign { ip: std::net::IpAddr },
}

/// Node settings. Each overrides the same key of the config file; docs/operations.md lists
/// them all.
#[derive(Debug, Clone, Default, Args)]
struct NodeFlags {
    /// TOML config file. Flags override its keys.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Exporters connect here [ingest.listen; default 127.0.0.1:7400].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Control plane address, or `none` [http.listen; default 127.0.0.1:7401].
    #[arg(long, global = true)]
    http_listen: Option<String>,
    /// Executors, one pinned per CPU; 0 means all CPUs [node.cpus; default 0].
    #[arg(long, global = true)]
    cpus: Option<usize>,
    /// Delay buffer storage: disk or memory [delay.storage; default disk].
    #[arg(long, global = true, value_parser = parse_storage)]
    storage: Option<StorageKind>,
    /// Delay buffer directory [delay.dir; default ./flowattr-data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// How long flows wait for heartbeats before attribution, e.g. 60s [delay.delay].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Arrival time one segment file covers, e.g. 2s [delay.segment_span].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    segment_span: Option<Duration>,
    /// Wait before retrying a flow that found no evidence, e.g. 30s [delay.retry_delay].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    retry_delay: Option<Duration>,
    /// Retries before a flow is emitted unattributed (no_evidence), 0-3 [delay.max_retries].
    #[arg(long, global = true)]
    max_retries: Option<u8>,
    /// Clock error allowed around every lookup, e.g. 1s [ownership.slack].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    slack: Option<Duration>,
    /// Gap of no evidence bridged between two heartbeats of one owner, e.g. 90s
    /// [ownership.merge_gap].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    merge_gap: Option<Duration>,
    /// How often exporters send, e.g. 60s: only to check delay against it
    /// [ingest.exporter_interval].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    exporter_interval: Option<Duration>,
    /// The region's Kafka brokers: share ownership with the region's other nodes
    /// [cluster.brokers; default: none, this node runs alone].
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// This node's id in its region [cluster.node_id; default: one kept in the data directory].
    #[arg(long, global = true)]
    node_id: Option<u64>,
    /// Output: stdout, discard, file:PATH or kafka:BROKERS/TOPIC; repeat for several [sinks;
    /// default stdout].
    #[arg(long = "sink", global = true, value_parser = SinkConfig::parse_flag)]
    sinks: Vec<SinkConfig>,
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
    fn config(&self, default_sinks: &[SinkConfig]) -> anyhow::Result<Config> {
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
                addr => Some(addr.parse().with_context(|| format!("--http-listen {addr}"))?),
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
        if config.sinks.is_empty() {
            config.sinks = default_sinks.to_vec();
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Clone, Args)]
struct DemoFlags {
    /// Flows in the synthetic fleet (each reported by both ends).
    #[arg(long, default_value_t = 20_000)]
    flows: usize,
    /// IPs in the fleet, handed between workloads over half an hour.
    #[arg(long, default_value_t = 200)]
    ips: u32,
    /// Fraction of IPs with no agent: flows to them cannot be attributed.
    #[arg(long, default_value_t = 0.05)]
    silent: f64,
    /// Largest clock skew of a host, in milliseconds (keep it under the 1 s slack).
    #[arg(long, default_value_t = 200)]
    skew_ms: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Attributed flows to print.
    #[arg(long, default_value_t = 5)]
    show: usize,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(&cli.node),
        Some(Command::Run(flags)) => run(&merge_flags(&cli.node, flags)),
        Some(Command::Demo(demo_flags)) => demo(&cli.node, &demo_flags),
        Some(Command::Events(flags)) => publish_event(&cli.node, &flags),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line for whoever runs it, whatever RUST_BACKTRACE says.
            eprintln!("flowattr-collector: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Flags given before the subcommand and after it are the same flags.
fn merge_flags(before: &NodeFlags, after: NodeFlags) -> NodeFlags {
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
    }
}

fn run(flags: &NodeFlags) -> anyhow::Result<()> {
    let config = flags.config(&[SinkConfig::Stdout])?;
    warn(&config);
    let storage = match config.delay.storage {
        StorageKind::Disk => format!("disk at {}", config.delay.dir.display()),
        StorageKind::Memory => "memory".to_owned(),
    };
    let node = Node::start(config).context("starting the collector")?;
    // One line on stderr when ready: scripts and tests wait for it (and learn the ports).
    eprintln!(
        "flowattr-collector ready: ingest {} http {} shards {} storage {storage}",
        node.ingest_addr,
        node.http_addr.map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        node.shared.shards,
    );
    node.wait();
    Ok(())
}

fn warn(config: &Config) {
    for warning in config.warnings() {
        eprintln!("flowattr-collector: warning: {warning}");
    }
}

fn demo(flags: &NodeFlags, demo: &DemoFlags) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&demo.silent) {
        bail!("--silent must be in [0, 1), got {}", demo.silent);
    }
    let workdir = std::env::temp_dir().join(format!("flowattr-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let output = workdir.join("flows.jsonl");
    let mut flags = flags.clone();
    flags.listen.get_or_insert("127.0.0.1:0".parse()?);
    flags.http_listen.get_or_insert("127.0.0.1:0".into());
    flags.data_dir.get_or_insert(workdir.join("buffer"));
    flags.delay.get_or_insert(Duration::from_secs(3));
    flags.segment_span.get_or_insert(Duration::from_secs(1));
    flags.retry_delay.get_or_insert(Duration::from_secs(2));
    flags.max_retries.get_or_insert(1);
    let mut config = flags.config(&[SinkConfig::File {
        path: output.clone(),
    }])?;
    // The feed below sends every batch at once over loopback, not once a minute.
    if flags.exporter_interval.is_none() {
        config.ingest.exporter_interval = Duration::from_secs(1);
        config.ingest.exporter_send_time = Duration::from_secs(1);
    }
    warn(&config);
    let delay = config.delay.delay;
    let node = Node::start(config).context("starting the collector")?;
    println!(
        "collector running: ingest {} control plane http://{} ({} shards, delay {:?}, buffer on disk in {})",
        node.ingest_addr,
        node.http_addr.expect("demo runs the control plane"),
        node.shared.shards,
        delay,
        workdir.display()
    );

    let duration_s = 1800.0;
    let fleet = SyntheticFleet::generate(FleetShape {
        flows: demo.flows,
        ips: demo.ips,
        seed: demo.seed,
        duration_s,
        ..FleetShape::default()
    })
    .context("generating the synthetic fleet")?;
    let feed = fleet.feed(FeedShape {
        shift: fleet.shift_to_end_at(duration_s, Timestamp::now()),
        silent: demo.silent,
        skew: Duration::from_millis(demo.skew_ms),
        flows_per_batch: 500,
        seed: demo.seed,
    });
    let records = feed.records();
    println!(
        "feeding {} flows of {} IPs and {} workloads over the last {} min as {records} records from both ends, in {} batches",
        fleet.flows.len(),
        demo.ips,
        fleet.workload_names.len(),
        duration_s / 60.0,
        feed.batches.len()
    );
    let started = Instant::now();
    let mut connection = CollectorConnection::connect(node.ingest_addr, Duration::from_secs(30))?;
    let acks = connection.send_all(&feed.batches, 8)?;
    println!(
        "{} batches acked in {:.0} ms; attribution follows after the {delay:?} delay",
        acks.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let deadline = Instant::now() + delay * 4 + Duration::from_secs(30);
    while node.flows_emitted() < records as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {records} flows were emitted in time",
                node.flows_emitted()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The counters move before the sink's write returns, and the graph is published about
    // once a second: wait for both to catch up.
    let graph = || {
        deps::merge(node.shared.views.iter().map(|view| {
            view.lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .edges
                .clone()
        }))
    };
    let text = loop {
        let text = std::fs::read_to_string(&output)?;
        if text.lines().count() >= records || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Shards publish their part of the graph about once a second.
    std::thread::sleep(Duration::from_millis(1100));
    let mut correct = 0usize;
    let mut misattributed = 0usize;
    let mut unattributed: BTreeMap<String, usize> = BTreeMap::new();
    let mut lines = 0usize;
    println!("\nattributed flows (JSON lines in {}):", output.display());
    for line in text.lines() {
        let flow: serde_json::Value = serde_json::from_str(line)?;
        lines += 1;
        if lines <= demo.show {
            println!("  {line}");
        }
        let key = (
            flow["exporter"].as_u64().unwrap_or_default(),
            flow["sequence"].as_u64().unwrap_or_default(),
            flow["index"].as_u64().unwrap_or_default() as u32,
        );
        match (flow["remote_workload"].as_str(), feed.truth.get(&key)) {
            (Some(got), Some(truth)) if got == truth => correct += 1,
            (Some(_), _) => misattributed += 1,
            (None, _) => {
                let reason = flow["unattributed"].as_str().unwrap_or("?").to_owned();
                *unattributed.entry(reason).or_default() += 1;
            }
        }
    }
    let edges = graph();
    let attributed_edges: Vec<_> = edges.iter().filter(|edge| edge.attributed).collect();
    println!(
        "\ndependency graph: {} edges between workloads, client -> server (top 10 by connections; GET /v1/deps?format=dot for all):",
        attributed_edges.len()
    );
    for edge in attributed_edges.iter().take(10) {
        println!(
            "  {} -> {}: {} connections, {} bytes",
            edge.client, edge.server, edge.count.connections, edge.count.bytes
        );
    }
    let reasons: Vec<String> = unattributed
        .iter()
        .map(|(reason, count)| format!("{reason}={count}"))
        .collect();
    println!(
        "\n{lines} records emitted for {records} sent: {correct} attributed correctly, {} unattributed ({}), {misattributed} misattributed",
        unattributed.values().sum::<usize>(),
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(", ")
        },
    );
    if lines != records {
        bail!("{lines} records emitted for {records} sent: every flow must leave exactly once");
    }
    if misattributed > 0 {
        bail!("{misattributed} flows misattributed");
    }
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

fn publish_event(node: &NodeFlags, flags: &EventsFlags) -> anyhow::Result<()> {
    let config = node.config(&[])?;
    let brokers = flags
        .to
        .clone()
        .or(config.cluster.brokers.clone())
        .context("give --to BROKERS (or --brokers, or cluster.brokers in --config)")?;
    let topic = flags.topic.clone().unwrap_or(config.events.topic.clone());
    let at = match &flags.at {
        Some(text) => flowattr_collector::events::parse_at(text).with_context(|| format!("--at {text}: not RFC 3339 or nanoseconds"))?,
        None => Timestamp::now(),
    };
    let (ip, owner) = match &flags.event {
        EventKind::Assign { ip, owner } => {
            flowattr_common::check_workload_name(owner).map_err(|problem| anyhow::anyhow!("owner {owner:?} {problem}"))?;
            (*ip, Some(owner.as_str()))
        }
        EventKind::Unassign { ip } => (*ip, None),
    };
    let json = flowattr_collector::events::event_json(ip, owner, at);
    flowattr_collector::events::publish(&config.cluster, &brokers, &topic, &json).map_err(anyhow::Error::msg)?;
    eprintln!("published to {topic}: {json}");
    Ok(())
}

