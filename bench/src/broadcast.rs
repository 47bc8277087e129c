//! The cluster's broadcast, measured on a real broker (Tansu) with real collector processes:
//! what node A publishes per heartbeat its exporters sent (bytes, messages, updates), how long
//! node B takes to rebuild a map of `--ips` IPs from the topic at a cold start, and the
//! publish-to-apply lag B sees while A keeps learning.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{ExporterId, FlowBatch, FlowRecord, WorkloadIndex};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};

use crate::pipeline::collector_binary;
use crate::process::{Broker, Process, histogram_quantile, http_get, metric};

#[derive(Debug, Clone, clap::Args)]
pub struct BroadcastArgs {
    /// The collector binary [default: flowattr-collector next to this binary].
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// A Kafka-compatible broker binary speaking Tansu's command line [default:
    /// $FLOWATTR_KAFKA_BROKER, which scripts/test sets up].
    #[arg(long)]
    pub broker: Option<PathBuf>,
    /// IPs node A learns an owner for, each from one heartbeat.
    #[arg(long, default_value_t = 1_000_000)]
    pub ips: u32,
    /// Flows per batch sent to node A.
    #[arg(long, default_value_t = 4096)]
    pub batch_flows: u32,
    /// Seconds of steady load on A (each IP's owner heartbeating again) while B is up, to
    /// measure the lag.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

fn node(binary: &Path, brokers: &str, id: u64, data: &Path) -> anyhow::Result<Process> {
    let mut command = Command::new(binary);
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--cpus",
            "1",
        ])
        .args(["--storage", "memory", "--delay", "10s", "--sink", "discard"])
        .args([
            "--brokers",
            brokers,
            "--node-id",
            &id.to_string(),
            "--data-dir",
        ])
        .arg(data);
    Process::start(
        &mut command,
        if id == 1 { "node-a" } else { "node-b" },
        "flowattr-collector ready:",
    )
}

fn metrics(node: &Process) -> anyhow::Result<String> {
    http_get(node.address("http")?, "/metrics")
}

/// One batch of heartbeats: IPs `first..first + count`, each owned by one of 64 workloads.
fn heartbeats(first: u32, count: u32, sequence: u64, now: Timestamp) -> FlowBatch {
    let workloads: Vec<String> = (0..64).map(|i| format!("svc-{i:02}")).collect();
    let flows = (first..first + count)
        .map(|i| FlowRecord {
            local_ip: CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + i)),
            remote_ip: CanonicalIp::from(Ipv4Addr::from(0x0B00_0000 + i % 50_000)),
            local_port: 443,
            remote_port: 40_000 + (i % 20_000) as u16,
            local_workload: Some(WorkloadIndex(i % 64)),
            local_shared: false,
            start: now.saturating_sub(Duration::from_secs(30)),
            end: now.saturating_sub(Duration::from_secs(1)),
            bytes_sent: 1_000,
            bytes_received: 1_000,
            segments_sent: 4,
            segments_received: 4,
            retransmits: 0,
            direction: Direction::Inbound,
            state: FlowState::Open,
        })
        .collect();
    FlowBatch {
        exporter: ExporterId(7),
        sequence,
        region: "bench".into(),
        workloads,
        flows,
    }
}

/// Sends heartbeats for every IP once; returns the next sequence number.
fn teach_every_ip(
    connection: &mut CollectorConnection,
    args: &BroadcastArgs,
    mut sequence: u64,
) -> anyhow::Result<u64> {
    let now = Timestamp::now();
    let mut first = 0;
    while first < args.ips {
        let count = args.batch_flows.min(args.ips - first);
        connection.send_and_wait(&heartbeats(first, count, sequence, now))?;
        sequence += 1;
        first += count;
    }
    Ok(sequence)
}

pub fn run(args: &BroadcastArgs) -> anyhow::Result<()> {
    let broker_binary = match &args.broker {
        Some(path) => path.clone(),
        None => Broker::binary_from_env().context("give --broker or set FLOWATTR_KAFKA_BROKER")?,
    };
    let broker = Broker::start(&broker_binary)?;
    let brokers = broker.address.clone();
    let binary = collector_binary(args.collector.as_ref())?;
    let data = tempfile::tempdir()?;
    let a = node(&binary, &brokers, 1, &data.path().join("a"))?;
    wait_ready(&a, Duration::from_secs(60))?;

    // Phase 1: A learns an owner for every IP, each from one heartbeat: no compaction helps.
    let mut connection =
        CollectorConnection::connect(a.address("ingest")?, Duration::from_secs(60))?;
    let started = Instant::now();
    let sequence = teach_every_ip(&mut connection, args, 0)?;
    let taught = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let text = loop {
        let text = metrics(&a)?;
        let learned = metric(&text, "flowattr_broadcast_learned_heartbeats_total", None);
        let published = metric(&text, "flowattr_broadcast_published_updates_total", None);
        if learned >= f64::from(args.ips) && published >= learned {
            break text;
        }
        if Instant::now() > deadline {
            bail!("A published {published} of {learned} updates in 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let learned = metric(&text, "flowattr_broadcast_learned_heartbeats_total", None);
    let bytes = metric(&text, "flowattr_broadcast_published_bytes_total", None);
    let messages = metric(&text, "flowattr_broadcast_published_messages_total", None);
    let updates = metric(&text, "flowattr_broadcast_published_updates_total", None);
    println!(
        "phase 1: {} heartbeats taught to A in {:.1} s",
        args.ips,
        taught.as_secs_f64()
    );
    println!(
        "  published per learned heartbeat: {:.1} bytes, {:.5} messages, {:.3} updates ({:.1} bytes per update, presence messages included)",
        bytes / learned,
        messages / learned,
        updates / learned,
        bytes / updates
    );

    // Phase 2: B starts cold and rebuilds the map from the topic before it is ready.
    let started = Instant::now();
    let b = node(&binary, &brokers, 2, &data.path().join("b"))?;
    wait_ready(&b, Duration::from_secs(600))?;
    let cold = started.elapsed();
    // Map sizes are published every second.
    std::thread::sleep(Duration::from_millis(1500));
    let text = metrics(&b)?;
    let applied = metric(&text, "flowattr_peer_ranges_applied_total", None);
    let keys = metric(&text, "flowattr_ownership_keys", None);
    println!(
        "phase 2: B ready after {:.2} s (process start to caught up), {applied} ranges applied, {keys} keys in its map",
        cold.as_secs_f64()
    );

    // Phase 3: A keeps learning (every IP's owner heartbeats again) while B applies.
    let before = metrics(&b)?;
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut sequence = sequence;
    let mut rounds = 0;
    while Instant::now() < deadline {
        sequence = teach_every_ip(
            &mut connection,
            &BroadcastArgs {
                ips: args.ips.min(200_000),
                ..args.clone()
            },
            sequence,
        )?;
        rounds += 1;
    }
    std::thread::sleep(Duration::from_secs(3));
    let text = metrics(&b)?;
    println!(
        "phase 3: {rounds} rounds of {} heartbeats to A in {} s; B's publish-to-apply lag p50 {} ms, p99 {} ms",
        args.ips.min(200_000),
        args.seconds,
        (1000.0 * histogram_quantile(&before, &text, "flowattr_broadcast_lag_seconds", 0.5))
            .round(),
        (1000.0 * histogram_quantile(&before, &text, "flowattr_broadcast_lag_seconds", 0.99))
            .round(),
    );
    Ok(())
}

fn wait_ready(node: &Process, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let text = metrics(node)?;
        if metric(&text, "flowattr_broadcast_caught_up", None) >= 1.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not caught up within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
