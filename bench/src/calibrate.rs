//! `flowattr-bench calibrate`: measures what the capacity planner multiplies (CPU per flow by
//! sink, bytes per flow on the wire, in the delay buffer and out of the sink, bytes per IP and
//! per segment in the ownership map, bytes per broadcast range, an idle node's memory, the
//! disk's ceiling) and writes them as a calibration file for `flowattr-plan`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flowattr_collector::ownership::{Heartbeat, OwnershipConfig, OwnershipMap, SourceId};
use flowattr_common::wire::{RangeUpdate, RangeUpdateBatch, Span, encode_message};
use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};
use flowattr_tuning::calibration::{Calibration, Measured};

use crate::pipeline::{PipelineArgs, measure};

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// Where to write the calibration (TOML).
    #[arg(long, default_value = "tuning/calibration.toml")]
    pub out: PathBuf,
    /// Measured seconds of each pipeline run.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Pipeline runs per sink; the median of each figure is kept (one run moves by a fifth
    /// on a small, shared machine).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The share of the collector's cores each sink is measured at: a steady offered rate of
    /// this much of what a short unthrottled probe says the cores carry.
    #[arg(long, default_value_t = 0.7)]
    pub load: f64,
    /// Collector cores of each pipeline run.
    #[arg(long, default_value_t = 1)]
    pub collector_cpus: usize,
    /// Scratch directory for the delay buffer, sink files and the disk measurement (on the
    /// disk the planner should assume).
    #[arg(long, default_value = "target/calibrate")]
    pub dir: PathBuf,
    /// The collector binary [default: flowattr-collector next to this binary].
    #[arg(long)]
    pub collector: Option<PathBuf>,
    /// Describes this machine in the file [default: CPU model, cores and memory read here].
    #[arg(long)]
    pub machine: Option<String>,
}

/// The sinks measured, by the names the planner takes, and how the pipeline names them. The
/// Kafka sink produces protobuf to a broker the run starts (`FLOWATTR_KAFKA_BROKER`), on the
/// same machine: its CPU is not the collector's. The sinks that write the local disk go last:
/// a disk with burst credits (EBS gp2, many VMs' disks) is throttled once a file sink has
/// spent them, and the delay buffer of every run after would wait on it.
fn sinks(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("discard", "discard".into()),
        ("kafka", "kafka".into()),
        ("kafka-columns", "kafka-columns".into()),
        (
            "parquet",
            format!("parquet:{}", dir.join("parquet").display()),
        ),
        (
            "json-file",
            format!("file:{}", dir.join("flows.jsonl").display()),
        ),
    ]
}

pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    if !(args.load > 0.0 && args.load <= 1.0) {
        anyhow::bail!("--load must be above 0 and at most 1");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut cpu = BTreeMap::new();
    let mut sink_bytes = BTreeMap::new();
    // The bytes on the wire and in the delay buffer are the engine's whatever the sink: kept
    // from the discard sink's runs, which hold the highest steady rate, as a loaded node does
    // (a slower sink's runs buffer smaller blocks, each dictionary shared by fewer flows).
    let mut wire = 0.0;
    let mut delay = 0.0;
    let mut offered = BTreeMap::new();
    for (name, sink) in sinks(&args.dir) {
        let run = |rate: f64, seconds: u64| -> anyhow::Result<crate::pipeline::PipelineResult> {
            let _ = std::fs::remove_dir_all(args.dir.join("buffer"));
            let _ = std::fs::remove_dir_all(args.dir.join("parquet"));
            let _ = std::fs::remove_file(args.dir.join("flows.jsonl"));
            let defaults = PipelineArgs::defaults();
            measure(&PipelineArgs {
                collector: args.collector.clone(),
                collector_cpus: args.collector_cpus,
                seconds,
                sink: sink.clone(),
                data_dir: Some(args.dir.join("buffer")),
                // The generator's cap is per connection.
                rate: (rate / defaults.connections as f64) as u64,
                ..defaults
            })
        };
        // Unthrottled, a sink slower than ingest makes the node pause intake while release
        // catches up, and a window catches the draining more than the steady state (it read
        // the JSON sink's cost 70% high). The probe only estimates the cost; the figure is
        // measured at a steady offered rate of `load` of what that estimate says the cores
        // carry, which is also where a planned node runs.
        let probe = run(0.0, args.seconds.div_ceil(2).max(10))?;
        let mut rate = args.load * args.collector_cpus as f64 * probe.flows_per_core_second();
        let mut runs = Vec::new();
        let mut attempts = 0;
        let mut refinements = 0;
        while runs.len() < args.rounds.max(1) {
            let result = run(rate, args.seconds)?;
            let steady = result.accepted >= 0.95 * rate
                && (result.emitted - result.accepted).abs() <= 0.05 * result.accepted;
            eprintln!(
                "calibrate: sink {name}: offered {rate:.0}, accepted {:.0}, emitted {:.0} flows/s on {:.2} cores ({:.3} CPU-s per million), {:.1} sink bytes/flow{}",
                result.accepted,
                result.emitted,
                result.cores_used,
                result.cpu_seconds_per_million(),
                result.sink_bytes_out(),
                if steady {
                    ""
                } else {
                    ": not steady, offering less"
                },
            );
            attempts += 1;
            if !steady {
                if attempts >= 3 * args.rounds.max(1) {
                    anyhow::bail!(
                        "sink {name} never reached a steady state (last offered {rate:.0} flows/s)"
                    );
                }
                rate *= 0.8;
                // Where the sink cannot keep up, aiming higher again would only repeat this.
                refinements = 2;
                runs.clear();
                continue;
            }
            let cpu = result.cpu_seconds_per_million();
            // The probe overstates slow sinks' cost, so the first steady run can land well
            // below the load asked for; aim again from the steady cost, and start the rounds
            // over there. Only the first run at a rate is judged so: a later round off by as
            // much is the machine's noise, which the median of the rounds absorbs.
            let used = result.cores_used / args.collector_cpus as f64;
            if runs.is_empty() && refinements < 2 && (used - args.load).abs() > 0.15 * args.load {
                refinements += 1;
                rate = args.load * args.collector_cpus as f64 / (cpu / 1e6);
                runs.clear();
                continue;
            }
            runs.push(result);
        }
        let median = |pick: fn(&crate::pipeline::PipelineResult) -> f64| {
            crate::pipeline::median(&runs.iter().map(pick).collect::<Vec<_>>())
        };
        cpu.insert(name.to_owned(), median(|run| run.cpu_seconds_per_million()));
        // Discarding writes nothing.
        sink_bytes.insert(name.to_owned(), median(|run| run.sink_bytes_out()));
        if name == "discard" {
            delay = median(|run| run.delay_bytes_per_flow);
            wire = median(|run| run.wire_bytes_per_flow);
        }
        offered.insert(name.to_owned(), rate.round());
    }
    let (per_ip, per_segment) = ownership_bytes();
    let calibration = Calibration {
        measured: Measured {
            command: format!(
                "flowattr-bench calibrate --rounds {} --seconds {} --load {} --collector-cpus {} --dir {}",
                args.rounds,
                args.seconds,
                args.load,
                args.collector_cpus,
                args.dir.display()
            ),
            machine: args.machine.clone().unwrap_or_else(describe_machine),
            date: today(),
            commit: commit(),
        },
        cpu_seconds_per_million_flows: cpu,
        offered_flows_per_second: offered,
        sink_bytes_per_flow: sink_bytes,
        wire_bytes_per_flow: wire,
        delay_bytes_per_flow: delay,
        ownership_bytes_per_ip: per_ip,
        ownership_bytes_per_segment: per_segment,
        broadcast_bytes_per_range: broadcast_bytes_per_range()?,
        node_base_bytes_per_shard: idle_node_bytes(args)?,
        disk_ceiling_bytes_per_second: crate::disk::measure(&crate::disk::DiskArgs {
            dir: args.dir.clone(),
            bytes: 512 << 20,
            request: 1 << 20,
            depth: 8,
        })?
        .write_then_read(),
    };
    let text = toml::to_string_pretty(&calibration)?;
    std::fs::write(
        &args.out,
        format!("# Written by `{}`.\n{text}", calibration.measured.command),
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("calibrate: wrote {}", args.out.display());
    Ok(())
}

/// The ownership map's own accounting (capacities reserved, not only used) with a million IPs
/// of one segment each, then with a second owner for each.
fn ownership_bytes() -> (f64, f64) {
    const IPS: u32 = 1_000_000;
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    let at =
        |seconds: u64| Timestamp::from_nanos(1_700_000_000_000_000_000 + seconds * 1_000_000_000);
    let fill = |map: &mut OwnershipMap, owner: u32, from: u64| {
        for index in 0..IPS {
            let ip = CanonicalIp::from_v4(std::net::Ipv4Addr::from(0x0a00_0000 + index));
            let heartbeat = Heartbeat {
                ip,
                port: 0,
                owner: Some(WorkloadId::new(owner)),
                start: at(from),
                end: at(from + 10),
                source: SourceId::UNKNOWN,
            };
            map.insert(heartbeat).expect("a well-formed heartbeat");
        }
    };
    fill(&mut map, 1, 0);
    let one = map.memory_usage().bytes() as f64;
    fill(&mut map, 2, 3_600);
    let two = map.memory_usage().bytes() as f64;
    (one / f64::from(IPS), (two - one) / f64::from(IPS))
}

/// A broadcast message as nodes publish them: many IPs' ranges of a few owners, one span each.
fn broadcast_bytes_per_range() -> anyhow::Result<f64> {
    const UPDATES: u32 = 10_000;
    let batch = RangeUpdateBatch {
        origin_node: 1,
        workloads: (0..100).map(|index| format!("service-{index}")).collect(),
        updates: (0..UPDATES)
            .map(|index| RangeUpdate {
                ip: CanonicalIp::from_v4(std::net::Ipv4Addr::from(0x0a00_0000 + index)),
                port: 0,
                owner: index % 100,
                spans: vec![Span {
                    start: Timestamp::from_nanos(1),
                    end: Timestamp::from_nanos(2),
                }],
            })
            .collect(),
    };
    let mut bytes = Vec::new();
    encode_message(&batch, &mut bytes)?;
    Ok(bytes.len() as f64 / f64::from(UPDATES))
}

/// The resident memory of a node with one shard, started and left idle for a second.
fn idle_node_bytes(args: &CalibrateArgs) -> anyhow::Result<f64> {
    let binary = crate::pipeline::collector_binary(args.collector.as_ref())?;
    let mut command = std::process::Command::new(binary);
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--cpus",
            "1",
            "--sink",
            "discard",
        ])
        .args(["--storage", "disk", "--data-dir"])
        .arg(args.dir.join("idle"));
    let node =
        crate::process::Process::start(&mut command, "collector", "flowattr-collector ready:")?;
    std::thread::sleep(Duration::from_secs(1));
    let text = crate::process::http_get(node.address("http")?, "/metrics")?;
    Ok(crate::process::metric(
        &text,
        "flowattr_resident_memory_bytes",
        None,
    ))
}

fn describe_machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(str::trim)
        })
        .unwrap_or("unknown CPU");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = flowattr_tuning::profile::memory_bytes().map_or(0, |bytes| bytes as u64 >> 30);
    format!("{model}, {cores} vCPU, {memory} GiB")
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map_or_else(|| "unknown".into(), |day| day.trim().to_owned())
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map_or_else(|| "unknown".into(), |commit| commit.trim().to_owned())
}
