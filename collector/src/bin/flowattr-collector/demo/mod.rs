//! `flowattr-collector demo`: collector nodes on this machine (one, or a cluster sharing
//! ownership over Kafka), fed a synthetic fleet over loopback, every answer checked against
//! the fleet's ground truth.
//!
//! In a cluster each host's exporter sends to one node only, as in a real region, so a node
//! can name the remote side of most of its flows only from what its peers learned and
//! broadcast. The report counts those flows.
mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flowattr_collector::config::{Config, SinkConfig};
use flowattr_collector::node::Node;
use flowattr_collector::synthetic::{FeedShape, FleetShape, SyntheticFleet};
use flowattr_common::Timestamp;
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::FlowBatch;

use crate::flags::NodeFlags;

#[derive(Debug, Clone, Args)]
pub struct DemoFlags {
    /// Collector nodes. More than one form a cluster that shares what it learns over the
    /// Kafka brokers of --brokers (./scripts/demo-cluster starts a broker and runs two).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
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

/// How long the nodes may take to catch up with the broadcast topic before the demo gives
/// up: a fresh topic takes well under a second.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(flags: &NodeFlags, demo: &DemoFlags) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&demo.silent) {
        bail!("--silent must be in [0, 1), got {}", demo.silent);
    }
    if demo.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let workdir = std::env::temp_dir().join(format!("flowattr-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    let base = base_config(flags, demo, &workdir)?;
    let delay = base.delay.delay;
    let mut nodes = Vec::with_capacity(demo.nodes);
    let mut outputs = Vec::with_capacity(demo.nodes);
    for number in 1..=demo.nodes {
        let (config, output) = node_config(&base, demo.nodes, number, &workdir);
        let buffer = config.delay.dir.clone();
        let node = Node::start(config).with_context(|| format!("starting collector node {number}"))?;
        println!(
            "node {number} running: ingest {} control plane http://{} ({} shards, delay {delay:?}, buffer on disk in {})",
            node.ingest_addr,
            node.http_addr.expect("the demo runs the control plane"),
            node.shared.shards,
            buffer.display(),
        );
        nodes.push(node);
        outputs.push(output);
    }
    if demo.nodes > 1 {
        wait_caught_up(&nodes)?;
        println!(
            "{} nodes share ownership over topic {} of {}",
            demo.nodes,
            base.cluster.topic,
            base.cluster.brokers.as_deref().unwrap_or_default()
        );
    }

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
    let node_of = assign_exporters(&feed.batches, demo.nodes);
    let started = Instant::now();
    for (index, node) in nodes.iter().enumerate() {
        let batches: Vec<FlowBatch> = feed
            .batches
            .iter()
            .filter(|batch| node_of[&batch.exporter.0] == index)
            .cloned()
            .collect();
        let mut connection = CollectorConnection::connect(node.ingest_addr, Duration::from_secs(30))?;
        let acks = connection.send_all(&batches, 8)?;
        println!(
            "node {}: {} batches from {} exporters acked",
            index + 1,
            acks.len(),
            node_of.values().filter(|&&of| of == index).count()
        );
    }
    println!(
        "all acked in {:.0} ms; attribution follows after the {delay:?} delay",
        started.elapsed().as_secs_f64() * 1e3
    );
    let deadline = Instant::now() + delay * 4 + Duration::from_secs(30);
    let emitted = || nodes.iter().map(Node::flows_emitted).sum::<u64>();
    while emitted() < records as u64 {
        if Instant::now() > deadline {
            bail!("only {} of {records} flows were emitted in time", emitted());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tally = report::Tally::read(&outputs, records, deadline, &feed.truth, &node_of, demo.show)?;
    // Shards publish their part of the graph about once a second.
    std::thread::sleep(Duration::from_millis(1100));
    report::print_graph(&nodes);
    tally.print(records, demo.nodes);
    if tally.lines != records {
        bail!("{} records emitted for {records} sent: every flow must leave exactly once", tally.lines);
    }
    if tally.misattributed > 0 {
        bail!("{} flows misattributed", tally.misattributed);
    }
    if demo.nodes > 1 && tally.from_peers == 0 {
        bail!("no node attributed a flow from a peer's heartbeats: the broadcast did not work");
    }
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

/// The settings every node of the demo shares: small delays, since the feed sends every
/// batch at once rather than once a minute.
fn base_config(flags: &NodeFlags, demo: &DemoFlags, workdir: &Path) -> anyhow::Result<Config> {
    let mut flags = flags.clone();
    flags.listen.get_or_insert("127.0.0.1:0".parse()?);
    flags.http_listen.get_or_insert("127.0.0.1:0".into());
    flags.data_dir.get_or_insert(workdir.join("buffer"));
    flags.delay.get_or_insert(Duration::from_secs(3));
    flags.segment_span.get_or_insert(Duration::from_secs(1));
    flags.retry_delay.get_or_insert(Duration::from_secs(2));
    flags.max_retries.get_or_insert(1);
    let mut config = flags.config(&[])?;
    if flags.exporter_interval.is_none() {
        config.ingest.exporter_interval = Duration::from_secs(1);
        config.ingest.exporter_send_time = Duration::from_secs(1);
    }
    if demo.nodes > 1 {
        if config.cluster.brokers.is_none() {
            bail!(
                "{} nodes share ownership over Kafka: give --brokers HOST:PORT (./scripts/demo-cluster starts a broker and runs two nodes)",
                demo.nodes
            );
        }
        // A topic of its own: a fleet replayed from an earlier run, shifted to other times,
        // would be evidence about this run's IPs.
        config.cluster.topic = format!("flowattr-demo-{}-{}", std::process::id(), Timestamp::now().as_nanos() / 1_000_000);
        config.cluster.partitions = 4;
    }
    crate::flags::warn(&config);
    Ok(config)
}

/// Node `number`'s config (1-based): its own buffer, output file and, in a cluster, id.
fn node_config(base: &Config, nodes: usize, number: usize, workdir: &Path) -> (Config, PathBuf) {
    let mut config = base.clone();
    let output = workdir.join(format!("node-{number}.jsonl"));
    if nodes > 1 {
        config.delay.dir = base.delay.dir.join(format!("node-{number}"));
        config.cluster.node_id = Some(number as u64);
    }
    // The check reads this file; any sink the user asked for gets the flows too.
    config.sinks.push(SinkConfig::File { path: output.clone() });
    (config, output)
}

/// Each host's exporter sends to one node, round robin over the exporters.
fn assign_exporters(batches: &[FlowBatch], nodes: usize) -> HashMap<u64, usize> {
    let mut node_of = HashMap::new();
    for batch in batches {
        let next = node_of.len() % nodes;
        node_of.entry(batch.exporter.0).or_insert(next);
    }
    node_of
}

fn wait_caught_up(nodes: &[Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    for (index, node) in nodes.iter().enumerate() {
        let broadcast = node.shared.broadcast.as_ref().expect("a cluster node broadcasts");
        while !broadcast.status.caught_up(node.shared.shards) {
            if Instant::now() > deadline {
                bail!("node {} did not catch up with the broadcast topic in {CATCH_UP_TIMEOUT:?}: is the broker up?", index + 1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
