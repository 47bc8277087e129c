//! A shard: one executor's slice of the IP space, run as an actor. It owns its ownership map,
//! its delay buffer and its part of the dependency graph, and talks to other shards only by
//! batched messages over glommio's channel mesh.
//!
//! Routing (one hop per concern, no request/response on the flow path):
//! - a flow's heartbeat ("local workload held local IP during the flow") goes to the shard that
//!   owns the flow's LOCAL IP, which stores it;
//! - the flow itself goes to the shard that owns its REMOTE IP, which buffers it and, after
//!   the delay, attributes it with a lookup in its own map.
//!
//! The only answer that flows back is durability, for acks: the shard that buffered a batch's
//! part tells the shard holding the exporter's connection once the part is on disk, on a mesh
//! of its own so that a full data queue can never block an ack (and an ack never blocks data).

mod acks;
mod buffering;
mod duplicates;
mod forwarding;
mod messages;
mod output;
mod peers;
mod queries;
mod release;
mod routing;

pub use crate::peer_message::PeerMessage;
pub use crate::shard_router::ShardRouter;
pub use acks::{AckDetails, ConnectionHandle};
pub use duplicates::{DuplicateFilter, NewRecords};
pub use messages::{
    ClaimantView, ControlMessage, DataMessage, DepsQuery, Dictionary, EvidenceView, FlowPart,
    OwnerAnswer, OwnerQuery, PlatformFields, SegmentView, ShardQuery,
};
pub use routing::{BeatRecord, SplitBatch};

use flowattr_common::wire::FrameExpander;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;

use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use crate::attribution::Attributor;
use crate::broadcast::LearnedRanges;
use crate::delay::{DelayBuffer, Storage};
use crate::deps::DependencyCounter;
use crate::evidence::EvidenceGate;
use crate::metrics::ShardMetrics;
use crate::node_state::NodeShared;
use crate::ownership::{Host, Sources};
use acks::{Completion, PendingBatch};

struct ShardState {
    /// Every kind of evidence and the rule that answers from it.
    attributor: Attributor,
    /// The shortest handover shard 0 last kept in the data directory.
    kept_handover: Option<std::time::Duration>,
    /// What this shard's exporters taught it since its last publish; None without a cluster.
    learned: Option<LearnedRanges>,
    /// Peers' evidence (and events) from before this node started has been applied (always,
    /// alone): every topic's marker arrived.
    peers_caught_up: bool,
    topics_caught_up: usize,
    deps: DependencyCounter,
    /// Who reported the evidence the map holds, numbered for its segments.
    sources: Sources,
    /// A released block's flows, decoded (reused from block to block).
    decoded: Vec<crate::delay::codec::BufferedFlow>,
    buffer: DelayBuffer<Completion>,
    seen: DuplicateFilter,
    pending: FxHashMap<u64, PendingBatch>,
    next_ticket: u64,
    replay_done: usize,
    /// Extra latency of every flow released since the start, in milliseconds: `/metrics`
    /// reports it as a cumulative histogram, which a region sums and any window subtracts.
    extra_latency: Histogram<u64>,
}

impl ShardState {
    /// Flows may be released once every shard has replayed its segments and the peers'
    /// evidence from before the start has been applied.
    fn ready_to_release(&self, shards: usize) -> bool {
        self.replay_done == shards && self.peers_caught_up
    }
}

/// Everything one executor's tasks share. Single-threaded: `RefCell`, never a lock.
pub struct Shard {
    pub id: usize,
    pub router: ShardRouter,
    pub node: Arc<NodeShared>,
    /// Checks every record of every batch this executor reads.
    pub gate: RefCell<EvidenceGate>,
    /// Expands the compressed frames of every connection this executor reads: one buffer
    /// (up to the largest frame) per shard, however many connections it serves.
    pub expander: RefCell<FrameExpander>,
    state: RefCell<ShardState>,
    data: Senders<DataMessage>,
    control: Senders<ControlMessage>,
    self_data: LocalSender<DataMessage>,
    self_control: LocalSender<ControlMessage>,
    writer_wake: LocalSender<()>,
    release_wake: LocalSender<()>,
}

/// The receiving ends a shard's tasks consume.
pub struct ShardInboxes {
    pub data: Receivers<DataMessage>,
    pub control: Receivers<ControlMessage>,
    self_data: LocalReceiver<DataMessage>,
    self_control: LocalReceiver<ControlMessage>,
    writer_wake: LocalReceiver<()>,
    release_wake: LocalReceiver<()>,
}

/// Messages are whole batch parts (up to 64K flows): a short queue is plenty, and a long one
/// is only latency.
const LOCAL_QUEUE: usize = 64;

impl Shard {
    pub fn new(
        node: Arc<NodeShared>,
        data: (Senders<DataMessage>, Receivers<DataMessage>),
        control: (Senders<ControlMessage>, Receivers<ControlMessage>),
    ) -> (Rc<Shard>, ShardInboxes) {
        let id = data.0.peer_id();
        let config = &node.config;
        let (self_data, self_data_rx) = local_channel::new_bounded(LOCAL_QUEUE);
        let (self_control, self_control_rx) = local_channel::new_unbounded();
        let (writer_wake, writer_wake_rx) = local_channel::new_bounded(1);
        let (release_wake, release_wake_rx) = local_channel::new_bounded(1);
        let mut attributor = Attributor::new(config);
        // Kept with the delay buffer: a node with memory storage keeps nothing across a restart.
        let kept_handover = match config.delay.storage {
            crate::config::StorageKind::Disk => {
                crate::ownership::kept_shortest_handover(&config.delay.dir)
            }
            crate::config::StorageKind::Memory => None,
        };
        if let Some(gap) = kept_handover {
            attributor.map.heard_of_handover(gap);
        }
        let state = ShardState {
            attributor,
            kept_handover,
            learned: node.broadcast.as_ref().map(|_| LearnedRanges::default()),
            peers_caught_up: node.broadcast.is_none(),
            topics_caught_up: 0,
            deps: DependencyCounter::default(),
            sources: Sources::default(),
            decoded: Vec::new(),
            buffer: DelayBuffer::new(config.delay.delay, config.delay.retry_delay),
            seen: DuplicateFilter::default(),
            pending: FxHashMap::default(),
            next_ticket: 0,
            replay_done: 0,
            extra_latency: crate::metrics::new_milliseconds_histogram(),
        };
        let shard = Rc::new(Shard {
            id,
            router: ShardRouter::new(node.shards),
            gate: RefCell::new(EvidenceGate::new(&node.config)),
            expander: RefCell::new(
                FrameExpander::new().expect("a zstd context (only allocation failure stops one)"),
            ),
            node,
            state: RefCell::new(state),
            data: data.0,
            control: control.0,
            self_data,
            self_control,
            writer_wake,
            release_wake,
        });
        let inboxes = ShardInboxes {
            data: data.1,
            control: control.1,
            self_data: self_data_rx,
            self_control: self_control_rx,
            writer_wake: writer_wake_rx,
            release_wake: release_wake_rx,
        };
        (shard, inboxes)
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[self.id]
    }

    fn storage(&self) -> Storage {
        match self.node.config.delay.storage {
            crate::config::StorageKind::Memory => Storage::Memory,
            crate::config::StorageKind::Disk => Storage::Disk {
                dir: self.node.shard_dir(self.id),
            },
        }
    }

    /// Starts every task of the shard: inboxes, writer, release, upkeep. Replays segments
    /// left on disk first (heartbeats go out before this shard reports its replay done).
    pub async fn run(
        self: Rc<Self>,
        inboxes: ShardInboxes,
        queries: mpsc::Receiver<ShardQuery>,
        peers: mpsc::Receiver<PeerMessage>,
    ) -> std::io::Result<()> {
        let ShardInboxes {
            mut data,
            mut control,
            self_data,
            self_control,
            writer_wake,
            release_wake,
        } = inboxes;
        for (_, receiver) in data.streams() {
            let shard = self.clone();
            glommio::spawn_local(async move {
                while let Some(message) = receiver.recv().await {
                    shard.handle_data(message).await;
                }
            })
            .detach();
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            while let Some(message) = self_data.recv().await {
                shard.handle_data(message).await;
            }
        })
        .detach();
        for (_, receiver) in control.streams() {
            let shard = self.clone();
            glommio::spawn_local(async move {
                while let Some(message) = receiver.recv().await {
                    shard.handle_control(message);
                }
            })
            .detach();
        }
        let shard = self.clone();
        glommio::spawn_local(async move {
            while let Some(message) = self_control.recv().await {
                shard.handle_control(message);
            }
        })
        .detach();

        let highest_id = self.replay().await?;
        for peer in 0..self.router.shards() {
            self.send_data(peer, DataMessage::ReplayDone).await;
        }
        let shard = self.clone();
        glommio::spawn_local(async move { shard.write_loop(writer_wake, highest_id).await })
            .detach();
        // Releasing due flows goes before taking new ones: a release that falls behind only
        // grows the buffer and the latency, so it runs in a task queue with 4x the shares of
        // the default queue (ingest, inboxes), which it uses only while something is due.
        let release_queue = glommio::executor().create_task_queue(
            glommio::Shares::Static(4000),
            glommio::Latency::NotImportant,
            "release",
        );
        let shard = self.clone();
        glommio::spawn_local_into(
            async move { shard.release_loop(release_wake).await },
            release_queue,
        )
        .map_err(|error| std::io::Error::other(error.to_string()))?
        .detach();
        let shard = self.clone();
        glommio::spawn_local(async move { shard.upkeep_loop(queries, peers).await }).detach();
        Ok(())
    }

    pub async fn send_data(&self, to: usize, message: DataMessage) {
        self.node.metrics[to].inbox_sent.add(1);
        let sent = if to == self.id {
            self.self_data.send(message).await.is_ok()
        } else {
            self.data.send_to(to, message).await.is_ok()
        };
        if !sent {
            // Only at shutdown: the peer's executor is gone.
            self.node.metrics[to].inbox_sent.sub(1);
        }
    }

    /// Hands each shard the heartbeats of `host` it owns (`beats[to]`), with the batch's
    /// dictionary.
    async fn send_heartbeats(
        &self,
        host: Host,
        workloads: &Dictionary,
        beats: Vec<Vec<BeatRecord>>,
    ) {
        for (to, beats) in beats.into_iter().enumerate() {
            if !beats.is_empty() {
                let message = DataMessage::Heartbeats {
                    host,
                    workloads: workloads.clone(),
                    beats,
                };
                self.send_data(to, message).await;
            }
        }
    }

    async fn send_control(&self, to: usize, message: ControlMessage) {
        let _ = if to == self.id {
            self.self_control.send(message).await.is_ok()
        } else {
            self.control.send_to(to, message).await.is_ok()
        };
    }

    fn wake(channel: &LocalSender<()>) {
        // A full wake channel already holds a wake-up.
        let _ = channel.try_send(());
    }
}
