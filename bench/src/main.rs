//! `flowattr-bench`: benchmarks of the flowattr pipeline.
use clap::{Parser, Subcommand};
use flowattr_bench::broadcast::{self, BroadcastArgs};
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
    /// A real collector process fed over loopback TCP: sustained flows/s per collector core
    /// with the disk delay buffer on, bytes per flow on disk, extra latency beyond the delay.
    Pipeline(PipelineArgs),
    /// A real exporter under a connection-churn load on loopback: exporter CPU per 10K flows
    /// and eBPF cost per event. Needs root.
    ExporterOverhead(ExporterArgs),
    /// A broker and two collector nodes: broadcast bytes per learned heartbeat, a cold
    /// node's time to rebuild the map from the topic, and the publish-to-apply lag.
    Broadcast(BroadcastArgs),
    /// A simulated fleet with ground truth: how often flowattr and the strategies users run
    /// today misattribute flows and dependencies, under churn, loss, delay and skew.
    Simulate(SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Pipeline(args) => pipeline::run(&args),
        Command::ExporterOverhead(args) => exporter::run(&args),
        Command::Broadcast(args) => broadcast::run(&args),
        Command::Simulate(args) => simulate::run(&args),
    }
}
