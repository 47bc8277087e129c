//! What the broadcast threads report, for `/metrics` and `/healthz`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use flowattr_common::Timestamp;
use flowattr_common::exposition::Scrape;
use hdrhistogram::Histogram;

use super::watermarks::PeerView;

/// Why a broadcast message or one of its updates was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not one whole frame with a good checksum (garbage, truncated, a foreign message).
    BadFrame,
    /// A frame over the size limit.
    TooLarge,
    /// An intact frame that is not a valid range-update batch.
    BadPayload,
    /// An update about a host-local address: no node's evidence about one is fleet-wide.
    HostLocal,
    /// An update that ends after the consumer's clock plus the allowed skew.
    FromTheFuture,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] = [
        RejectReason::BadFrame,
        RejectReason::TooLarge,
        RejectReason::BadPayload,
        RejectReason::HostLocal,
        RejectReason::FromTheFuture,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadFrame => "bad_frame",
            RejectReason::TooLarge => "too_large",
            RejectReason::BadPayload => "bad_payload",
            RejectReason::HostLocal => "host_local",
            RejectReason::FromTheFuture => "from_the_future",
        }
    }
}

#[derive(Debug)]
pub struct BroadcastStatus {
    pub published_messages: AtomicU64,
    pub published_bytes: AtomicU64,
    pub published_updates: AtomicU64,
    /// Heartbeats the shards learned from their own exporters, before compaction.
    pub learned_heartbeats: AtomicU64,
    pub dropped_messages: AtomicU64,
    /// Messages the brokers refused for their partition or topic, sent again.
    pub resent_messages: AtomicU64,
    pub dropped_updates: AtomicU64,
    pub backlog_bytes: AtomicU64,
    pub consumed_messages: AtomicU64,
    pub applied_updates: AtomicU64,
    pub rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Set once the consumer has handed the shards everything in the topic at start...
    pub read_up: AtomicBool,
    /// ...and counted up by each shard once it has applied all of that.
    pub shards_caught_up: AtomicUsize,
    /// Publish to hand-over, in milliseconds, of peers' messages read after catching up.
    /// The publish-to-hand-over lag of every peer message read since the start, in
    /// milliseconds (rendered as a cumulative histogram: a window is the difference of two
    /// scrapes).
    pub lag: Mutex<Histogram<u64>>,
    /// Each live peer: its newest message, by the time it was published, and how far its
    /// stream is complete.
    pub peers: Mutex<BTreeMap<u64, PeerView>>,
    /// Every live peer's stream is complete through this instant (nanoseconds; u64::MAX: no
    /// peer to wait for).
    pub peers_complete_through_ns: AtomicU64,
    /// ...but only about instants after this one (nanoseconds; 0: no peer has a hole).
    pub peers_complete_after_ns: AtomicU64,
    /// Peers forgotten after `cluster.peer_timeout` of silence.
    pub peers_forgotten: AtomicU64,
    /// Everything this node's shards learned before this instant is with the brokers
    /// (nanoseconds; 0 until every shard's first cut is).
    pub published_through_ns: AtomicU64,
    /// While a loss matters: this node's evidence is complete only about instants after this
    /// one (nanoseconds; 0: no hole).
    pub complete_after_ns: AtomicU64,
    /// This node has read, and handed to its shards, everything the brokers held of the
    /// broadcast topic at this instant (nanoseconds; 0 until the first time).
    pub read_through_ns: AtomicU64,
    /// Kafka reader processes that died and were replaced (see `kafka::reader_process`): the
    /// node's one count, the events reader's included.
    pub reader_restarts: std::sync::Arc<AtomicU64>,
    /// The broadcast topic's partitions, as the brokers last said (0: not known yet).
    pub topic_partitions: std::sync::atomic::AtomicU32,
}

impl Default for BroadcastStatus {
    fn default() -> Self {
        BroadcastStatus {
            published_messages: AtomicU64::new(0),
            published_bytes: AtomicU64::new(0),
            published_updates: AtomicU64::new(0),
            learned_heartbeats: AtomicU64::new(0),
            dropped_messages: AtomicU64::new(0),
            resent_messages: AtomicU64::new(0),
            dropped_updates: AtomicU64::new(0),
            backlog_bytes: AtomicU64::new(0),
            consumed_messages: AtomicU64::new(0),
            applied_updates: AtomicU64::new(0),
            rejected: Default::default(),
            read_up: AtomicBool::new(false),
            shards_caught_up: AtomicUsize::new(0),
            lag: Mutex::new(crate::metrics::new_milliseconds_histogram()),
            peers: Mutex::new(BTreeMap::new()),
            peers_complete_through_ns: AtomicU64::new(u64::MAX),
            peers_complete_after_ns: AtomicU64::new(0),
            peers_forgotten: AtomicU64::new(0),
            published_through_ns: AtomicU64::new(0),
            complete_after_ns: AtomicU64::new(0),
            read_through_ns: AtomicU64::new(0),
            reader_restarts: Default::default(),
            topic_partitions: std::sync::atomic::AtomicU32::new(0),
        }
    }
}

impl BroadcastStatus {
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Peers whose newest message is older than `silence`, with their silence.
    pub fn silent_peers(&self, silence: Duration, now: Timestamp) -> Vec<(u64, Duration)> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        peers
            .iter()
            .map(|(&peer, view)| (peer, Duration::from_nanos(now.nanos_since(view.seen))))
            .filter(|(_, quiet)| *quiet > silence)
            .collect()
    }

    /// Live peers whose stream is complete only through an instant more than `behind` before
    /// `now`, with that instant (None: the peer sends no watermark).
    pub fn peers_behind(&self, behind: Duration, now: Timestamp) -> Vec<(u64, Option<Timestamp>)> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        peers
            .iter()
            .filter(|(_, view)| {
                view.complete_through
                    .is_none_or(|through| now.nanos_since(through) > behind.as_nanos() as u64)
            })
            .map(|(&peer, view)| (peer, view.complete_through))
            .collect()
    }

    /// Live peers whose stream has a hole, with the instant their evidence is complete after.
    pub fn peers_with_holes(&self) -> Vec<(u64, Timestamp)> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        peers
            .iter()
            .filter_map(|(&peer, view)| Some((peer, view.complete_after?)))
            .collect()
    }

    pub fn forget_peer(&self, peer: u64) {
        self.peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .remove(&peer);
        self.peers_forgotten.fetch_add(1, Ordering::Relaxed);
    }

    /// Every one of the node's `shards` has applied what the topic held at start.
    pub fn caught_up(&self, shards: usize) -> bool {
        self.shards_caught_up.load(Ordering::Acquire) >= shards
    }

    pub fn write_metrics(
        &self,
        shards: usize,
        now: Timestamp,
        scrape: &mut Scrape<'_>,
    ) -> fmt::Result {
        let counters: [(&str, &str, &AtomicU64); 11] = [
            (
                "flowattr_broadcast_published_messages",
                "messages published to the broadcast topic",
                &self.published_messages,
            ),
            (
                "flowattr_broadcast_published_bytes",
                "bytes published to the broadcast topic",
                &self.published_bytes,
            ),
            (
                "flowattr_broadcast_published_updates",
                "range updates published (compacted per IP, port and owner)",
                &self.published_updates,
            ),
            (
                "flowattr_broadcast_learned_heartbeats",
                "heartbeats from this node's exporters, before compaction",
                &self.learned_heartbeats,
            ),
            (
                "flowattr_broadcast_dropped_messages",
                "messages dropped past the publish backlog bound (peers attribute less, never wrongly)",
                &self.dropped_messages,
            ),
            (
                "flowattr_broadcast_resent_messages",
                "messages the brokers refused for their partition or topic (a topic made again), sent again",
                &self.resent_messages,
            ),
            (
                "flowattr_broadcast_dropped_updates",
                "range updates in dropped messages",
                &self.dropped_updates,
            ),
            (
                "flowattr_broadcast_consumed_messages",
                "messages read from the broadcast topic",
                &self.consumed_messages,
            ),
            (
                "flowattr_broadcast_applied_updates",
                "peers' range updates handed to the shards",
                &self.applied_updates,
            ),
            (
                "flowattr_broadcast_reader_restarts",
                "Kafka reader processes (broadcast and events topics) that died and were replaced",
                &*self.reader_restarts,
            ),
            (
                "flowattr_broadcast_peers_forgotten",
                "peers forgotten after cluster.peer_timeout of silence",
                &self.peers_forgotten,
            ),
        ];
        for (name, help, value) in counters {
            scrape.counter(name, help, value.load(Ordering::Relaxed))?;
        }
        let reasons = RejectReason::ALL.map(RejectReason::as_str);
        crate::metrics::write_by_reason(
            scrape,
            "flowattr_broadcast_rejected",
            "broadcast messages or updates skipped, by reason",
            &reasons,
            &self.rejected,
        )?;
        crate::metrics::write_milliseconds_histogram(
            scrape,
            "flowattr_broadcast_lag_seconds",
            "publish to hand-over of peers' messages, to the millisecond",
            &self.lag.lock().unwrap_or_else(|poison| poison.into_inner()),
        )?;
        let seconds = |nanos: u64| nanos as f64 / 1e9;
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone();
        scrape.gauges(
            "flowattr_broadcast_peer_silence_seconds",
            "time since each peer's newest message was published",
            peers
                .iter()
                .map(|(peer, view)| ([("peer", *peer)], seconds(now.nanos_since(view.seen)))),
        )?;
        scrape.gauges(
            "flowattr_broadcast_peer_complete_through_seconds",
            "each peer's stream is complete through this instant (Unix time; 0 until known; absent for a peer that sends no watermark)",
            peers.iter().filter_map(|(peer, view)| Some(([("peer", *peer)], seconds(view.complete_through?.as_nanos())))),
        )?;
        scrape.gauges(
            "flowattr_broadcast_peer_complete_after_seconds",
            "a peer whose stream has a hole: its evidence is complete only about instants after this one (Unix time; absent without a hole)",
            peers.iter().filter_map(|(peer, view)| Some(([("peer", *peer)], seconds(view.complete_after?.as_nanos())))),
        )?;
        let counts: [(&str, &str, u64); 3] = [
            (
                "flowattr_broadcast_backlog_bytes",
                "bytes waiting to be published",
                self.backlog_bytes.load(Ordering::Relaxed),
            ),
            (
                "flowattr_broadcast_topic_partitions",
                "the broadcast topic's partitions, as the brokers last said",
                u64::from(self.topic_partitions.load(Ordering::Relaxed)),
            ),
            (
                "flowattr_broadcast_caught_up",
                "1 once everything in the topic at start has been applied",
                u64::from(self.caught_up(shards)),
            ),
        ];
        for (name, help, value) in counts {
            scrape.gauge(name, help, value)?;
        }
        let instants: [(&str, &str, f64); 4] = [
            (
                "flowattr_broadcast_complete_through_seconds",
                "every live peer's stream is complete through this instant (Unix time; +Inf with no peer): flows whose lookup needs evidence after it wait, then come out incomplete",
                match self.peers_complete_through_ns.load(Ordering::Relaxed) {
                    u64::MAX => f64::INFINITY,
                    nanos => seconds(nanos),
                },
            ),
            (
                "flowattr_broadcast_complete_after_seconds",
                "every live peer's evidence is complete only about instants after this one (Unix time; 0: no peer's stream has a hole): flows whose lookup reaches back before it come out incomplete",
                seconds(self.peers_complete_after_ns.load(Ordering::Relaxed)),
            ),
            (
                "flowattr_broadcast_own_complete_after_seconds",
                "this node's stream has a hole (a message lost, or a restart after an outage): its evidence is complete only about instants after this one (Unix time; 0: no hole)",
                seconds(self.complete_after_ns.load(Ordering::Relaxed)),
            ),
            (
                "flowattr_broadcast_published_through_seconds",
                "everything this node learned before this instant is with the brokers (Unix time)",
                seconds(self.published_through_ns.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, value) in instants {
            scrape.gauge(name, help, value)?;
        }
        scrape.gauge(
            "flowattr_broadcast_read_through_seconds",
            "this node has read and applied everything the brokers held of the broadcast topic at this instant (Unix time)",
            seconds(self.read_through_ns.load(Ordering::Relaxed)),
        )
    }
}
