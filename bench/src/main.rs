//! `flowattr-bench`: benchmarks of the flowattr pipeline.
use clap::{Parser, Subcommand};
use flowattr_bench::broadcast::{self, BroadcastArgs};
use flowattr_bench::calibrate::{self, CalibrateArgs};
use flowattr_bench::demo::{self, DemoArgs};
use flowattr_bench::disk::{self, DiskArgs};
use flowattr_bench::exporter::{self, ExporterArgs};
use flowattr_bench::pipeline::{self, PipelineArgs};
use flowattr_bench::simulate::{self, SimulateArgs};

/// Measures flowattr: the whole collector pipeline over loopback, and the exporter's overhead.
#[derive(Debug, Parser)]
#[command(name = "flowattr-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: collector nodes on this machine (one, or a cluster with --nodes and
    /// --brokers) fed a simulated fleet over loopback, every flow checked against the fleet's
    /// ground truth, beside the strategies users run today. Exits non-zero on any
    /// misattribution.
    Demo(DemoArgs),
    /// A real collector process fed over loopback TCP: sustained flows/s per collector core
    /// with the disk delay buffer on, bytes per flow on disk, extra latency beyond the delay.
    Pipeline(PipelineArgs),
    /// A real exporter under a connection-churn load on loopback: exporter CPU per 10K flows
    /// and eBPF cost per event. Needs root.
    ExporterOverhead(ExporterArgs),
    /// A broker and two collector nodes: broadcast bytes per learned heartbeat, a cold
    /// node's time to rebuild the map from the topic, and the publish-to-apply lag.
    Broadcast(BroadcastArgs),
    /// The disk's ceiling for the delay buffer's pattern (sequential O_DIRECT writes with
    /// fsync, then reads, through io_uring with registered buffers).
    Disk(DiskArgs),
    /// A simulated fleet with ground truth: how often flowattr and the strategies users run
    /// today misattribute flows and dependencies, under churn, loss, delay and skew.
    Simulate(SimulateArgs),
    /// Measures what the capacity planner (`flowattr-plan`) multiplies, by running the
    /// pipeline with each sink, and writes it as a calibration file.
    Calibrate(CalibrateArgs),
}

fn main() -> std::process::ExitCode {
    // The demo runs collector nodes in this process; their Kafka readers are this executable.
    flowattr_collector::kafka::run_if_reader();
    flowattr_common::logging::init(flowattr_common::logging::LogFormat::from_environment());
    let result = match Cli::parse().command {
        Command::Demo(args) => demo::run(&args),
        Command::Pipeline(args) => pipeline::run(&args),
        Command::ExporterOverhead(args) => exporter::run(&args),
        Command::Broadcast(args) => broadcast::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Disk(args) => disk::run_command(&args),
        Command::Calibrate(args) => calibrate::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line for whoever runs it, whatever RUST_BACKTRACE says.
            eprintln!("flowattr-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
