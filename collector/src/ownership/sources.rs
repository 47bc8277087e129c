//! Who reports evidence: an exporter (through the connection that carried its batch) or a
//! peer node of the region (through the broadcast). Each segment keeps the [`SourceId`] of
//! the evidence that last shaped it, four bytes, so the console can say who said an IP was
//! held and when that source was last heard. Interned once per batch, not per heartbeat.

use flowattr_common::Timestamp;
use rustc_hash::FxHashMap;

use super::SourceId;

/// At most this many sources per shard; past it, new ones are [`SourceId::UNKNOWN`] (a fleet
/// whose exporters come and go for years reaches it, and only the console loses by it).
const SOURCES_MAX: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An exporter's batch, received by this node from `sender` (the connection's identity:
    /// the exporter itself, or the collector that forwarded it).
    Exporter { exporter: u64, sender: u64 },
    /// A range a peer node of the region learned and broadcast, from `exporter` if the peer
    /// said (nodes of older versions do not).
    Peer { node: u64, exporter: Option<u64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSeen {
    pub source: Source,
    /// When this node last took evidence from it.
    pub last_heard: Timestamp,
}

#[derive(Debug, Default)]
pub struct Sources {
    seen: Vec<SourceSeen>,
    ids: FxHashMap<Source, SourceId>,
}

impl Sources {
    /// The id of `source`, heard from at `now`.
    pub fn heard(&mut self, source: Source, now: Timestamp) -> SourceId {
        if let Some(&id) = self.ids.get(&source) {
            self.seen[id.0 as usize].last_heard = now;
            return id;
        }
        if self.seen.len() >= SOURCES_MAX {
            return SourceId::UNKNOWN;
        }
        let id = SourceId(self.seen.len() as u32);
        self.seen.push(SourceSeen {
            source,
            last_heard: now,
        });
        self.ids.insert(source, id);
        id
    }

    pub fn get(&self, id: SourceId) -> Option<SourceSeen> {
        self.seen.get(id.0 as usize).copied()
    }
}
