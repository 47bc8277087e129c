//! Broadcast between the nodes of a region, over Kafka. Every node publishes what its own
//! exporters taught it and applies what every other node learned, so any node can attribute
//! any remote IP whichever node its exporters send to.
//!
//! - Each shard keeps what its local heartbeats taught it since its last publish, compacted
//!   per (IP, port, owner) ([`LearnedRanges`]), and hands it to the publisher thread every
//!   `cluster.publish_interval` as one `RangeUpdateBatch` frame per partition: an IP's updates
//!   always go to the partition of the IP, so they stay ordered.
//! - The publisher thread ([`publish`]) produces them with a bounded backlog, plus a presence
//!   message every interval, so peers can tell a silent node from an idle one, carrying how
//!   far this node's stream is complete ([`progress`]).
//! - The consumer thread ([`consume`]) reads every partition (manual assignment, no consumer
//!   group), from `now - retention` at start, validates every frame, checks every update as
//!   exporter evidence is checked, and hands each to the shard that owns its IP. Applying a
//!   peer's update is the same set union as a local heartbeat: duplicates, replays and
//!   reordering change nothing. Until it has read everything that was in the topic when it
//!   started, no shard releases flows.
//! - Every peer's evidence is complete only through its watermark ([`watermarks`]); the
//!   shards answer no flow whose lookup needs evidence past the oldest live peer's.

mod consume;
mod learned;
mod progress;
mod publish;
mod status;
mod watermarks;

use std::sync::Arc;
use std::sync::mpsc;

use flowattr_common::CanonicalIp;

pub use learned::{LearnedBatch, LearnedRanges};
pub use publish::Publisher;
pub use status::{BroadcastStatus, RejectReason};
pub use watermarks::PeerView;

use crate::config::Config;
use crate::peer_message::PeerMessage;

/// The Kafka header of a presence message that says through which instant the publishing
/// node's stream is complete: nanoseconds since the epoch, in decimal. A header, not a field of
/// the frame, so that readers that do not know it read the frame as before.
pub const COMPLETE_THROUGH_HEADER: &str = "flowattr-complete-through";

/// The Kafka header of a presence message from a node whose stream has a hole (a message lost,
/// or a restart after unpublished evidence): its evidence is complete only about instants
/// after this one (nanoseconds since the epoch, in decimal), until the hole stops mattering.
pub const COMPLETE_AFTER_HEADER: &str = "flowattr-complete-after";

/// The Kafka header of an update message that names, for each update in order, the exporter
/// that last reported it: 8 bytes each, little-endian. Provenance for the console only (no
/// answer depends on it), and a header so that nodes of other versions read the frame as
/// before, in both directions of a rolling upgrade.
pub const EXPORTERS_HEADER: &str = "flowattr-exporters";

/// The [`EXPORTERS_HEADER`] value for `exporters`.
fn exporters_header(exporters: &[u64]) -> Vec<u8> {
    exporters.iter().flat_map(|id| id.to_le_bytes()).collect()
}

/// The exporters an [`EXPORTERS_HEADER`] value names for a message of `updates` updates; None
/// if it does not have one for each.
fn exporters_of(header: &[u8], updates: usize) -> Option<Vec<u64>> {
    (header.len() == updates.checked_mul(8)?).then(|| {
        header
            .chunks_exact(8)
            .map(|id| u64::from_le_bytes(id.try_into().expect("chunks of 8")))
            .collect()
    })
}

/// Messages queued per shard before the consumer thread waits: applying is fast, and a shard
/// that falls behind slows the consumer, not the other way round.
pub const PEER_QUEUE: usize = 256;

/// The partition an IP's updates go to, for `partitions` partitions.
pub fn partition_of(ip: CanonicalIp, partitions: u32) -> i32 {
    let octets = ip.octets();
    let low = u64::from_le_bytes(octets[8..].try_into().expect("8 bytes"));
    let high = u64::from_le_bytes(octets[..8].try_into().expect("8 bytes"));
    // Not the shard hash: a partition holds IPs of every shard of every node.
    let hash = (low ^ high.rotate_left(17)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    ((u128::from(hash >> 1) * u128::from(partitions)) >> 63) as i32
}

/// The running broadcast: the publisher for the shards, and what `/metrics` reads.
pub struct Broadcast {
    pub node_id: u64,
    pub publisher: Publisher,
    pub status: Arc<BroadcastStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    #[error(transparent)]
    Client(#[from] crate::kafka::ClientError),
    #[error("starting the {thread} thread: {source}")]
    Thread {
        thread: &'static str,
        source: std::io::Error,
    },
    #[error("cluster node id file {path}: {source}")]
    NodeId {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Broadcast {
    /// Topics whose history each shard must apply before it releases flows.
    pub fn topics_to_catch_up(config: &Config) -> usize {
        1 + usize::from(config.events.enabled())
    }

    /// Starts the publisher and consumer threads. `peers[s]` feeds shard `s`.
    pub fn start(
        config: &Config,
        brokers: &str,
        peers: Vec<mpsc::SyncSender<PeerMessage>>,
    ) -> Result<Broadcast, BroadcastError> {
        let node_id = node_id(config)?;
        let status = Arc::new(BroadcastStatus::default());
        let publisher = Publisher::start(config, brokers, node_id, peers.len(), status.clone())?;
        consume::start(config, brokers, node_id, peers, status.clone())?;
        Ok(Broadcast {
            node_id,
            publisher,
            status,
        })
    }
}

/// `cluster.node_id`, or the id kept in the data directory (made on first start).
fn node_id(config: &Config) -> Result<u64, BroadcastError> {
    if let Some(id) = config.cluster.node_id {
        return Ok(id);
    }
    let path = config.delay.dir.join("node-id");
    let error = |source| BroadcastError::NodeId {
        path: path.clone(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(id) = text.trim().parse()
    {
        return Ok(id);
    }
    std::fs::create_dir_all(&config.delay.dir).map_err(error)?;
    let id = fastrand::u64(1..u64::MAX);
    flowattr_common::durable::replace_file(&path, format!("{id}\n").as_bytes()).map_err(error)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exporters_header_names_one_exporter_per_update_or_none() {
        let ids = [7, u64::MAX, 0];
        let header = exporters_header(&ids);
        assert_eq!(exporters_of(&header, 3), Some(ids.to_vec()));
        // One short, one too many, garbage: the ranges stand, their exporters are not named.
        assert_eq!(exporters_of(&header[..16], 3), None);
        assert_eq!(exporters_of(&header, 2), None);
        assert_eq!(exporters_of(b"garbage", 1), None);
        assert_eq!(exporters_of(&[], 0), Some(Vec::new()));
    }
}
