//! The shard's side of the broadcast: what its exporters taught it goes out every publish
//! interval, and what its peers learned comes in as the same set union as a local heartbeat.

use std::sync::mpsc;

use super::PeerMessage;
use super::Shard;
use crate::attribution::prefetch_ahead;
use crate::broadcast::Broadcast;
use crate::events::IpEvent;
use crate::ownership::{DictionaryIds, Heartbeat, InsertOutcome, Source};
use crate::peer_message::PeerRange;

/// Peer messages applied per upkeep tick (5 ms): up to ~64K ranges each.
const PEER_MESSAGES_PER_TICK: usize = 32;

impl Shard {
    /// Hands what this shard learned since the last call to the publisher.
    pub(super) fn publish_learned(&self) {
        let Some(broadcast) = self.node.broadcast.as_ref() else {
            return;
        };
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let Some(learned) = state.learned.as_mut() else {
            return;
        };
        // Everything learned before now is in the batches below (the cut goes even when
        // there are none: peers wait for it).
        let cut = flowattr_common::Timestamp::now();
        if !learned.is_empty() {
            broadcast
                .status
                .learned_heartbeats
                .fetch_add(learned.heartbeats(), std::sync::atomic::Ordering::Relaxed);
            for batch in learned.take(
                broadcast.node_id,
                broadcast.publisher.partitions(),
                &state.attributor.names,
            ) {
                broadcast.publisher.send(&batch);
            }
        }
        broadcast.publisher.cut(self.id, cut);
    }

    /// Applies what the consumer thread queued for this shard, a bounded number of messages
    /// per call so that a catch-up never keeps ingest and release waiting long.
    pub(super) fn apply_peer_messages(&self, peers: &mpsc::Receiver<PeerMessage>) {
        for message in peers.try_iter().take(PEER_MESSAGES_PER_TICK) {
            match message {
                PeerMessage::Ranges {
                    from,
                    workloads,
                    ranges,
                } => self.apply_peer_ranges(from, &workloads, &ranges),
                PeerMessage::Events(events) => self.apply_events(&events),
                PeerMessage::PeersComplete(region) => self
                    .state
                    .borrow_mut()
                    .attributor
                    .set_peers_complete(region),
                PeerMessage::CaughtUp => {
                    let mut state = self.state.borrow_mut();
                    state.topics_caught_up += 1;
                    if state.topics_caught_up == Broadcast::topics_to_catch_up(&self.node.config) {
                        state.peers_caught_up = true;
                        if let Some(broadcast) = &self.node.broadcast {
                            broadcast
                                .status
                                .shards_caught_up
                                .fetch_add(1, std::sync::atomic::Ordering::Release);
                        }
                        Self::wake(&self.release_wake);
                    }
                }
            }
        }
    }

    fn apply_events(&self, events: &[IpEvent]) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        for event in events {
            state.attributor.learn_event(event);
        }
    }

    fn apply_peer_ranges(&self, from: u64, workloads: &[Box<str>], ranges: &[PeerRange]) {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let mut ids = DictionaryIds::new(workloads);
        let (mut applied, mut expired) = (0, 0);
        let now = flowattr_common::Timestamp::now();
        // Interned once per run of ranges from one exporter, not once per range.
        let mut source = None;
        for (at, range) in ranges.iter().enumerate() {
            let source = match source {
                Some((exporter, id)) if exporter == range.exporter => id,
                _ => {
                    let peer = Source::Peer {
                        node: from,
                        exporter: range.exporter,
                    };
                    let id = state.sources.heard(peer, now);
                    source = Some((range.exporter, id));
                    id
                }
            };
            prefetch_ahead(ranges, at, |range, stage| {
                state.attributor.map.prefetch(range.ip, range.port, stage)
            });
            // The consumer checked the index against the message's dictionary.
            let owner = ids.id(&mut state.attributor.names, range.owner);
            let heartbeat = Heartbeat {
                ip: range.ip,
                port: range.port,
                owner,
                start: range.start,
                end: range.end,
                source,
            };
            match state.attributor.map.insert(heartbeat) {
                Ok(InsertOutcome::Expired) | Err(_) => expired += 1,
                Ok(_) => applied += 1,
            }
        }
        self.metrics().peer_ranges_applied.add(applied);
        self.metrics().heartbeats_expired.add(expired);
    }
}
