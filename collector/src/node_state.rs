//! The state a node's executors and its control plane share: its configuration, each shard's
//! metrics and view, the sinks, the limits every connection draws on, and the cluster's
//! threads. Built by [`crate::node`]; read by shards, ingest and the control plane, which
//! therefore need nothing of how a node starts.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;

use crate::broadcast::Broadcast;
use crate::config::Config;
use crate::connection_slots::ConnectionSlots;
use crate::deps::Edge;
use crate::events::EventsStatus;
use crate::memory::MemoryCap;
use crate::metrics::ShardMetrics;
use crate::partial_frames::PartialFrameBudget;
use crate::region::Forwarding;
use crate::sink::SinkSet;
use crate::tls::NodeTls;

/// What a shard publishes for the control plane about once a second.
pub struct ShardView {
    pub edges: Vec<Edge>,
    /// How long every flow released since the start waited beyond its due time, in ms.
    pub extra_latency: Histogram<u64>,
}

/// State shared by every executor and the control plane. Shards write only their own slots.
pub struct NodeShared {
    pub config: Config,
    pub shards: usize,
    pub metrics: Box<[ShardMetrics]>,
    pub views: Box<[Mutex<ShardView>]>,
    pub sinks: SinkSet,
    /// Exporter connections open, in all and per address.
    pub connection_slots: Arc<ConnectionSlots>,
    /// What unfinished frames hold over every exporter connection.
    pub partial_frames: PartialFrameBudget,
    /// RSS against `node.max_memory_bytes`: ingest reads sockets only while it allows.
    pub memory: Arc<MemoryCap>,
    /// The region's broadcast, when `cluster.brokers` is set.
    pub broadcast: Option<Broadcast>,
    /// The events consumer's status, with the broadcast (all zero while the event fallback is
    /// off).
    pub events: Option<Arc<EventsStatus>>,
    /// Forwarding to other regions, when `[[regions]]` are listed.
    pub forwarding: Option<Forwarding>,
    /// Mutual TLS on ingest and forwarding, when `[tls]` is set.
    pub tls: Option<NodeTls>,
}

impl NodeShared {
    pub fn shard_dir(&self, shard: usize) -> PathBuf {
        self.config.delay.dir.join(format!("shard-{shard}"))
    }
}
