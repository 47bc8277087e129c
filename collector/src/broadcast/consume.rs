//! The consumer thread: every partition of the broadcast topic, read from `now - retention`,
//! each message checked before anything in it reaches a shard.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use flowattr_common::wire::{FrameDecoder, FrameError, FrameKind, ValidRangeUpdateBatch};
use flowattr_common::{Timestamp, duration_nanos};

use super::watermarks::PeerWatermarks;
use super::{
    BroadcastError, BroadcastStatus, COMPLETE_AFTER_HEADER, COMPLETE_THROUGH_HEADER,
    EXPORTERS_HEADER, RejectReason, exporters_of,
};
use crate::config::Config;
use crate::kafka::{TopicMessage, read_topic_isolated};
use crate::ownership::Completeness;
use crate::ownership::Dictionary;
use crate::peer_message::{PeerMessage, PeerRange};
use crate::shard_router::ShardRouter;

pub(super) fn start(
    config: &Config,
    brokers: &str,
    node_id: u64,
    peers: Vec<mpsc::SyncSender<PeerMessage>>,
    status: Arc<BroadcastStatus>,
) -> Result<(), BroadcastError> {
    let reader = Reader {
        cluster: config.cluster.clone(),
        brokers: brokers.to_owned(),
        topic: config.cluster.topic.clone(),
        node_id,
        retention: config.ownership.retention,
        max_skew: config.max_clock_skew(),
        router: ShardRouter::new(peers.len()),
        peers,
        status,
        watermarks: RefCell::new(PeerWatermarks::new(config.cluster.peer_timeout)),
        handed: Cell::new(None),
    };
    std::thread::Builder::new()
        .name("flowattr-consume".into())
        .spawn(move || reader.run())
        .map_err(|source| BroadcastError::Thread {
            thread: "consumer",
            source,
        })?;
    Ok(())
}

struct Reader {
    cluster: crate::config::ClusterConfig,
    brokers: String,
    topic: String,
    node_id: u64,
    retention: Duration,
    max_skew: Duration,
    router: ShardRouter,
    peers: Vec<mpsc::SyncSender<PeerMessage>>,
    status: Arc<BroadcastStatus>,
    watermarks: RefCell<PeerWatermarks>,
    /// What the shards were last told of the peers' completeness.
    handed: Cell<Option<Completeness>>,
}

impl Reader {
    fn run(&self) {
        let decoder = FrameDecoder::default();
        read_topic_isolated(
            &self.cluster,
            &self.brokers,
            self.node_id,
            &self.topic,
            self.retention,
            &self.status.reader_restarts,
            |message| {
                self.status
                    .consumed_messages
                    .fetch_add(1, Ordering::Relaxed);
                self.handle(&decoder, message);
            },
            || self.caught_up(),
            |read_through| {
                self.watermarks.borrow_mut().read_through(read_through);
                self.status
                    .read_through_ns
                    .fetch_max(read_through.as_nanos(), Ordering::Relaxed);
                if self.status.read_up.load(Ordering::Relaxed) {
                    self.hand_over_completeness();
                }
            },
        );
    }

    /// Tells the shards how far every live peer's stream is complete, once it has changed.
    /// Sent after every update read before it, down the same channels: a shard has applied
    /// them all by the time it reads this.
    fn hand_over_completeness(&self) {
        let mut watermarks = self.watermarks.borrow_mut();
        for (peer, silence) in watermarks.forget_silent() {
            self.status.forget_peer(peer);
            tracing::warn!(
                "broadcast: peer {peer} silent for {:.1} s, past cluster.peer_timeout: its evidence is no longer waited for",
                silence.as_secs_f64()
            );
        }
        let region = watermarks.completeness();
        drop(watermarks);
        self.status
            .peers_complete_through_ns
            .store(region.through.as_nanos(), Ordering::Relaxed);
        self.status
            .peers_complete_after_ns
            .store(region.after.as_nanos(), Ordering::Relaxed);
        if self.handed.replace(Some(region)) != Some(region) {
            for shard in &self.peers {
                let _ = shard.send(PeerMessage::PeersComplete(region));
            }
        }
    }

    fn caught_up(&self) {
        self.hand_over_completeness();
        for shard in &self.peers {
            let _ = shard.send(PeerMessage::CaughtUp);
        }
        self.status.read_up.store(true, Ordering::Relaxed);
        tracing::info!("broadcast: caught up with topic {}", self.topic);
    }

    /// Checks one message and hands its updates to their shards.
    fn handle(&self, decoder: &FrameDecoder, message: &TopicMessage<'_>) {
        let (payload, published) = (message.payload(), message.published);
        let frame = match decoder.decode(payload) {
            Ok(Some((frame, used))) if used == payload.len() => frame,
            Err(FrameError::TooLarge { .. }) => return self.status.reject(RejectReason::TooLarge),
            _ => return self.status.reject(RejectReason::BadFrame),
        };
        if frame.kind != FrameKind::RangeUpdateBatch {
            return self.status.reject(RejectReason::BadPayload);
        }
        let Ok(batch) = ValidRangeUpdateBatch::from_frame(&frame) else {
            return self.status.reject(RejectReason::BadPayload);
        };
        let origin = batch.origin_node.to_native();
        let caught_up = self.status.read_up.load(Ordering::Relaxed);
        if origin != self.node_id {
            // A watermark that does not parse is none: the peer is waited for as if silent.
            let instant = |header| {
                message
                    .header(header)
                    .and_then(|value| std::str::from_utf8(value).ok()?.parse().ok())
                    .map(Timestamp::from_nanos)
            };
            let (through, after) = (
                instant(COMPLETE_THROUGH_HEADER),
                instant(COMPLETE_AFTER_HEADER),
            );
            let view = self.watermarks.borrow_mut().heard(
                origin,
                published,
                Timestamp::now(),
                through,
                after,
            );
            self.status
                .peers
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .insert(origin, view);
            if caught_up && !message.replayed {
                let now = Timestamp::now();
                let lag = now.nanos_since(published) / 1_000_000;
                crate::metrics::record_milliseconds(
                    &mut self
                        .status
                        .lag
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner()),
                    lag,
                    1,
                );
            }
        } else {
            self.watermarks.borrow_mut().heard_self(published);
            if caught_up {
                // Applied when this node learned it.
                return;
            }
        }
        if batch.updates.is_empty() {
            return;
        }
        let latest = Timestamp::now()
            .as_nanos()
            .saturating_add(duration_nanos(self.max_skew));
        let exporters = message
            .header(EXPORTERS_HEADER)
            .and_then(|header| exporters_of(header, batch.updates.len()));
        if exporters.is_none() {
            // A node of an older version, or a header that does not fit: the ranges are as
            // good, only the console cannot name their exporters.
            tracing::debug!(
                "broadcast: a message from node {origin} names no exporter for each of its updates"
            );
        }
        let mut by_shard: Vec<Vec<PeerRange>> = vec![Vec::new(); self.peers.len()];
        for (at, update) in batch.updates.iter().enumerate() {
            let ip = update.ip.get();
            if ip.is_host_local() {
                self.status.reject(RejectReason::HostLocal);
                continue;
            }
            for span in update.spans.iter() {
                let (start, end) = (span.start.get(), span.end.get());
                if end.as_nanos() > latest {
                    self.status.reject(RejectReason::FromTheFuture);
                    continue;
                }
                by_shard[self.router.shard_of(ip)].push(PeerRange {
                    ip,
                    port: update.port.to_native(),
                    owner: update.owner_index(),
                    exporter: exporters.as_ref().map(|exporters| exporters[at]),
                    start,
                    end,
                });
            }
        }
        let workloads: Dictionary = batch
            .workloads
            .iter()
            .map(|name| Box::from(name.as_str()))
            .collect();
        for (shard, ranges) in by_shard.into_iter().enumerate() {
            if ranges.is_empty() {
                continue;
            }
            self.status
                .applied_updates
                .fetch_add(ranges.len() as u64, Ordering::Relaxed);
            // Blocks while the shard is behind: the topic waits, nothing is dropped.
            let _ = self.peers[shard].send(PeerMessage::Ranges {
                from: origin,
                workloads: workloads.clone(),
                ranges,
            });
        }
    }
}
