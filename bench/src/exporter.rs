//! The exporter's overhead: a real `flowattr-exporter` (shipping to a real collector with a
//! discarding sink) while this process churns short TCP connections on loopback, and holds
//! others open. It reports the exporter's CPU per 10K flows, the eBPF program's cost per run
//! and per flow, and the refresh of open connections' cost per cut and per open socket, from
//! the kernel's own accounting (`kernel.bpf_stats_enabled`, switched on for the run). Root.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::pipeline::collector_binary;
use crate::process::{Process, http_get, metric};

#[derive(Debug, Clone, clap::Args)]
pub struct ExporterArgs {
    /// The collector binary [default: next to this binary].
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// The exporter binary [default: next to this binary].
    #[arg(long)]
    pub exporter: Option<PathBuf>,
    /// Client threads making connections.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Connections per second to aim at (all threads together; 0: as fast as possible).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The exporter's `--wire-compression` (`zstd`, its default, or `none`).
    #[arg(long, default_value = "zstd")]
    pub wire_compression: String,
    /// Connections held open through the run (each end an open socket the exporter refreshes
    /// and reports at every cut).
    #[arg(long, default_value_t = 0)]
    pub open_connections: usize,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Reading {
    at: Instant,
    cpu: f64,
    flows: f64,
    runs: f64,
    run_ns: f64,
    refreshes: f64,
    refresh_ns: f64,
    lost: f64,
}

pub fn run(args: &ExporterArgs) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let stats_before = std::fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".into());
    std::fs::write(BPF_STATS, "1").context("enabling eBPF run statistics (needs root)")?;
    let result = measure(args, scratch.path());
    let _ = std::fs::write(BPF_STATS, stats_before.trim());
    result
}

fn measure(args: &ExporterArgs, scratch: &std::path::Path) -> anyhow::Result<()> {
    let collector = Process::start(
        Command::new(collector_binary(args.collector.as_ref())?)
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "none",
                "--cpus",
                "1",
            ])
            .args(["--storage", "memory", "--delay", "2s", "--sink", "discard"]),
        "collector",
        "flowattr-collector ready:",
    )?;
    let exporter_binary = match &args.exporter {
        Some(path) => path.clone(),
        None => collector_binary(None)?.with_file_name("flowattr-exporter"),
    };
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/flowattr-bench-{}", std::process::id()));
    let mut command = Command::new(exporter_binary);
    command
        .args([
            "run",
            "--interval",
            "2s",
            "--http-listen",
            "127.0.0.1:0",
            "--api-socket",
            "none",
        ])
        .arg("--collector")
        .arg(collector.address("ingest")?.to_string())
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(scratch.join("exporter"))
        .args(["--wire-compression", &args.wire_compression]);
    let exporter = Process::start(&mut command, "exporter", "flowattr-exporter ready:")?;
    // A log line: "... flowattr_exporter: metrics on http://ADDR"
    let api = exporter.address("on")?;
    let reading = |exporter: &Process| -> anyhow::Result<Reading> {
        let text = http_get(api, "/metrics")?;
        Ok(Reading {
            at: Instant::now(),
            cpu: exporter.cpu_seconds()?,
            flows: metric(&text, "flowattr_exporter_flows_captured_total", None),
            runs: metric(&text, "flowattr_exporter_ebpf_runs_total", None),
            run_ns: metric(&text, "flowattr_exporter_ebpf_run_seconds_total", None) * 1e9,
            refreshes: metric(&text, "flowattr_exporter_ebpf_refresh_runs_total", None),
            refresh_ns: metric(
                &text,
                "flowattr_exporter_ebpf_refresh_run_seconds_total",
                None,
            ) * 1e9,
            lost: metric(&text, "flowattr_exporter_events_lost_total", None),
        })
    };

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut stream) = stream {
                    let mut request = [0; 100];
                    if stream.read_exact(&mut request).is_ok() {
                        let _ = stream.write_all(&request);
                    }
                }
            }
        });
    }
    // Held open before the exporter's first counted interval: each end is one open socket.
    let held_listener = TcpListener::bind("127.0.0.1:0")?;
    let held_address = held_listener.local_addr()?;
    let mut held = Vec::with_capacity(args.open_connections);
    for _ in 0..args.open_connections {
        let client = TcpStream::connect(held_address).context("holding a connection open")?;
        let (server, _) = held_listener.accept()?;
        held.push((client, server));
    }
    let per_thread = (args.rate as f64 / args.threads.max(1) as f64).max(0.0);
    let clients: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut made = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut stream) = TcpStream::connect(address) {
                        let mut reply = [0; 100];
                        let _ = stream
                            .write_all(&[7; 100])
                            .and_then(|()| stream.read_exact(&mut reply));
                        made += 1;
                        connections.fetch_add(1, Ordering::Relaxed);
                    }
                    if per_thread > 0.0 {
                        let due = Duration::from_secs_f64(made as f64 / per_thread);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            })
        })
        .collect();
    // Past the first interval, so the exporter's counters are moving.
    std::thread::sleep(Duration::from_secs(3));
    let first = reading(&exporter)?;
    let connections_first = connections.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(args.seconds));
    let connections_made = connections.load(Ordering::Relaxed) - connections_first;
    // One more interval so the flows of the window are counted.
    std::thread::sleep(Duration::from_millis(2500));
    let last = reading(&exporter)?;
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(address);
    for client in clients {
        let _ = client.join();
    }
    let _ = std::fs::remove_dir_all(&pin_dir);

    let seconds = last.at.duration_since(first.at).as_secs_f64();
    let flows = last.flows - first.flows;
    let cpu = last.cpu - first.cpu;
    let runs = last.runs - first.runs;
    let run_ns = last.run_ns - first.run_ns;
    let refreshes = last.refreshes - first.refreshes;
    let refresh_ns = last.refresh_ns - first.refresh_ns;
    // Both ends of each held connection (the few churned ones open at a cut are left out).
    let open_sockets = 2 * held.len();
    drop(held);
    println!(
        "exporter overhead: {} client threads, {:.0} connections/s over {} s (each connection is 2 flows, one per end)",
        args.threads,
        connections_made as f64 / args.seconds as f64,
        args.seconds
    );
    println!(
        "  flows captured:            {:>10.0} flows/s",
        flows / seconds
    );
    println!(
        "  exporter CPU:              {:>10.1} % of one core",
        100.0 * cpu / seconds
    );
    println!(
        "  exporter CPU per 10K flows:{:>10.1} ms",
        1e3 * cpu / flows.max(1.0) * 1e4
    );
    println!(
        "  eBPF program:              {:>10.0} ns per run, {:.1} runs per flow, {:.0} ns per flow",
        run_ns / runs.max(1.0),
        runs / flows.max(1.0),
        run_ns / flows.max(1.0)
    );
    println!(
        "  refresh of open sockets:   {:>10.0} µs per cut ({:.0} cuts), {:.0} ns per open socket ({open_sockets} held open)",
        refresh_ns / refreshes.max(1.0) / 1e3,
        refreshes,
        refresh_ns / refreshes.max(1.0) / open_sockets.max(1) as f64
    );
    println!("  events lost (ring full):   {:>10.0}", last.lost);
    Ok(())
}
