//! `/metrics`: the node's parts, each writing its own families, and the process series.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use flowattr_common::exposition::{CollectWith, Registry, Scrape};

use super::server::ServerCounters;
use crate::metrics::{write_milliseconds_histogram, write_shard_metrics};
use crate::node_state::NodeShared;

/// What a scrape of the node's control plane shows.
pub fn registry(node: Arc<NodeShared>, http: Arc<ServerCounters>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CollectWith::new(
        (node, http),
        |(node, http), scrape| write(node, http, scrape),
    )));
    registry.register_collector(Box::new(flowattr_common::process_metrics::collector(
        "flowattr-collector",
        env!("CARGO_PKG_VERSION"),
    )));
    registry
}

fn write(node: &NodeShared, http: &ServerCounters, scrape: &mut Scrape<'_>) -> fmt::Result {
    write_shard_metrics(&node.metrics, scrape)?;
    let mut latency = crate::metrics::new_milliseconds_histogram();
    for view in node.views.iter() {
        let view = view.lock().unwrap_or_else(|poison| poison.into_inner());
        let _ = latency.add(&view.extra_latency);
    }
    write_milliseconds_histogram(
        scrape,
        "flowattr_release_extra_latency_seconds",
        "how long released flows waited beyond their due time (arrival + delay + retry_delay per retry), to the millisecond",
        &latency,
    )?;
    node.sinks.write_metrics(scrape)?;
    if let Some(forwarding) = &node.forwarding {
        forwarding.status.write_metrics(scrape)?;
    }
    if let Some(broadcast) = &node.broadcast {
        broadcast
            .status
            .write_metrics(node.shards, flowattr_common::Timestamp::now(), scrape)?;
    }
    if let Some(events) = &node.events {
        events.write_metrics(scrape)?;
    }
    scrape.gauge(
        "flowattr_connection_slots_open",
        "exporter connections holding a connection slot on the node (all shards)",
        node.connection_slots.open(),
    )?;
    scrape.gauge(
        "flowattr_ingest_partial_frame_bytes",
        "bytes exporter connections hold in unfinished frames past their free share, against ingest.max_partial_frame_bytes",
        node.partial_frames.held(),
    )?;
    let rejected = [
        ("busy", &http.refused_busy),
        ("timeout", &http.timed_out),
        ("bad_request", &http.bad_requests),
        ("unauthorized", &http.unauthorized),
    ];
    scrape.counters(
        "flowattr_http_rejections",
        "control-plane connections or requests turned away, by reason",
        rejected.map(|(reason, count)| ([("reason", reason)], count.load(Ordering::Relaxed))),
    )?;
    let memory = &node.memory;
    scrape.gauge(
        "flowattr_resident_memory_bytes",
        "the node's RSS, against node.max_memory_bytes",
        memory.rss_bytes(),
    )?;
    scrape.gauge(
        "flowattr_ingest_memory_paused",
        "1 while ingest does not read sockets because RSS is at the cap",
        u64::from(memory.paused()),
    )?;
    scrape.counter(
        "flowattr_ingest_memory_pauses",
        "times ingest stopped reading sockets at the memory cap",
        memory.pauses(),
    )
}
