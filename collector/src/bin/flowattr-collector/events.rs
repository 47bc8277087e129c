//! `flowattr-collector events`: publishes one assign/unassign event or watermark, as an
//! IP-tracking service would, for tests and demos.
use anyhow::Context;
use clap::{Args, Subcommand};
use flowattr_collector::events;
use flowattr_common::Timestamp;

use crate::flags::NodeFlags;

#[derive(Debug, Clone, Args)]
pub struct EventsFlags {
    /// Kafka brokers [default: --brokers or cluster.brokers of --config].
    #[arg(long = "to")]
    to: Option<String>,
    /// The events topic [events.topic; default flowattr-ip-events].
    #[arg(long)]
    topic: Option<String>,
    /// When it happened: RFC 3339 or nanoseconds since the epoch [default: now].
    #[arg(long)]
    at: Option<String>,
    #[command(subcommand)]
    event: EventKind,
}

#[derive(Debug, Clone, Subcommand)]
enum EventKind {
    /// IP is OWNER's from --at on.
    Assign { ip: std::net::IpAddr, owner: String },
    /// IP is nobody's from --at on.
    Unassign { ip: std::net::IpAddr },
    /// PRODUCER has published every event up to --at (events.watermark_producers).
    Watermark { producer: String },
}

pub fn publish(node: &NodeFlags, flags: &EventsFlags) -> anyhow::Result<()> {
    let config = node.config(&[])?;
    let brokers = flags
        .to
        .clone()
        .or(config.cluster.brokers.clone())
        .context("give --to BROKERS (or --brokers, or cluster.brokers in --config)")?;
    let topic = flags.topic.clone().unwrap_or(config.events.topic.clone());
    let at = match &flags.at {
        Some(text) => events::parse_at(text)
            .with_context(|| format!("--at {text}: not RFC 3339 or nanoseconds"))?,
        None => Timestamp::now(),
    };
    let json = match &flags.event {
        EventKind::Assign { ip, owner } => {
            flowattr_common::check_workload_name(owner)
                .map_err(|problem| anyhow::anyhow!("owner {owner:?} {problem}"))?;
            events::event_json(*ip, Some(owner), at)
        }
        EventKind::Unassign { ip } => events::event_json(*ip, None, at),
        EventKind::Watermark { producer } => {
            flowattr_common::check_workload_name(producer)
                .map_err(|problem| anyhow::anyhow!("producer {producer:?} {problem}"))?;
            events::watermark_json(producer, at)
        }
    };
    events::publish(&config.cluster, &brokers, &topic, &json).map_err(anyhow::Error::msg)?;
    println!("published to {topic}: {json}");
    Ok(())
}
