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

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use flowattr_common::wire::{Ack, AckStatus, ExporterId};
use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};
use futures_lite::future;
use glommio::channels::channel_mesh::{Receivers, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::sync::Semaphore;
use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use crate::delay::codec::{BlockHeader, BufferedFlow, decode_block};
use crate::delay::{
    DelayBuffer, Lane, SealedSegment, SegmentIds, SegmentWriter, Storage, read_segment,
    recover_segments, remove_segment,
};
use crate::deps::{ConnectionReport, DependencyCounter, RemoteEnd};
use crate::metrics::ShardMetrics;
use crate::node::{NodeShared, ShardView};
use crate::ownership::{
    Attribution, Heartbeat, InsertOutcome, OwnershipMap, Reason, Segment, WorkloadInterner,
};
use crate::sink::AttributedFlow;

/// Maps an IP to the shard that owns it. Stable for a given shard count: the delay buffer's
/// files are only valid under the count that wrote them (the node checks its manifest).
#[derive(Debug, Clone, Copy)]
pub struct ShardRouter {
    shards: usize,
}

impl ShardRouter {
    pub fn new(shards: usize) -> Self {
        assert!(shards > 0, "at least one shard");
        ShardRouter { shards }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn shard_of(&self, ip: CanonicalIp) -> usize {
        let octets = ip.octets();
        let high = u64::from_le_bytes(octets[..8].try_into().expect("8 bytes"));
        let low = u64::from_le_bytes(octets[8..].try_into().expect("8 bytes"));
        // IPv4 lives in the low half; mixing both halves spreads v6 prefixes too.
        let hash = (low ^ high.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((u128::from(hash) * self.shards as u128) >> 64) as usize
    }
}

/// A workload dictionary shared by every part of one batch.
pub type Dictionary = Arc<[Box<str>]>;

/// "The workload at `workload` in the dictionary held `ip` (or `(ip, port)` if shared) during
/// `[start, end]`".
#[derive(Debug, Clone, Copy)]
pub struct BeatRecord {
    pub ip: CanonicalIp,
    pub port: u16,
    pub shared: bool,
    pub workload: u32,
    pub start: Timestamp,
    pub end: Timestamp,
}

impl BeatRecord {
    /// The heartbeat a flow carries for its local side, if the exporter knew the workload.
    pub fn of(flow: &BufferedFlow) -> Option<BeatRecord> {
        Some(BeatRecord {
            ip: flow.local_ip,
            port: if flow.local_shared { flow.local_port } else { 0 },
            shared: flow.local_shared,
            workload: flow.local_workload?,
            start: flow.start,
            end: flow.end,
        })
    }
}

/// The flows of one batch that one shard must buffer.
#[derive(Debug)]
pub struct FlowPart {
    pub origin: usize,
    pub ticket: u64,
    pub header: BlockHeader,
    pub workloads: Dictionary,
    pub flows: Vec<BufferedFlow>,
}

#[derive(Debug)]
pub enum DataMessage {
    Heartbeats {
        workloads: Dictionary,
        beats: Vec<BeatRecord>,
    },
    Flows(FlowPart),
    /// The sender has sent every heartbeat recovered from its segments.
    ReplayDone,
}

#[derive(Debug)]
pub enum ControlMessage {
    /// These tickets' parts are durable on the sender.
    Durable(Vec<(u64, AckStatus)>),
}

/// A batch split by destination: flows by the shard of their remote IP, heartbeats by the
/// shard of their local IP.
#[derive(Debug)]
pub struct SplitBatch {
    pub flows: Vec<Vec<BufferedFlow>>,
    pub beats: Vec<Vec<BeatRecord>>,
}

impl SplitBatch {
    pub fn new(shards: usize) -> Self {
        SplitBatch {
            flows: (0..shards).map(|_| Vec::new()).collect(),
            beats: (0..shards).map(|_| Vec::new()).collect(),
        }
    }

    pub fn add_heartbeat(&mut self, router: &ShardRouter, flow: &BufferedFlow) {
        if let Some(beat) = BeatRecord::of(flow) {
            self.beats[router.shard_of(beat.ip)].push(beat);
        }
    }

    pub fn add(&mut self, router: &ShardRouter, flow: BufferedFlow) {
        self.add_heartbeat(router, &flow);
        self.flows[router.shard_of(flow.remote_ip)].push(flow);
    }
}

/// A control-plane question to the shard that owns an IP.
pub struct OwnerQuery {
    pub ip: CanonicalIp,
    pub port: u16,
    pub at: Option<Timestamp>,
    pub reply: mpsc::SyncSender<OwnerAnswer>,
}

#[derive(Debug, serde::Serialize)]
pub struct OwnerAnswer {
    /// The lookup's answer at `at`, when one was asked for.
    pub owner: Option<String>,
    pub unattributed: Option<&'static str>,
    /// Evidence held for the key: segments, oldest first (`holder` None: contested).
    pub segments: Vec<SegmentView>,
    /// Lookups before this instant answer `expired`.
    pub horizon_ns: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct SegmentView {
    pub start_ns: u64,
    pub end_ns: u64,
    pub holder: Option<String>,
}

/// Where an ack goes once every part of its batch is durable.
struct ConnectionAcks {
    acks: LocalSender<Ack>,
    /// Bounds the batches a connection has in flight; a permit returns with each ack.
    unacked: Semaphore,
}

pub struct ConnectionHandle(Rc<ConnectionAcks>);

struct PendingBatch {
    exporter: ExporterId,
    sequence: u64,
    remaining: usize,
    duplicate: bool,
    flows: u64,
    connection: Rc<ConnectionAcks>,
}

/// What the writer hands back when bytes are durable.
enum Completion {
    Part {
        origin: usize,
        ticket: u64,
        status: AckStatus,
    },
    Local(Rc<std::cell::Cell<bool>>),
}

/// Remembers (exporter, sequence) pairs for `window` to recognise retried batches.
#[derive(Default)]
struct DuplicateFilter {
    seen: FxHashMap<(u64, u64), Timestamp>,
}

impl DuplicateFilter {
    /// True if the pair is new (and now remembered).
    fn insert(&mut self, exporter: u64, sequence: u64, now: Timestamp) -> bool {
        self.seen.insert((exporter, sequence), now).is_none()
    }

    fn forget_before(&mut self, horizon: Timestamp) {
        self.seen.retain(|_, seen| *seen >= horizon);
    }
}

struct ShardState {
    map: OwnershipMap,
    names: WorkloadInterner,
    deps: DependencyCounter,
    buffer: DelayBuffer<Completion>,
    seen: DuplicateFilter,
    pending: FxHashMap<u64, PendingBatch>,
    next_ticket: u64,
    replay_done: usize,
    /// Extra latency of the flows released in the current second...
    extra_latency: Histogram<u64>,
    /// ...and in the seconds before it, newest last: `/metrics` reports a recent window,
    /// not the whole life of the process (start-up would dominate it forever).
    recent_latency: std::collections::VecDeque<Histogram<u64>>,
}

/// Everything one executor's tasks share. Single-threaded: `RefCell`, never a lock.
pub struct Shard {
    pub id: usize,
    pub router: ShardRouter,
    pub node: Arc<NodeShared>,
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
        let state = ShardState {
            map: OwnershipMap::new(config.ownership.to_ownership_config()),
            names: WorkloadInterner::default(),
            deps: DependencyCounter::default(),
            buffer: DelayBuffer::new(config.delay.delay, config.delay.retry_delay),
            seen: DuplicateFilter::default(),
            pending: FxHashMap::default(),
            next_ticket: 0,
            replay_done: 0,
            extra_latency: new_latency_histogram(),
            recent_latency: std::collections::VecDeque::new(),
        };
        let shard = Rc::new(Shard {
            id,
            router: ShardRouter::new(node.shards),
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
        queries: mpsc::Receiver<OwnerQuery>,
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
        glommio::spawn_local_into(async move { shard.release_loop(release_wake).await }, release_queue)
            .map_err(|error| std::io::Error::other(error.to_string()))?
            .detach();
        let shard = self.clone();
        glommio::spawn_local(async move { shard.upkeep_loop(queries).await }).detach();
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

    // ---- ingest side ----------------------------------------------------------------------

    pub fn new_connection(&self, acks: LocalSender<Ack>) -> ConnectionHandle {
        ConnectionHandle(Rc::new(ConnectionAcks {
            acks,
            unacked: Semaphore::new(self.node.config.ingest.max_unacked_batches as u64),
        }))
    }

    /// Sends one validated batch on its way: heartbeats to their local IPs' shards, flows to
    /// their remote IPs' shards. The connection's ack follows once every part is durable.
    pub async fn dispatch(
        &self,
        connection: &ConnectionHandle,
        header: BlockHeader,
        workloads: Dictionary,
        split: SplitBatch,
    ) {
        // The permit comes back when the ack is sent: at most `max_unacked_batches` in flight.
        let _ = connection.0.unacked.acquire(1).await;
        let parts = split.flows.iter().filter(|flows| !flows.is_empty()).count();
        let flows: u64 = split.flows.iter().map(|flows| flows.len() as u64).sum();
        let ticket = {
            let mut state = self.state.borrow_mut();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.pending.insert(
                ticket,
                PendingBatch {
                    exporter: ExporterId(header.exporter),
                    sequence: header.sequence,
                    remaining: parts,
                    duplicate: true,
                    flows,
                    connection: connection.0.clone(),
                },
            );
            ticket
        };
        for (to, beats) in split.beats.into_iter().enumerate() {
            if !beats.is_empty() {
                let workloads = workloads.clone();
                self.send_data(to, DataMessage::Heartbeats { workloads, beats })
                    .await;
            }
        }
        if parts == 0 {
            // Nothing to buffer: a batch with no flows is durable as it stands.
            self.finish_part(ticket, AckStatus::Accepted);
            return;
        }
        for (to, flows) in split.flows.into_iter().enumerate() {
            if !flows.is_empty() {
                let part = FlowPart {
                    origin: self.id,
                    ticket,
                    header,
                    workloads: workloads.clone(),
                    flows,
                };
                self.send_data(to, DataMessage::Flows(part)).await;
            }
        }
    }

    fn finish_part(&self, ticket: u64, status: AckStatus) {
        let mut state = self.state.borrow_mut();
        let Some(pending) = state.pending.get_mut(&ticket) else {
            return;
        };
        pending.remaining = pending.remaining.saturating_sub(1);
        pending.duplicate &= status == AckStatus::Duplicate;
        if pending.remaining > 0 {
            return;
        }
        let pending = state.pending.remove(&ticket).expect("present above");
        drop(state);
        let status = if pending.duplicate && pending.flows > 0 {
            self.metrics().batches_duplicate.add(1);
            AckStatus::Duplicate
        } else {
            self.metrics().batches_accepted.add(1);
            self.metrics().flows_received.add(pending.flows);
            AckStatus::Accepted
        };
        let ack = Ack {
            exporter: pending.exporter,
            sequence: pending.sequence,
            status,
        };
        // The connection may be gone; its exporter will resend and get `Duplicate`.
        let _ = pending.connection.acks.try_send(ack);
        pending.connection.unacked.signal(1);
    }

    fn handle_control(&self, message: ControlMessage) {
        match message {
            ControlMessage::Durable(tickets) => {
                for (ticket, status) in tickets {
                    self.finish_part(ticket, status);
                }
            }
        }
    }

    // ---- data side -------------------------------------------------------------------------

    async fn handle_data(&self, message: DataMessage) {
        self.metrics().inbox_handled.add(1);
        match message {
            DataMessage::Heartbeats { workloads, beats } => self.apply_heartbeats(&workloads, &beats),
            DataMessage::Flows(part) => {
                // Backpressure: while the writer or the release is behind, stop taking flows;
                // the mesh queue fills, senders wait, and ingest stops reading sockets. Taking
                // more than the shard can release would only grow the buffer without bound.
                while self.behind() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                self.buffer_part(part);
            }
            DataMessage::ReplayDone => {
                let mut state = self.state.borrow_mut();
                state.replay_done += 1;
                if state.replay_done == self.router.shards() {
                    Self::wake(&self.release_wake);
                }
            }
        }
    }

    /// True while the writer has more than `max_unwritten_bytes` to write, or a segment has
    /// been due for longer than [`RELEASE_LAG_MAX`] without being released.
    fn behind(&self) -> bool {
        let state = self.state.borrow();
        if state.buffer.unwritten_bytes() > self.node.config.delay.max_unwritten_bytes {
            return true;
        }
        state.replay_done == self.router.shards()
            && state
                .buffer
                .next_due()
                .is_some_and(|due| Timestamp::now().nanos_since(due) > RELEASE_LAG_MAX.as_nanos() as u64)
    }

    fn apply_heartbeats(&self, workloads: &[Box<str>], beats: &[BeatRecord]) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let mut ids: Vec<Option<WorkloadId>> = vec![None; workloads.len()];
        let (mut applied, mut expired) = (0, 0);
        for beat in beats {
            let owner = *ids[beat.workload as usize]
                .get_or_insert_with(|| state.names.intern(&workloads[beat.workload as usize]));
            if beat.shared {
                state.map.mark_shared(beat.ip);
            }
            let heartbeat = Heartbeat {
                ip: beat.ip,
                port: beat.port,
                owner,
                start: beat.start,
                end: beat.end,
            };
            match state.map.insert(heartbeat) {
                Ok(InsertOutcome::Expired) => expired += 1,
                Ok(_) => applied += 1,
                // Validated at ingest (end >= start); a replayed block could only get here
                // corrupted past its checksum.
                Err(_) => expired += 1,
            }
        }
        self.metrics().heartbeats_applied.add(applied);
        self.metrics().heartbeats_expired.add(expired);
    }

    fn buffer_part(&self, part: FlowPart) {
        let mut state = self.state.borrow_mut();
        let now = Timestamp::now();
        let status = if state.seen.insert(part.header.exporter, part.header.sequence, now) {
            state
                .buffer
                .append(Lane::Fresh, &part.header, &part.workloads, &part.flows);
            AckStatus::Accepted
        } else {
            AckStatus::Duplicate
        };
        // A duplicate is acked only once the original's bytes are durable too: the next write
        // covers everything appended before it.
        state.buffer.complete_when_durable(
            Lane::Fresh,
            Completion::Part {
                origin: part.origin,
                ticket: part.ticket,
                status,
            },
        );
        self.metrics()
            .unwritten_bytes
            .set(state.buffer.unwritten_bytes() as u64);
        drop(state);
        Self::wake(&self.writer_wake);
    }

    // ---- writer ------------------------------------------------------------------------------

    async fn write_loop(self: Rc<Self>, wake: LocalReceiver<()>, highest_id: Option<u64>) {
        let storage = self.storage();
        let span = self.node.config.delay.segment_span;
        let mut writers = Lane::ALL.map(|lane| SegmentWriter::new(lane, storage.clone(), span));
        let mut ids = SegmentIds::starting_after(highest_id);
        loop {
            let next_seal = writers.iter().filter_map(SegmentWriter::seal_due).min();
            let wait = next_seal.map_or(Duration::from_millis(100), |due| {
                Duration::from_nanos(due.nanos_since(Timestamp::now())).min(Duration::from_millis(100))
            });
            future::or(async { wake.recv().await.is_some() }, async {
                glommio::timer::sleep(wait).await;
                true
            })
            .await;
            for writer in &mut writers {
                self.write_lane(writer, &mut ids).await;
            }
            let open: u64 = writers.iter().map(SegmentWriter::open_flows).sum();
            let buffered = self.state.borrow().buffer.sealed_flows() + open;
            self.metrics().buffered_flows.set(buffered);
        }
    }

    async fn write_lane(&self, writer: &mut SegmentWriter, ids: &mut SegmentIds) {
        let lane = writer.lane();
        let unwritten = self.state.borrow_mut().buffer.take_unwritten(lane);
        if !unwritten.is_empty() {
            let mut failing = false;
            while let Err(error) = writer
                .write(&unwritten.bytes, unwritten.flows, Timestamp::now(), ids)
                .await
            {
                // A full disk or an I/O error: keep the bytes, stop acking (the exporters keep
                // their batches), and try again. Nothing acked is ever dropped.
                self.metrics().write_errors.add(1);
                if !failing {
                    eprintln!(
                        "flowattr-collector: shard {}: delay buffer write failed, not acking until it succeeds: {error}",
                        self.id
                    );
                    failing = true;
                    self.metrics().storage_failing.set(1);
                }
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
            if failing {
                eprintln!("flowattr-collector: shard {}: delay buffer writes recovered", self.id);
                self.metrics().storage_failing.set(0);
            }
            self.metrics().bytes_written.add(unwritten.bytes.len() as u64);
            self.metrics()
                .unwritten_bytes
                .set(self.state.borrow().buffer.unwritten_bytes() as u64);
            self.complete(unwritten.completions).await;
        }
        match writer.seal_if_due(Timestamp::now()).await {
            Ok(Some(sealed)) => {
                self.metrics().segments_sealed.add(1);
                self.state.borrow_mut().buffer.push_sealed(sealed);
                Self::wake(&self.release_wake);
            }
            Ok(None) => {}
            Err(error) => {
                // The bytes are durable; only the truncation or close failed. Sealing is
                // retried on the next pass.
                self.metrics().write_errors.add(1);
                eprintln!("flowattr-collector: shard {}: sealing a segment failed: {error}", self.id);
            }
        }
    }

    async fn complete(&self, completions: Vec<Completion>) {
        let mut by_origin: Vec<Vec<(u64, AckStatus)>> = vec![Vec::new(); self.router.shards()];
        for completion in completions {
            match completion {
                Completion::Part {
                    origin,
                    ticket,
                    status,
                } => by_origin[origin].push((ticket, status)),
                Completion::Local(done) => done.set(true),
            }
        }
        for (origin, tickets) in by_origin.into_iter().enumerate() {
            if tickets.is_empty() {
                continue;
            }
            if origin == self.id {
                self.handle_control(ControlMessage::Durable(tickets));
            } else {
                self.send_control(origin, ControlMessage::Durable(tickets)).await;
            }
        }
    }

    // ---- replay ------------------------------------------------------------------------------

    /// Recovers the segments a previous run left: their flows are buffered again and their
    /// heartbeats re-sent, so the map knows what it knew about them before the restart.
    /// Returns the highest segment id found.
    async fn replay(&self) -> std::io::Result<Option<u64>> {
        let Storage::Disk { dir } = self.storage() else {
            return Ok(None);
        };
        let segments = recover_segments(&dir, Timestamp::now()).await?;
        let highest = segments.iter().map(|segment| segment.id).max();
        for mut segment in segments {
            let bytes = read_segment(&mut segment).await?;
            let mut flows = 0u64;
            let mut at = 0;
            let mut splits = Vec::new();
            {
                let mut state = self.state.borrow_mut();
                let now = Timestamp::now();
                loop {
                    match decode_block(&bytes[at..]) {
                        Ok(Some((block, used))) => {
                            at += used;
                            state.seen.insert(block.header.exporter, block.header.sequence, now);
                            let mut split = SplitBatch::new(self.router.shards());
                            let decoded = block.for_each_flow(|flow| {
                                flows += 1;
                                split.add_heartbeat(&self.router, &flow);
                            });
                            if decoded.is_err() {
                                self.metrics().corrupt_blocks.add(1);
                            }
                            let workloads: Dictionary =
                                block.workloads().iter().map(|name| Box::from(*name)).collect();
                            splits.push((workloads, split));
                        }
                        Ok(None) => break,
                        Err(error) => {
                            if bytes[at..].iter().any(|&byte| byte != 0) {
                                eprintln!(
                                    "flowattr-collector: shard {}: segment {} ends in {} bytes that are not a whole block ({error}): a write torn by the crash, never acked",
                                    self.id,
                                    segment.id,
                                    bytes.len() - at
                                );
                            }
                            break;
                        }
                    }
                }
            }
            for (workloads, split) in splits {
                for (to, beats) in split.beats.into_iter().enumerate() {
                    if !beats.is_empty() {
                        let workloads = workloads.clone();
                        self.send_data(to, DataMessage::Heartbeats { workloads, beats })
                            .await;
                    }
                }
            }
            self.metrics().flows_replayed.add(flows);
            segment.set_recovered(flows, at as u64);
            self.state.borrow_mut().buffer.push_sealed(segment);
        }
        Ok(highest)
    }

    // ---- release -----------------------------------------------------------------------------

    async fn release_loop(self: Rc<Self>, wake: LocalReceiver<()>) {
        loop {
            let (ready, due, next) = {
                let mut state = self.state.borrow_mut();
                let ready = state.replay_done == self.router.shards();
                let due = if ready {
                    state.buffer.take_due(Timestamp::now())
                } else {
                    None
                };
                (ready, due, state.buffer.next_due())
            };
            let Some(segment) = due else {
                let wait = match (ready, next) {
                    (true, Some(next)) => Duration::from_nanos(next.nanos_since(Timestamp::now()))
                        .min(Duration::from_millis(100)),
                    _ => Duration::from_millis(100),
                };
                future::or(async { wake.recv().await.is_some() }, async {
                    glommio::timer::sleep(wait).await;
                    true
                })
                .await;
                continue;
            };
            self.release(segment).await;
        }
    }

    /// Attributes every flow of a due segment, emits them, re-buffers the ones to retry, and
    /// deletes the segment once all of that is durable.
    async fn release(&self, mut segment: SealedSegment) {
        let bytes = loop {
            match read_segment(&mut segment).await {
                Ok(bytes) => break bytes,
                Err(error) => {
                    self.metrics().write_errors.add(1);
                    eprintln!(
                        "flowattr-collector: shard {}: reading segment {} failed, retrying: {error}",
                        self.id, segment.id
                    );
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let bytes = segment.valid(&bytes);
        let hold = self.state.borrow().buffer.hold(segment.lane);
        let format = !self.node.sinks.is_empty();
        let mut out = Vec::with_capacity(if format { SINK_CHUNK_BYTES + 4096 } else { 0 });
        let mut retried = false;
        let mut at = 0;
        loop {
            let block = match decode_block(&bytes[at..]) {
                Ok(Some((block, used))) => {
                    at += used;
                    block
                }
                Ok(None) => break,
                Err(error) => {
                    self.metrics().corrupt_blocks.add(1);
                    eprintln!(
                        "flowattr-collector: shard {}: segment {} is corrupt at byte {at}, its remaining flows are lost: {error}",
                        self.id, segment.id
                    );
                    break;
                }
            };
            retried |= self.attribute_block(&block, hold, format, &mut out);
            if out.len() >= SINK_CHUNK_BYTES {
                self.emit(&mut out).await;
            }
        }
        if !out.is_empty() {
            self.emit(&mut out).await;
        }
        if retried {
            // The retried flows must be durable in the retry lane before their only other
            // copy, this segment, goes.
            let done = Rc::new(std::cell::Cell::new(false));
            self.state
                .borrow_mut()
                .buffer
                .complete_when_durable(Lane::Retry, Completion::Local(done.clone()));
            Self::wake(&self.writer_wake);
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        if let Err(error) = remove_segment(segment).await {
            eprintln!("flowattr-collector: shard {}: deleting a released segment failed: {error}", self.id);
        }
        self.metrics().segments_released.add(1);
    }

    /// Attributes one block's flows. Returns whether any was re-buffered for retry.
    fn attribute_block(
        &self,
        block: &crate::delay::codec::Block<'_>,
        hold: Duration,
        format: bool,
        out: &mut Vec<u8>,
    ) -> bool {
        let max_retries = self.node.config.delay.max_retries;
        let now = Timestamp::now();
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let local_ids: Vec<WorkloadId> = block
            .workloads()
            .iter()
            .map(|name| state.names.intern(name))
            .collect();
        let extra = now.nanos_since(block.header.arrival.saturating_add(hold));
        let _ = state
            .extra_latency
            .record_n(extra / 1_000_000, u64::from(block.flow_count()));
        let mut retry = Vec::new();
        let metrics = &self.node.metrics[self.id];
        let decoded = block.for_each_flow(|flow| {
            let attribution = state.map.attribute(flow.remote_ip, flow.remote_port, flow.start);
            let remote = match attribution {
                Attribution::Unattributed(Reason::NoEvidence) if flow.retries < max_retries => {
                    retry.push(BufferedFlow {
                        retries: flow.retries + 1,
                        ..flow
                    });
                    return;
                }
                Attribution::Owner(owner) => {
                    metrics.flows_attributed.add(1);
                    RemoteEnd::Workload(owner)
                }
                Attribution::Unattributed(reason) => {
                    metrics.unattributed(reason).add(1);
                    RemoteEnd::Unattributed(reason)
                }
            };
            state.deps.record(&ConnectionReport {
                local_ip: flow.local_ip,
                local_port: flow.local_port,
                remote_ip: flow.remote_ip,
                remote_port: flow.remote_port,
                start: flow.start,
                end: flow.end,
                state: flow.state,
                direction: flow.direction,
                bytes: flow.bytes_sent + flow.bytes_received,
                local: flow.local_workload.map(|index| local_ids[index as usize]),
                remote,
            });
            if format {
                let local_name = flow
                    .local_workload
                    .map(|index| block.workloads()[index as usize]);
                let remote_name = match remote {
                    RemoteEnd::Workload(owner) => Ok(state.names.name(owner).unwrap_or("?")),
                    RemoteEnd::Unattributed(reason) => Err(reason),
                };
                AttributedFlow::new(&block.header, &flow, local_name, remote_name)
                    .write_json_line(out);
            }
        });
        if let Err(error) = decoded {
            metrics.corrupt_blocks.add(1);
            eprintln!(
                "flowattr-collector: shard {}: a buffered block is corrupt, its remaining flows are lost: {error}",
                self.id
            );
        }
        if retry.is_empty() {
            return false;
        }
        metrics.flows_retried.add(retry.len() as u64);
        let header = BlockHeader {
            arrival: now,
            ..block.header
        };
        state
            .buffer
            .append(Lane::Retry, &header, block.workloads(), &retry);
        true
    }

    /// Writes `out` to every sink, retrying until it succeeds: the segment its flows came
    /// from is kept until then.
    async fn emit(&self, out: &mut Vec<u8>) {
        let mut chunk = std::mem::take(out);
        loop {
            let sinks = self.node.clone();
            let (result, returned) = glommio::executor()
                .spawn_blocking(move || {
                    let result = sinks.sinks.write_chunk(&chunk);
                    (result, chunk)
                })
                .await;
            chunk = returned;
            match result {
                Ok(()) => break,
                Err(error) => {
                    self.metrics().sink_errors.add(1);
                    eprintln!("flowattr-collector: shard {}: {error}; retrying", self.id);
                    glommio::timer::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        chunk.clear();
        *out = chunk;
    }

    // ---- upkeep ------------------------------------------------------------------------------

    async fn upkeep_loop(self: Rc<Self>, queries: mpsc::Receiver<OwnerQuery>) {
        let mut ticks = 0u64;
        loop {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            while let Ok(query) = queries.try_recv() {
                let answer = self.answer(&query);
                let _ = query.reply.try_send(answer);
            }
            ticks += 1;
            if ticks.is_multiple_of(200) {
                self.publish();
            }
            if ticks.is_multiple_of(1000) {
                let now = Timestamp::now();
                let mut state = self.state.borrow_mut();
                state.map.evict(now);
                state.deps.forget_idle(now.saturating_sub(self.node.config.ownership.retention));
                state
                    .seen
                    .forget_before(now.saturating_sub(self.node.config.ingest.dedup_window));
            }
        }
    }

    /// Publishes the shard's graph, latency and map size for the control plane.
    fn publish(&self) {
        let mut state = self.state.borrow_mut();
        let second = std::mem::replace(&mut state.extra_latency, new_latency_histogram());
        state.recent_latency.push_back(second);
        if state.recent_latency.len() > LATENCY_WINDOW_SECONDS {
            state.recent_latency.pop_front();
        }
        let mut window = new_latency_histogram();
        for second in &state.recent_latency {
            let _ = window.add(second);
        }
        let usage = state.map.memory_usage();
        self.metrics().ownership_keys.set(usage.keys as u64);
        self.metrics().ownership_bytes.set(usage.bytes() as u64);
        let view = ShardView {
            edges: state.deps.snapshot(&state.names),
            extra_latency_ms: window,
        };
        *self.node.views[self.id]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = view;
    }

    fn answer(&self, query: &OwnerQuery) -> OwnerAnswer {
        let state = self.state.borrow();
        let name = |segment: &Segment| match segment.holder {
            crate::ownership::Holder::Workload(id) => state.names.name(id).map(str::to_owned),
            crate::ownership::Holder::Contested => None,
        };
        let (owner, unattributed) = match query.at {
            None => (None, None),
            Some(at) => match state.map.attribute(query.ip, query.port, at) {
                Attribution::Owner(id) => (state.names.name(id).map(str::to_owned), None),
                Attribution::Unattributed(reason) => (None, Some(reason.as_str())),
            },
        };
        OwnerAnswer {
            owner,
            unattributed,
            segments: state
                .map
                .segments(query.ip, query.port)
                .iter()
                .map(|segment| SegmentView {
                    start_ns: segment.start.as_nanos(),
                    end_ns: segment.end.as_nanos(),
                    holder: name(segment),
                })
                .collect(),
            horizon_ns: state.map.horizon().as_nanos(),
        }
    }
}

/// How late a due segment may be released before the shard stops taking new flows.
const RELEASE_LAG_MAX: Duration = Duration::from_millis(200);

/// `/metrics` reports the extra latency of the flows released in this many recent seconds.
const LATENCY_WINDOW_SECONDS: usize = 10;

/// Output is handed to the sinks in chunks of about this size.
const SINK_CHUNK_BYTES: usize = 1 << 20;

/// Extra latency beyond the hold, in milliseconds, up to an hour.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000, 3).expect("static bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_spreads_ips_evenly_and_stably() {
        let router = ShardRouter::new(8);
        let mut counts = [0usize; 8];
        for i in 0..80_000u32 {
            counts[router.shard_of(CanonicalIp::from_v4((0x0A00_0000 + i).into()))] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
        let ip = CanonicalIp::from_v4([10, 1, 2, 3].into());
        assert_eq!(router.shard_of(ip), ShardRouter::new(8).shard_of(ip));
        assert_eq!(ShardRouter::new(1).shard_of(ip), 0);
    }
}
