//! The whole-pipeline benchmark: a real `flowattr-collector` process on some cores, a load
//! generator on the others, flows over loopback TCP with acks, the disk delay buffer on.
//! It reports sustained accepted and emitted flows per second, the collector's CPU use (so
//! flows per collector core-second), bytes per flow on disk, and the extra latency beyond
//! `delay` from the collector's own histogram.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flowattr_common::client::CollectorConnection;
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{
    ExporterId, FlowBatch, FlowRecord, FrameKind, HostFlowBatch, WorkloadIndex, encode_frame,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp, WorkloadIdentity};

use crate::process::{Process, histogram_quantile, http_get, metric};

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// The collector binary [default: flowattr-collector next to this binary].
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// Collector executors (cores).
    #[arg(long, default_value_t = 1)]
    pub collector_cpus: usize,
    /// Load generator connections (each on its own thread, pinned after the collector's cores).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Flows per batch.
    #[arg(long, default_value_t = 4096)]
    pub batch_flows: usize,
    /// Distinct IPs in the simulated fleet.
    #[arg(long, default_value_t = 1_000_000)]
    pub ips: u32,
    /// Distinct batches, archived before the run and sent round-robin (each send with a new
    /// sequence number). Their flows are the distinct flows the collector sees.
    #[arg(long, default_value_t = 256)]
    pub templates: usize,
    /// Measured seconds (after the delay has passed once, so release runs too).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The collector's delay.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    /// The collector's segment span (arrival time one segment file covers).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub segment_span: Duration,
    /// Collector sink: discard (count only), file:PATH (JSON lines), or kafka / kafka-json (a
    /// broker is started for the run from FLOWATTR_KAFKA_BROKER, topic `flows`; its CPU is not
    /// the collector's and is reported apart).
    #[arg(long, default_value = "discard")]
    pub sink: String,
    /// Delay buffer directory [default: a temporary directory].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Offered load cap in flows/s per connection (0: as fast as acks allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// First measure the data directory's disk ceiling (`flowattr-bench disk`, this many MiB)
    /// and report the pipeline's disk traffic as a share of it.
    #[arg(long)]
    pub disk_ceiling_mib: Option<u64>,
    /// Mutual TLS between the load generator and the collector, with certificates from a
    /// throwaway CA; the generator's certificate may claim every IP (checked per record).
    #[arg(long)]
    pub tls: bool,
}

impl PipelineArgs {
    /// Every option at its default, for runs started from code (`flowattr-bench calibrate`).
    pub fn defaults() -> PipelineArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            args: PipelineArgs,
        }
        Defaults::parse_from(["pipeline"]).args
    }
}

/// One batch, archived once; each send patches in a fresh sequence number and re-frames it.
struct Template {
    payload: Vec<u8>,
    sequence_at: usize,
    flows: usize,
}

/// A value no real field of a template batch holds: where it lands in the archive is where
/// the sequence lives.
const SEQUENCE_MARKER: u64 = 0x5EC0_ED5E_C0ED_5EC0;

fn templates(args: &PipelineArgs, now: Timestamp) -> anyhow::Result<Vec<Template>> {
    let mut rng = fastrand::Rng::with_seed(42);
    // Identities as a Kubernetes node's exporter sends them: name, namespace, pod, owner kind.
    let workloads: Vec<String> = (0..64)
        .map(|i| {
            let (name, pod) = (
                format!("shop/svc-{i:02}"),
                format!("svc-{i:02}-7d9f8b6c5d-x2x9q"),
            );
            WorkloadIdentity {
                name: &name,
                namespace: "shop",
                instance: &pod,
                owner_kind: "Deployment",
            }
            .key()
        })
        .collect();
    (0..args.templates.max(1))
        .map(|_| {
            // Every connection is reported by both ends, as in a fleet where every host runs
            // an exporter: the record from the remote's side is its heartbeat.
            let mut flows: Vec<FlowRecord> = Vec::with_capacity(args.batch_flows);
            let ip = |i: u32| CanonicalIp::from(Ipv4Addr::from(0x0A00_0000 + i));
            while flows.len() < args.batch_flows {
                let local = rng.u32(..args.ips);
                let remote = rng.u32(..args.ips);
                let start = now.saturating_sub(Duration::from_millis(rng.u64(1_000..60_000)));
                let outbound = FlowRecord {
                    local_ip: ip(local),
                    remote_ip: ip(remote),
                    local_port: rng.u16(1024..),
                    remote_port: 443,
                    local_workload: Some(WorkloadIndex(local % workloads.len() as u32)),
                    local_shared: false,
                    start,
                    end: start.saturating_add(Duration::from_millis(rng.u64(1..500))),
                    bytes_sent: rng.u64(100..50_000),
                    bytes_received: rng.u64(100..50_000),
                    segments_sent: rng.u32(1..60),
                    segments_received: rng.u32(1..60),
                    retransmits: u32::from(rng.u8(..100) == 0),
                    direction: Direction::Outbound,
                    state: FlowState::Closed,
                };
                let inbound = FlowRecord {
                    local_ip: outbound.remote_ip,
                    remote_ip: outbound.local_ip,
                    local_port: outbound.remote_port,
                    remote_port: outbound.local_port,
                    local_workload: Some(WorkloadIndex(remote % workloads.len() as u32)),
                    bytes_sent: outbound.bytes_received,
                    bytes_received: outbound.bytes_sent,
                    segments_sent: outbound.segments_received,
                    segments_received: outbound.segments_sent,
                    direction: Direction::Inbound,
                    ..outbound
                };
                flows.push(outbound);
                flows.push(inbound);
            }
            flows.truncate(args.batch_flows);
            let batch = FlowBatch {
                exporter: ExporterId(1),
                sequence: SEQUENCE_MARKER,
                region: "bench".into(),
                workloads: workloads.clone(),
                flows,
            };
            let batch = HostFlowBatch {
                host: "ip-10-1-2-3.ec2.internal".into(),
                clock: None,
                batch,
            };
            let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&batch)?.to_vec();
            let marker = SEQUENCE_MARKER.to_le_bytes();
            let positions: Vec<usize> = payload
                .windows(8)
                .enumerate()
                .filter(|(_, window)| *window == marker)
                .map(|(at, _)| at)
                .collect();
            let [sequence_at] = positions[..] else {
                bail!(
                    "the sequence marker appears {} times in the archive",
                    positions.len()
                );
            };
            Ok(Template {
                payload,
                sequence_at,
                flows: args.batch_flows,
            })
        })
        .collect()
}

/// The collector binary next to this one, or `--collector`.
pub fn collector_binary(explicit: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match explicit {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("the bench binary has a directory")?
            .join("flowattr-collector")),
    }
}

/// With `--tls`: the collector's config file (only its `[tls]`) and the generator's side.
fn tls_setup(dir: &std::path::Path) -> anyhow::Result<(PathBuf, ClientTls)> {
    let pki = crate::pki::TestPki::new(dir, "bench")?;
    let node = pki.issue("collector", &[], &["127.0.0.1".parse()?])?;
    let generator = pki.issue("loadgen", &["loadgen.bench"], &[])?;
    let config = dir.join("collector-tls.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[tls.clients]]\nname = \"loadgen.bench\"\nclaims = [\"0.0.0.0/0\", \"::/0\"]\nrelay = true\n",
            node.ca, node.cert, node.key
        ),
    )?;
    Ok((config, ClientTls::from_files(&generator, None)?))
}

fn start_collector(
    args: &PipelineArgs,
    data_dir: &std::path::Path,
    sink: &str,
    config: Option<&std::path::Path>,
) -> anyhow::Result<Process> {
    let binary = collector_binary(args.collector.as_ref())?;
    let mut command = Command::new(&binary);
    command.arg("run");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--cpus", &args.collector_cpus.to_string()])
        .args(["--storage", "disk", "--data-dir"])
        .arg(data_dir)
        .args([
            "--delay",
            &humantime::format_duration(args.delay).to_string(),
        ])
        .args([
            "--segment-span",
            &humantime::format_duration(args.segment_span).to_string(),
        ])
        .args(["--retry-delay", "5s", "--max-retries", "1"])
        .args(["--sink", sink]);
    Process::start(&mut command, "collector", "flowattr-collector ready:")
}

struct Sample {
    at: Instant,
    accepted: f64,
    emitted: f64,
    written: f64,
    attributed: f64,
    /// What the sinks count of their own bytes (files and Kafka, not Parquet).
    sink_bytes: f64,
    cpu: f64,
    metrics: String,
}

fn sample(collector: &Process) -> anyhow::Result<Sample> {
    let text = http_get(collector.address("http")?, "/metrics")?;
    Ok(Sample {
        at: Instant::now(),
        accepted: metric(&text, "flowattr_flows_received_total", None),
        emitted: metric(&text, "flowattr_flows_emitted_total", None),
        written: metric(&text, "flowattr_delay_bytes_written_total", None),
        attributed: metric(
            &text,
            "flowattr_flows_emitted_total",
            Some("result=\"attributed\""),
        ),
        sink_bytes: metric(&text, "flowattr_sink_bytes_total", None),
        cpu: collector.cpu_seconds()?,
        metrics: text,
    })
}

/// What a run measured, at the steady state.
#[derive(Debug, Clone)]
pub struct PipelineResult {
    pub seconds: f64,
    /// Flows durable and acked per second.
    pub accepted: f64,
    pub emitted: f64,
    pub attributed_share: f64,
    /// Collector CPU, cores.
    pub cores_used: f64,
    pub broker_cores: Option<f64>,
    /// Delay buffer bytes per accepted flow.
    pub delay_bytes_per_flow: f64,
    /// Ingest protocol bytes per flow (the template frames).
    pub wire_bytes_per_flow: f64,
    /// Bytes a file, Parquet or Kafka sink wrote or produced per emitted flow.
    pub sink_bytes_per_flow: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The collector's RSS at the end.
    pub resident_bytes: f64,
    pub ceiling: Option<crate::disk::DiskCeiling>,
}

pub fn run(args: &PipelineArgs) -> anyhow::Result<()> {
    let result = measure(args)?;
    print(args, &result);
    Ok(())
}

/// Bytes under a file sink's path or a Parquet sink's directory (Kafka's are counted by the
/// collector).
fn sink_bytes(sink: &str) -> Option<f64> {
    let path = sink
        .strip_prefix("file:")
        .or_else(|| sink.strip_prefix("parquet:"))?;
    let path = std::path::Path::new(path);
    if path.is_dir() {
        let entries = std::fs::read_dir(path).ok()?;
        Some(
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .map(|meta| meta.len() as f64)
                .sum(),
        )
    } else {
        Some(std::fs::metadata(path).map_or(0.0, |meta| meta.len() as f64))
    }
}

pub fn measure(args: &PipelineArgs) -> anyhow::Result<PipelineResult> {
    let temporary = tempfile::tempdir()?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temporary.path().join("buffer"));
    let now = Timestamp::now();
    let templates = Arc::new(templates(args, now)?);
    if args.disk_ceiling_mib.is_some() {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
    }
    let ceiling = match args.disk_ceiling_mib {
        Some(mib) => Some(crate::disk::measure(&crate::disk::DiskArgs {
            // The collector creates it too; the scratch file must land on the same disk.
            dir: data_dir.clone(),
            bytes: mib << 20,
            request: 1 << 20,
            depth: 8,
        })?),
        None => None,
    };
    // A broker of the run's own for the Kafka sinks.
    let broker = match args.sink.as_str() {
        "kafka" | "kafka-json" => {
            let broker =
                crate::process::Broker::start(&crate::process::Broker::binary_from_env()?)?;
            broker.create_topic("flows", 1)?;
            Some(broker)
        }
        _ => None,
    };
    let sink = match &broker {
        Some(broker) => format!("{}:{}/flows", args.sink, broker.address),
        None => args.sink.clone(),
    };
    let tls = args.tls.then(|| tls_setup(temporary.path())).transpose()?;
    let collector = start_collector(
        args,
        &data_dir,
        &sink,
        tls.as_ref().map(|(config, _)| config.as_path()),
    )?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let stop = Arc::new(AtomicBool::new(false));
    let sent_flows = Arc::new(AtomicU64::new(0));
    let mut generators = Vec::new();
    for connection in 0..args.connections {
        let templates = templates.clone();
        let stop = stop.clone();
        let sent_flows = sent_flows.clone();
        let ingest = collector.address("ingest")?;
        let core = cores
            .get(
                args.collector_cpus
                    + connection % cores.len().saturating_sub(args.collector_cpus).max(1),
            )
            .copied();
        let rate = args.rate;
        let client_tls = tls.as_ref().map(|(_, client)| client.clone());
        generators.push(std::thread::spawn(move || -> anyhow::Result<()> {
            if let Some(core) = core {
                core_affinity::set_for_current(core);
            }
            let mut client = CollectorConnection::connect_with(
                ingest,
                Duration::from_secs(60),
                client_tls.as_ref(),
            )?;
            let mut frame = Vec::new();
            let mut payload = Vec::new();
            let mut unacked = 0usize;
            let window = 4;
            let started = Instant::now();
            let mut sequence = (connection as u64) << 40;
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let template = &templates[(sequence % templates.len() as u64) as usize];
                payload.clear();
                payload.extend_from_slice(&template.payload);
                payload[template.sequence_at..template.sequence_at + 8]
                    .copy_from_slice(&sequence.to_le_bytes());
                frame.clear();
                encode_frame(FrameKind::HostFlowBatch, &payload, &mut frame)?;
                client.send_raw(&frame)?;
                sequence += 1;
                unacked += 1;
                sent += template.flows as u64;
                sent_flows.fetch_add(template.flows as u64, Ordering::Relaxed);
                if unacked >= window {
                    client.recv_ack()?;
                    unacked -= 1;
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            while unacked > 0 {
                client.recv_ack()?;
                unacked -= 1;
            }
            Ok(())
        }));
    }
    // Warm up past one delay so that release (read back, attribute, emit) runs in the window.
    let warmup = args.delay * 2 + Duration::from_secs(5);
    eprintln!(
        "warming up for {warmup:?} (two delays and 5 s, to reach a steady state), then measuring for {} s",
        args.seconds
    );
    std::thread::sleep(warmup);
    let broker_cpu = || {
        broker
            .as_ref()
            .map(|broker| broker.cpu_seconds())
            .transpose()
    };
    let (first, first_broker, first_sink) = (sample(&collector)?, broker_cpu()?, sink_bytes(&sink));
    std::thread::sleep(Duration::from_secs(args.seconds));
    let (last, last_broker, last_sink) = (sample(&collector)?, broker_cpu()?, sink_bytes(&sink));
    stop.store(true, Ordering::Relaxed);
    for generator in generators {
        generator.join().expect("generator thread")?;
    }
    let seconds = last.at.duration_since(first.at).as_secs_f64();
    let text = http_get(collector.address("http")?, "/metrics")?;
    let template_bytes: usize = templates
        .iter()
        .map(|template| template.payload.len() + flowattr_common::wire::HEADER_BYTES)
        .sum();
    let template_flows: usize = templates.iter().map(|template| template.flows).sum();
    Ok(PipelineResult {
        seconds,
        accepted: (last.accepted - first.accepted) / seconds,
        emitted: (last.emitted - first.emitted) / seconds,
        attributed_share: (last.attributed - first.attributed)
            / (last.emitted - first.emitted).max(1.0),
        cores_used: (last.cpu - first.cpu) / seconds,
        broker_cores: first_broker
            .zip(last_broker)
            .map(|(first, last)| (last - first) / seconds),
        delay_bytes_per_flow: (last.written - first.written)
            / (last.accepted - first.accepted).max(1.0),
        wire_bytes_per_flow: template_bytes as f64 / template_flows.max(1) as f64,
        sink_bytes_per_flow: match &broker {
            // Produced, before the producer's compression.
            Some(_) => {
                Some((last.sink_bytes - first.sink_bytes) / (last.emitted - first.emitted).max(1.0))
            }
            None => first_sink
                .zip(last_sink)
                .map(|(before, after)| (after - before) / (last.emitted - first.emitted).max(1.0)),
        },
        p50_ms: 1000.0
            * histogram_quantile(
                &first.metrics,
                &last.metrics,
                "flowattr_release_extra_latency_seconds",
                0.5,
            ),
        p99_ms: 1000.0
            * histogram_quantile(
                &first.metrics,
                &last.metrics,
                "flowattr_release_extra_latency_seconds",
                0.99,
            ),
        resident_bytes: metric(&text, "flowattr_resident_memory_bytes", None),
        ceiling,
    })
}

fn print(args: &PipelineArgs, result: &PipelineResult) {
    println!(
        "pipeline benchmark: {} collector core(s), {} generator connection(s), {} flows/batch, {} IPs, {} distinct batches, delay {:?}, sink {}, {:.0} s measured",
        args.collector_cpus,
        args.connections,
        args.batch_flows,
        args.ips,
        args.templates,
        args.delay,
        args.sink,
        result.seconds
    );
    println!(
        "  accepted (durable + acked): {:>10.0} flows/s",
        result.accepted
    );
    println!(
        "  emitted:                    {:>10.0} flows/s ({:.1}% attributed)",
        result.emitted,
        100.0 * result.attributed_share
    );
    println!(
        "  collector CPU:              {:>10.2} cores",
        result.cores_used
    );
    if let Some(cores) = result.broker_cores {
        println!("  broker CPU (apart):         {:>10.2} cores", cores);
    }
    println!(
        "  per collector core-second:  {:>10.0} flows accepted and {:.0} emitted",
        result.accepted / result.cores_used.max(0.01),
        result.emitted / result.cores_used.max(0.01)
    );
    println!(
        "  delay buffer on disk:       {:>10.1} bytes/flow (blocks, dictionaries included)",
        result.delay_bytes_per_flow
    );
    if let Some(bytes) = result.sink_bytes_per_flow {
        println!(
            "  sink output:                {bytes:>10.1} bytes/flow (Kafka: produced, before compression)"
        );
    }
    if let Some(ceiling) = &result.ceiling {
        // Every accepted byte is written once and read once after the delay.
        let buffered = result.accepted * result.delay_bytes_per_flow;
        println!(
            "  disk traffic:               {:>10.1} MB/s written and as much read, {:.1}% of the ceiling measured first ({:.0} MB/s write, {:.0} MB/s read, {:.0} MB/s written-then-read)",
            buffered / 1e6,
            100.0 * buffered / ceiling.write_then_read(),
            ceiling.write / 1e6,
            ceiling.read / 1e6,
            ceiling.write_then_read() / 1e6
        );
    }
    println!(
        "  extra latency beyond delay: p50 {:.0} ms, p99 {:.0} ms",
        result.p50_ms, result.p99_ms
    );
}
