//! `flowattr-bench demo`, the README's main job: the simulator's fleet fed over loopback to
//! real collector nodes on this machine (one, or a cluster sharing ownership over Kafka), the
//! nodes' output scored against the fleet's ground truth, next to the strategies users run
//! today on the same fleet, and the dependency graph the nodes built.
//!
//! The nodes run on the wall clock, so the fleet's timeline is moved to end just before now
//! and every batch is sent at once, in the order it would have arrived: the faults of delivery
//! (loss, duplication, reordering) reach the nodes, the delays are compressed. The library run
//! of flowattr beside it keeps the simulated delays.
//!
//! In a cluster each host's exporter sends to one node only, as in a region, so a node names
//! many remote sides only from what its peers learned and broadcast; the report counts them.

mod judge;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flowattr_collector::config::{Config, SinkConfig};
use flowattr_collector::node::Node;
use flowattr_common::Timestamp;
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, COMPRESSION_LEVEL, FrameCompressor, MeasuredFlowBatch};

use crate::simulate::fleet::{Fleet, LOAD_BALANCER_CIDR};
use crate::simulate::observe::{Arrival, Observations, observe};
use crate::simulate::{SimulateArgs, collector_config, markdown_table, run_strategies, strategies};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Collector nodes. More than one form a cluster sharing what it learns over the Kafka
    /// brokers of --brokers (./scripts/demo-cluster starts a broker and runs two).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Kafka brokers, for a cluster; with them the nodes also take the load balancers'
    /// assign/unassign events (the event fallback).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Executors per node, one pinned per CPU; 0 means all CPUs.
    #[arg(long, default_value_t = 0)]
    pub cpus: usize,
    /// Attributed flows to print.
    #[arg(long, default_value_t = 3)]
    pub show: usize,
    /// Makes the fleet and its faults reproducible.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Simulated time (`flowattr-bench simulate --help` has every other knob of the fleet).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 50.0)]
    pub connections_per_second: f64,
    /// Keep the nodes up after the report, with their consoles (service map, ownership
    /// lookups, health) at the printed addresses, until interrupted.
    #[arg(long)]
    pub serve: bool,
    /// Another node of the region (its control plane, HOST:PORT) for the consoles' region
    /// map, besides the demo's own nodes; repeat for each.
    #[arg(long = "region-node")]
    pub region_nodes: Vec<flowattr_common::collector_address::CollectorAddress>,
}

impl DemoArgs {
    /// The simulator's defaults, with this demo's size.
    fn fleet(&self) -> SimulateArgs {
        SimulateArgs {
            seed: self.seed,
            duration: self.duration,
            connections_per_second: self.connections_per_second,
            ..SimulateArgs::defaults()
        }
    }
}

/// How long nodes may take to catch up with their topics before the demo gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// The demo's delay: every batch is sent at once, so the nodes need not wait a minute.
const DEMO_DELAY: Duration = Duration::from_secs(3);

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.nodes > 1 && args.brokers.is_none() {
        bail!(
            "{} nodes share ownership over Kafka: give --brokers HOST:PORT (./scripts/demo-cluster starts a broker and runs two nodes)",
            args.nodes
        );
    }
    let sim = args.fleet();
    let fleet = Fleet::generate(sim.fleet_shape())?;
    let observations = observe(&fleet, &sim.delivery(), sim.seed);
    println!(
        "fleet: {} services, {} instances on {} hosts, {} connections over {} ({} reports from both ends)",
        fleet.services.len(),
        fleet.instances.len(),
        fleet.hosts.len(),
        fleet.connections.len(),
        humantime::format_duration(sim.duration),
        observations.reports(),
    );
    let config = collector_config(sim.interval, sim.reuse_guard)?;
    let mut baselines = strategies(&fleet, &config, sim.hold_back);
    let library = run_strategies(
        &fleet,
        &observations,
        &mut baselines,
        &indicatif::ProgressBar::hidden(),
    );

    let workdir = std::env::temp_dir().join(format!("flowattr-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
    // The last batch arrives a second before now: nothing the nodes get is from their future.
    let last = observations
        .arrivals
        .iter()
        .filter(|(_, arrival)| matches!(arrival, Arrival::Batch(_)))
        .map(|(at, _)| *at)
        .max()
        .unwrap_or(fleet.end());
    let shift = Duration::from_nanos(
        Timestamp::now()
            .saturating_sub(Duration::from_secs(1))
            .nanos_since(last),
    );
    let base = node_base_config(args, &workdir)?;
    if let Some(brokers) = &args.brokers {
        publish_load_balancer_events(&base, brokers, &fleet, &observations, shift)?;
    }
    let mut nodes = Vec::with_capacity(args.nodes);
    let mut outputs = Vec::with_capacity(args.nodes);
    let control_planes = control_plane_addresses(args.nodes)?;
    for number in 1..=args.nodes {
        let (mut config, output) = node_config(&base, args.nodes, number, &workdir);
        config.http.listen = Some(control_planes[number - 1]);
        config.http.region_nodes = control_planes
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != number - 1)
            .map(|(_, address)| (*address).into())
            .chain(args.region_nodes.iter().cloned())
            .collect();
        let buffer = config.delay.dir.clone();
        let node =
            Node::start(config).with_context(|| format!("starting collector node {number}"))?;
        println!(
            "node {number}: ingest {} control plane http://{} ({} shards, delay {}, buffer on disk in {})",
            node.ingest_addr,
            node.http_addr.expect("the demo runs the control plane"),
            node.shared.shards,
            humantime::format_duration(DEMO_DELAY),
            buffer.display(),
        );
        nodes.push(node);
        outputs.push(output);
    }
    if args.brokers.is_some() {
        wait_caught_up(&nodes)?;
    }

    let names: Vec<String> = fleet
        .services
        .iter()
        .map(|service| service.name.clone())
        .collect();
    let batches: Vec<MeasuredFlowBatch> = observations
        .arrivals
        .iter()
        .filter_map(|(_, arrival)| match arrival {
            Arrival::Batch(batch) => Some(batch.to_measured_batch(&names, shift)),
            Arrival::Event(_) => None,
        })
        .collect();
    let node_of = assign_exporters(&batches, args.nodes);
    let mut compressor = FrameCompressor::new(COMPRESSION_LEVEL)?;
    let started = Instant::now();
    let (mut expected, mut refused) = (0usize, 0usize);
    for (index, node) in nodes.iter().enumerate() {
        let mine: Vec<&MeasuredFlowBatch> = batches
            .iter()
            .filter(|host| node_of[&host.batch.exporter.0] == index)
            .collect();
        // Compressed, as exporters send them.
        let frames = mine
            .iter()
            .map(|batch| {
                let mut frame = Vec::new();
                compressor.encode_batch(batch, &mut frame).map(|()| frame)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut connection =
            CollectorConnection::connect(node.ingest_addr, Duration::from_secs(30))?;
        let acks = connection.send_all_frames(&frames, 8)?;
        for (batch, ack) in mine.iter().zip(&acks) {
            if ack.status == AckStatus::Accepted {
                expected += batch.batch.flows.len() - ack.refused.len();
                refused += ack.refused.len();
            }
        }
    }
    println!(
        "{} batches sent in {:.0} ms, each host's to one node; attribution follows after the delay",
        batches.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    if refused > 0 {
        bail!(
            "the nodes refused {refused} records of the fleet (their reasons are logged above): its clocks are off"
        );
    }
    let deadline = Instant::now() + DEMO_DELAY * 4 + Duration::from_secs(60);
    let emitted = || nodes.iter().map(Node::flows_emitted).sum::<u64>();
    while emitted() < expected as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {expected} flows were emitted in time",
                emitted()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcome = judge::judge(
        &fleet,
        &observations,
        &batches,
        &node_of,
        &outputs,
        expected,
        deadline,
        args.show,
    )?;
    // Shards publish their part of the graph about once a second.
    std::thread::sleep(Duration::from_millis(1100));
    judge::print_graph(&nodes);

    let mut scores = vec![outcome.score.clone()];
    for mut score in library {
        if score.strategy == "flowattr" {
            score.strategy = "flowattr, library at simulated time".into();
        }
        scores.push(score);
    }
    println!("\n{}", markdown_table(&scores));
    outcome.print(args.nodes, args.brokers.is_some());
    if outcome.emitted != expected {
        bail!(
            "{} flows emitted for {expected} accepted: every flow must leave exactly once",
            outcome.emitted
        );
    }
    if outcome.score.misattributed > 0 {
        bail!("{} flows misattributed", outcome.score.misattributed);
    }
    if args.nodes > 1 && outcome.from_peers == 0 {
        bail!("no node attributed a flow from a peer's heartbeats: the broadcast did not work");
    }
    if args.serve {
        serve(&nodes)?;
    }
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

/// Prints each node's console and waits for SIGINT or SIGTERM.
fn serve(nodes: &[Node]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("waiting for signals")?;
    println!();
    for (number, node) in nodes.iter().enumerate() {
        let http = node.http_addr.expect("the demo runs the control plane");
        println!("console of node {}: http://{http}/", number + 1);
    }
    println!("serving until interrupted (Ctrl-C)");
    std::io::stdout().flush()?;
    signals.forever().next();
    Ok(())
}

/// A free loopback port for each node's control plane, chosen before any node starts so that
/// each can list the others as its region. (Another process may take one in between; the node
/// then fails to start and says so.)
fn control_plane_addresses(nodes: usize) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let listeners = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free ports for the control planes")?;
    Ok(listeners
        .iter()
        .map(|listener| listener.local_addr())
        .collect::<Result<_, _>>()?)
}

/// What every node of the demo shares.
fn node_base_config(args: &DemoArgs, workdir: &Path) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.node.cpus = args.cpus;
    config.ingest.listen = "127.0.0.1:0".parse()?;
    config.http.listen = Some("127.0.0.1:0".parse()?);
    config.delay.dir = workdir.join("buffer");
    config.delay.delay = DEMO_DELAY;
    config.delay.segment_span = Duration::from_secs(1);
    config.delay.retry_delay = Duration::from_secs(2);
    config.delay.max_retries = 1;
    config.ingest.exporter_interval = Duration::from_secs(1);
    config.ingest.exporter_send_time = Duration::from_secs(1);
    if let Some(brokers) = &args.brokers {
        config.cluster.brokers = Some(brokers.clone());
        // Topics of its own: a fleet replayed from an earlier run, moved to other times, would
        // be evidence about this run's IPs.
        let run = format!(
            "flowattr-demo-{}-{}",
            std::process::id(),
            Timestamp::now().as_nanos() / 1_000_000
        );
        config.cluster.topic = format!("{run}-ownership");
        config.cluster.partitions = 4;
        config.events.topic = format!("{run}-events");
        config.events.fallback_cidrs = vec![LOAD_BALANCER_CIDR.parse().expect("a CIDR")];
        // The demo replays a history at once: its events reach the topic minutes after their
        // time, so it says when it has published them all rather than promise a lateness.
        config.events.watermark_producers = vec![DEMO_EVENT_PRODUCER.into()];
    }
    config.validate()?;
    for warning in config.warnings() {
        eprintln!("flowattr-bench: warning: {warning}");
    }
    Ok(config)
}

/// Node `number`'s config (1-based): its own buffer, output file and, in a cluster, id.
fn node_config(base: &Config, nodes: usize, number: usize, workdir: &Path) -> (Config, PathBuf) {
    let mut config = base.clone();
    let output = workdir.join(format!("node-{number}.jsonl"));
    config.delay.dir = base.delay.dir.join(format!("node-{number}"));
    if nodes > 1 {
        config.cluster.node_id = Some(number as u64);
    }
    config.sinks = vec![SinkConfig::File {
        path: output.clone(),
    }];
    (config, output)
}

/// Each host's exporter sends to one node, round robin over the exporters.
fn assign_exporters(batches: &[MeasuredFlowBatch], nodes: usize) -> HashMap<u64, usize> {
    let mut node_of = HashMap::new();
    for MeasuredFlowBatch { batch, .. } in batches {
        let next = node_of.len() % nodes;
        node_of.entry(batch.exporter.0).or_insert(next);
    }
    node_of
}

/// The name the demo's events are published under, for their watermark.
const DEMO_EVENT_PRODUCER: &str = "flowattr-demo";

/// The load balancers' assign/unassign events, as an IP-tracking service publishes them,
/// before the nodes start (they read the topic's history before releasing any flow). Events
/// after now are left out: a node refuses news from the future.
fn publish_load_balancer_events(
    config: &Config,
    brokers: &str,
    fleet: &Fleet,
    observations: &Observations,
    shift: Duration,
) -> anyhow::Result<()> {
    let now = Timestamp::now();
    let mut published = 0;
    for (_, arrival) in &observations.arrivals {
        let Arrival::Event(event) = arrival else {
            continue;
        };
        let at = event.at.saturating_add(shift);
        if !config.events.covers(event.ip.to_ip_addr()) || at > now {
            continue;
        }
        let owner = event.assigned.then(|| fleet.service_name(event.service));
        let json = flowattr_collector::events::event_json(event.ip.to_ip_addr(), owner, at);
        flowattr_collector::events::publish(&config.cluster, brokers, &config.events.topic, &json)
            .map_err(anyhow::Error::msg)?;
        published += 1;
    }
    let watermark = flowattr_collector::events::watermark_json(DEMO_EVENT_PRODUCER, now);
    flowattr_collector::events::publish(&config.cluster, brokers, &config.events.topic, &watermark)
        .map_err(anyhow::Error::msg)?;
    println!(
        "{published} load-balancer events published to {}, and a watermark at now",
        config.events.topic
    );
    Ok(())
}

fn wait_caught_up(nodes: &[Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    for (index, node) in nodes.iter().enumerate() {
        let broadcast = node
            .shared
            .broadcast
            .as_ref()
            .expect("a node with brokers broadcasts");
        while !broadcast.status.caught_up(node.shared.shards) {
            if Instant::now() > deadline {
                bail!(
                    "node {} did not catch up with its topics in {CATCH_UP_TIMEOUT:?}: is the broker up?",
                    index + 1
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}
