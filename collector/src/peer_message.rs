//! What the Kafka reader threads (the broadcast's and the events') hand the shards: peers'
//! ranges, events, and how far each topic has been read. Below both the readers and the shards,
//! so that neither names the other.

use flowattr_common::{CanonicalIp, Timestamp};

use crate::events::IpEvent;
use crate::ownership::{Completeness, Dictionary};

/// One peer's range, checked, for the shard that owns its IP.
#[derive(Debug, Clone, Copy)]
pub struct PeerRange {
    pub ip: CanonicalIp,
    pub port: u16,
    /// Index into the message's dictionary; None: a holder its exporter could not name.
    pub owner: Option<u32>,
    /// The exporter that reported it to the peer, if the peer said.
    pub exporter: Option<u64>,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// What the Kafka reader threads (the broadcast's, the events') tell one shard.
#[derive(Debug)]
pub enum PeerMessage {
    Ranges {
        /// The node that broadcast them.
        from: u64,
        workloads: Dictionary,
        ranges: Vec<PeerRange>,
    },
    /// Events about IPs with no agent, checked.
    Events(Vec<IpEvent>),
    /// Every live peer's evidence about the instants it covers has been handed over (and,
    /// the channel keeping order, is applied before this is read).
    PeersComplete(Completeness),
    /// Everything that was in one topic (broadcast, events) when the node started has been
    /// handed over (and, since the channel keeps order, is applied before this is read).
    CaughtUp,
}
