//! The whole-pipeline benchmark: a real `flowattr-collector` process on some cores, a load
//! generator on the others, flows over loopback TCP with acks, the disk delay buffer on.
//! It reports sustained accepted and emitted flows per second, the collector's CPU use (so
//! flows per collector core-second), bytes per flow on disk, and the extra latency beyond
//! `delay` from the collector's own histogram.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flowattr_common::Timestamp;
use flowattr_common::client::CollectorConnection;
use flowattr_common::tls::ClientTls;
use flowattr_common::wire::{COMPRESSION_LEVEL, FrameCompressor, FrameKind, encode_frame};

use crate::process::{Process, histogram_quantile, http_get, metric};

mod comparison;
mod templates;
mod threads;

pub(crate) use comparison::median;
pub use templates::BatchShape;
use templates::templates;
pub use threads::CoresByWork;

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
    /// What a batch holds: one host's flows, as an exporter sends them (`host`), or flows
    /// between any two of `--ips` addresses (`random`: nothing repeats, the worst case for
    /// bytes and for the ownership map's size).
    #[arg(long, value_enum, default_value_t = BatchShape::Host)]
    pub shape: BatchShape,
    /// Distinct IPs in the simulated fleet, with `--shape random` (the host shape has 30 per
    /// host, one host per distinct batch).
    #[arg(long, default_value_t = 1_000_000)]
    pub ips: u32,
    /// Distinct batches, archived before the run and sent round-robin (each send with a new
    /// sequence number); with `--shape host`, one per host. Their flows are the distinct flows
    /// the collector sees.
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
    /// Collector sink: discard (count only), file:PATH (JSON lines), parquet:DIR, or kafka /
    /// kafka-columns / kafka-json (protobuf rows, protobuf columns, JSON; a broker is started
    /// for the run from FLOWATTR_KAFKA_BROKER, topic `flows`, on the generator's cores; its CPU
    /// is not the collector's and is reported apart).
    #[arg(long, default_value = "discard")]
    pub sink: String,
    /// A librdkafka property for the Kafka sink, KEY=VALUE, over the collector's defaults
    /// (`compression.type`, `linger.ms=5`, ...); repeatable.
    #[arg(long)]
    pub kafka_property: Vec<String>,
    /// The Kafka sink's `flows_per_message` [default: the collector's].
    #[arg(long)]
    pub flows_per_message: Option<usize>,
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
    /// Send plain frames, as exporters do with `--wire-compression none` (by default frames
    /// go zstd-compressed, as exporters send them; the generator compresses every send).
    #[arg(long)]
    pub plain_frames: bool,
    /// Also run with this sink, in turn with `--sink`, and print the share of its flows per
    /// collector core-second at the steady state (accepted and emitted averaged) that `--sink`
    /// reaches (e.g. `--sink kafka-columns --against discard`): a sink's cost measured in one
    /// run. Each run's delay buffer is `--data-dir`'s `comparison` directory, emptied first.
    #[arg(long)]
    pub against: Option<String>,
    /// With `--against`: pairs of runs; the median share is printed.
    #[arg(long, default_value_t = 3, requires = "against")]
    pub rounds: usize,
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

/// With `--tls`: the collector's `[tls]` section and the generator's side.
fn tls_setup(dir: &std::path::Path) -> anyhow::Result<(String, ClientTls)> {
    let pki = crate::pki::TestPki::new(dir, "bench")?;
    let node = pki.issue("collector", &[], &["127.0.0.1".parse()?])?;
    let generator = pki.issue("loadgen", &["loadgen.bench"], &[])?;
    let section = format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[tls.clients]]\nname = \"loadgen.bench\"\nclaims = [\"0.0.0.0/0\", \"::/0\"]\nrelay = true\n",
        node.ca, node.cert, node.key
    );
    Ok((section, ClientTls::from_files(&generator, None)?))
}

/// The Kafka sink's section, with `--kafka-property` over the collector's defaults.
fn kafka_sink_section(args: &PipelineArgs, brokers: &str) -> anyhow::Result<String> {
    let format = match args.sink.as_str() {
        "kafka-json" => "json",
        "kafka-columns" => "protobuf-columns",
        _ => "protobuf",
    };
    let mut properties = Vec::new();
    for property in &args.kafka_property {
        let (key, value) = property
            .split_once('=')
            .with_context(|| format!("--kafka-property {property}: not KEY=VALUE"))?;
        properties.push(format!("{key:?} = {value:?}"));
    }
    let flows_per_message = args.flows_per_message.map_or_else(String::new, |flows| {
        format!("flows_per_message = {flows}\n")
    });
    Ok(format!(
        "[[sinks]]\nkind = \"kafka\"\nbrokers = {brokers:?}\ntopic = \"flows\"\nformat = \"{format}\"\n{flows_per_message}properties = {{ {} }}\n",
        properties.join(", ")
    ))
}

/// `sink`: the `--sink` flag, or None when `config` holds the sinks.
fn start_collector(
    args: &PipelineArgs,
    data_dir: &std::path::Path,
    sink: Option<&str>,
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
        .args(sink.map(|sink| ["--sink", sink]).into_iter().flatten());
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
    /// What a Kafka sink sent its brokers (after compression).
    sink_transmitted: f64,
    cpu: f64,
    /// CPU seconds by thread name.
    threads: std::collections::BTreeMap<String, f64>,
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
        sink_transmitted: metric(&text, "flowattr_sink_transmitted_bytes_total", None),
        cpu: collector.cpu_seconds()?,
        threads: collector.cpu_seconds_by_thread_name()?,
        metrics: text,
    })
}

/// A sample taken just after a Kafka sink's client refreshed its statistics (every second),
/// where its count of bytes sent is current: sampled at any moment, that count lags the flows
/// by up to a second, a twentieth of a 20 s window.
fn sample_at_statistics(collector: &Process, kafka: bool) -> anyhow::Result<Sample> {
    let mut previous = sample(collector)?;
    if !kafka {
        return Ok(previous);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let next = sample(collector)?;
        if next.sink_transmitted != previous.sink_transmitted {
            return Ok(next);
        }
        previous = next;
    }
    Ok(previous)
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
    /// The same, by what the threads do.
    pub cores_by_work: CoresByWork,
    pub broker_cores: Option<f64>,
    /// Delay buffer bytes per accepted flow.
    pub delay_bytes_per_flow: f64,
    /// Ingest protocol bytes per flow (frames as sent).
    pub wire_bytes_per_flow: f64,
    /// What framing a batch cost the generator per flow (compressing it, unless
    /// `--plain-frames`): an exporter's cost for the same batch.
    pub framing_ns_per_flow: f64,
    /// Bytes a file, Parquet or Kafka sink wrote or produced per emitted flow.
    pub sink_bytes_per_flow: Option<f64>,
    /// Bytes a Kafka sink sent its brokers per emitted flow: after compression.
    pub kafka_transmitted_bytes_per_flow: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The collector's RSS at the end.
    pub resident_bytes: f64,
    pub ceiling: Option<crate::disk::DiskCeiling>,
}

pub fn run(args: &PipelineArgs) -> anyhow::Result<()> {
    if let Some(against) = &args.against {
        return comparison::run(args, against);
    }
    let result = measure(args)?;
    print(args, &result);
    Ok(())
}

/// Bytes under a file sink's path or a Parquet sink's directory (Kafka's are counted by the
/// collector).
fn sink_bytes(sink: Option<&str>) -> Option<f64> {
    let sink = sink?;
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
    let made = Instant::now();
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
    // The CPUs that stand for other machines: the load generator's and the broker's.
    let elsewhere: Vec<core_affinity::CoreId> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .skip(args.collector_cpus)
        .collect();
    // A broker of the run's own for the Kafka sinks, kept off the collector's cores as the
    // generator is: a broker shares no cores with the collector in a fleet, and on one of
    // them it would take the CPU and the caches that the measurement gives the collector.
    let broker = match args.sink.as_str() {
        "kafka" | "kafka-columns" | "kafka-json" => {
            let broker =
                crate::process::Broker::start(&crate::process::Broker::binary_from_env()?)?;
            if !elsewhere.is_empty() {
                broker.keep_on(&elsewhere.iter().map(|core| core.id).collect::<Vec<_>>())?;
            }
            broker.create_topic("flows", 1)?;
            Some(broker)
        }
        _ => None,
    };
    let tls = args.tls.then(|| tls_setup(temporary.path())).transpose()?;
    let mut config = tls
        .as_ref()
        .map_or_else(String::new, |(section, _)| section.clone());
    let sink = match &broker {
        Some(broker) => {
            config += &kafka_sink_section(args, &broker.address)?;
            None
        }
        None => Some(args.sink.as_str()),
    };
    let config_file = temporary.path().join("collector.toml");
    std::fs::write(&config_file, &config)?;
    let collector = start_collector(args, &data_dir, sink, Some(&config_file))?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent_flows = Arc::new(AtomicU64::new(0));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let framing_ns = Arc::new(AtomicU64::new(0));
    let mut generators = Vec::new();
    for connection in 0..args.connections {
        let templates = templates.clone();
        let stop = stop.clone();
        let sent_flows = sent_flows.clone();
        let sent_bytes = sent_bytes.clone();
        let framing_ns = framing_ns.clone();
        let plain_frames = args.plain_frames;
        let ingest = collector.address("ingest")?;
        let core = (!elsewhere.is_empty()).then(|| elsewhere[connection % elsewhere.len()]);
        let rate = args.rate;
        let shape = args.shape;
        let connections = args.connections;
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
            let mut compressor = match plain_frames {
                true => None,
                false => Some(FrameCompressor::new(COMPRESSION_LEVEL)?),
            };
            let mut unacked = 0usize;
            let window = 4;
            let started = Instant::now();
            let mut sequence = (connection as u64) << 40;
            let mut sent = 0u64;
            // The connections take turns through the templates, each its own share of them: a
            // template sent by two at once, at a capped rate in step, would reach the collector
            // twice in a row, and a sink's compressor would find its second copy for free.
            let mut turn = connection;
            while !stop.load(Ordering::Relaxed) {
                let template = &templates[turn % templates.len()];
                turn += connections;
                // The random shape sends the same minute again and again: its map keeps its
                // size, as a worst case that stays put.
                let shift = match shape {
                    BatchShape::Host => made.elapsed(),
                    BatchShape::Random => Duration::ZERO,
                };
                template.patch(&mut payload, sequence, shift);
                frame.clear();
                let framing = Instant::now();
                match compressor.as_mut() {
                    Some(compressor) => compressor.encode_archive(
                        FrameKind::MeasuredFlowBatch,
                        &payload,
                        &template.arrays,
                        &mut frame,
                    )?,
                    None => encode_frame(FrameKind::MeasuredFlowBatch, &payload, &mut frame)?,
                }
                framing_ns.fetch_add(framing.elapsed().as_nanos() as u64, Ordering::Relaxed);
                client.send_raw(&frame)?;
                sent_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
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
    let kafka = broker.is_some();
    let (first, first_broker, first_sink) = (
        sample_at_statistics(&collector, kafka)?,
        broker_cpu()?,
        sink_bytes(sink),
    );
    std::thread::sleep(Duration::from_secs(args.seconds));
    let (last, last_broker, last_sink) = (
        sample_at_statistics(&collector, kafka)?,
        broker_cpu()?,
        sink_bytes(sink),
    );
    stop.store(true, Ordering::Relaxed);
    for generator in generators {
        generator.join().expect("generator thread")?;
    }
    let seconds = last.at.duration_since(first.at).as_secs_f64();
    let cores_used = (last.cpu - first.cpu) / seconds;
    let text = http_get(collector.address("http")?, "/metrics")?;
    Ok(PipelineResult {
        seconds,
        accepted: (last.accepted - first.accepted) / seconds,
        emitted: (last.emitted - first.emitted) / seconds,
        attributed_share: (last.attributed - first.attributed)
            / (last.emitted - first.emitted).max(1.0),
        cores_used,
        cores_by_work: CoresByWork::between(&first.threads, &last.threads, seconds, cores_used),
        broker_cores: first_broker
            .zip(last_broker)
            .map(|(first, last)| (last - first) / seconds),
        delay_bytes_per_flow: (last.written - first.written)
            / (last.accepted - first.accepted).max(1.0),
        // Every frame the generators sent, as sent (compressed, unless `--plain-frames`).
        wire_bytes_per_flow: sent_bytes.load(Ordering::Relaxed) as f64
            / sent_flows.load(Ordering::Relaxed).max(1) as f64,
        framing_ns_per_flow: framing_ns.load(Ordering::Relaxed) as f64
            / sent_flows.load(Ordering::Relaxed).max(1) as f64,
        sink_bytes_per_flow: match &broker {
            // Produced, before the producer's compression.
            Some(_) => {
                Some((last.sink_bytes - first.sink_bytes) / (last.emitted - first.emitted).max(1.0))
            }
            None => first_sink
                .zip(last_sink)
                .map(|(before, after)| (after - before) / (last.emitted - first.emitted).max(1.0)),
        },
        kafka_transmitted_bytes_per_flow: broker.as_ref().map(|_| {
            (last.sink_transmitted - first.sink_transmitted)
                / (last.emitted - first.emitted).max(1.0)
        }),
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

impl PipelineResult {
    /// What the sink puts on the node's disk or network per flow: for Kafka, what went to the
    /// brokers after compression; for files, what was written.
    pub fn sink_bytes_out(&self) -> f64 {
        self.kafka_transmitted_bytes_per_flow
            .or(self.sink_bytes_per_flow)
            .unwrap_or(0.0)
    }

    /// Flows per collector core-second at the steady state: the mean of the accepted and the
    /// emitted rates over the collector's CPU. Every flow is taken in once and released once a
    /// delay later, and a shard at full load swings between the two with a period of about
    /// two delays (more taken in while less is due for release, then the reverse), so over a
    /// window of a few periods either rate alone is off by up to a tenth, one up when the
    /// other is down. Their mean is off only by that swing times the difference between what
    /// taking in and releasing a flow cost: not at all where they cost alike.
    pub fn flows_per_core_second(&self) -> f64 {
        (self.accepted + self.emitted) / 2.0 / self.cores_used.max(0.01)
    }

    /// Collector CPU-seconds per million flows, at the steady state
    /// ([`Self::flows_per_core_second`]).
    pub fn cpu_seconds_per_million(&self) -> f64 {
        1e6 / self.flows_per_core_second().max(1.0)
    }
}

fn print(args: &PipelineArgs, result: &PipelineResult) {
    println!(
        "pipeline benchmark: {} collector core(s), {} generator connection(s), {} flows/batch, {}, {} distinct batches, delay {:?}, sink {}, {:.0} s measured",
        args.collector_cpus,
        args.connections,
        args.batch_flows,
        match args.shape {
            BatchShape::Host => format!(
                "host-shaped batches ({} hosts of 30 pods)",
                args.templates.max(2)
            ),
            BatchShape::Random => format!("random batches over {} IPs", args.ips),
        },
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
        "  collector CPU:              {:>10.2} cores ({})",
        result.cores_used, result.cores_by_work
    );
    if let Some(cores) = result.broker_cores {
        println!("  broker CPU (apart):         {:>10.2} cores", cores);
    }
    println!(
        "  per collector core-second:  {:>10.0} flows accepted and {:.0} emitted, {:.0} at the steady state (their mean)",
        result.accepted / result.cores_used.max(0.01),
        result.emitted / result.cores_used.max(0.01),
        result.flows_per_core_second()
    );
    println!(
        "  delay buffer on disk:       {:>10.1} bytes/flow (blocks, dictionaries included)",
        result.delay_bytes_per_flow
    );
    println!(
        "  exporter -> collector:      {:>10.1} bytes/flow (frames as sent; framing them took the generator {:.0} ns/flow)",
        result.wire_bytes_per_flow, result.framing_ns_per_flow
    );
    if let Some(bytes) = result.sink_bytes_per_flow {
        println!(
            "  sink output:                {bytes:>10.1} bytes/flow (Kafka: produced, before compression)"
        );
    }
    if let Some(bytes) = result.kafka_transmitted_bytes_per_flow {
        println!(
            "  sent to Kafka:              {bytes:>10.1} bytes/flow (after compression, with the protocol's framing)"
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
