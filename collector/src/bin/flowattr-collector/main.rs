//! `flowattr-collector`: runs a collector node (`run`, the default), or publishes an IP event
//! (`events`). The demo that feeds nodes a simulated fleet is `flowattr-bench demo`.
mod events;
mod flags;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flowattr_collector::config::{SinkConfig, StorageKind};
use flowattr_collector::node::Node;

use flags::NodeFlags;

/// Attributes the remote side of every TCP flow to the workload that owned the IP at the
/// flow's start, from the heartbeats every flow carries.
#[derive(Debug, Parser)]
#[command(name = "flowattr-collector", version)]
struct Cli {
    /// How log lines are written: `text`, or `json` (one object a line).
    #[arg(long, global = true, env = flowattr_common::logging::FORMAT_VARIABLE, default_value = "text")]
    log_format: flowattr_common::logging::LogFormat,
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
    /// Publish assign/unassign events about IPs that run no exporter (load balancers), or a
    /// watermark, as an IP-tracking service would: for tests and demos.
    Events(events::EventsFlags),
}

fn main() -> std::process::ExitCode {
    flowattr_collector::kafka::run_if_reader();
    let cli = Cli::parse();
    flowattr_common::logging::init(cli.log_format);
    let result = match cli.command {
        None => run(&cli.node),
        Some(Command::Run(flags)) => run(&flags::merge(&cli.node, flags)),
        Some(Command::Events(flags)) => events::publish(&cli.node, &flags),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line for whoever runs it, whatever RUST_BACKTRACE says.
            eprintln!(
                "flowattr-collector: {}",
                flowattr_common::error_line(error.chain())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(flags: &NodeFlags) -> anyhow::Result<()> {
    let config = flags.config(&[SinkConfig::Stdout])?;
    // Before the host is judged, so that only a hard limit too low is a shortfall.
    let wanted = flowattr_collector::host::open_files_wanted(&config);
    if let Some((before, after)) = flowattr_collector::host::raise_open_files(wanted) {
        tracing::info!("host: open files' soft limit raised from {before} to {after}");
    }
    flags::warn(&config);
    let storage = match config.delay.storage {
        StorageKind::Disk => format!("disk at {}", config.delay.dir.display()),
        StorageKind::Memory => "memory".to_owned(),
    };
    let node = Node::start(config).context("starting the collector")?;
    // One line on stderr when ready: scripts and tests wait for it (and learn the ports).
    flowattr_common::logging::announce(&format!(
        "flowattr-collector ready: ingest {} http {} shards {} storage {storage}",
        node.ingest_addr,
        node.http_addr
            .map_or_else(|| "none".to_owned(), |addr| addr.to_string()),
        node.shared.shards,
    ));
    node.wait();
    Ok(())
}
