//! How far each peer's stream is complete, as far as this node has read it. A peer's presence
//! message says through which instant everything it learned was acked by the brokers before
//! the message was sent. Read at instant `r`, that holds for this node once it has read every
//! partition as far as the brokers had it at `r` (the reader checks that against the brokers'
//! high watermarks): only then is the watermark confirmed. The region is complete through the
//! oldest of its live peers' confirmed watermarks.
//!
//! A peer whose stream has a hole (a message it lost, a restart after unpublished evidence)
//! says after which instant its evidence is complete; the region's evidence is complete only
//! after the latest such instant of its live peers, and only through the oldest watermark.
//!
//! A peer that has never sent a watermark (a node of an older version, or a stray writer) is
//! not waited for: its evidence is applied when it comes, and `/healthz` names it.
//!
//! A peer silent for `cluster.peer_timeout` is forgotten, so a node that left for good stops
//! holding every answer back. Silence is measured in topic time (the newest publish time read
//! from anyone, this node's own presence included): while the brokers are away, or this node
//! cannot read, nobody's silence grows and nobody is forgotten.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use flowattr_common::Timestamp;

use crate::ownership::Completeness;

/// Watermarks read but not yet confirmed, per peer: one a publish interval while this node
/// cannot check the brokers. Past it the newest replaces the last, which only confirms later.
const PENDING_MAX: usize = 64;

#[derive(Debug)]
pub struct PeerWatermarks {
    timeout: Duration,
    peers: BTreeMap<u64, PeerProgress>,
    topic_time: Timestamp,
}

#[derive(Debug, Default)]
struct PeerProgress {
    seen: Timestamp,
    /// (read at, watermark, complete after), oldest first.
    pending: VecDeque<(Timestamp, Timestamp, Option<Timestamp>)>,
    confirmed: Option<Timestamp>,
    /// As the newest confirmed message said.
    complete_after: Option<Timestamp>,
}

/// One peer as `/metrics` and `/healthz` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    /// Its newest message, by the time it was published.
    pub seen: Timestamp,
    /// Its stream is complete through this instant (ZERO: not yet known); None: it sends no
    /// watermark, and is not waited for.
    pub complete_through: Option<Timestamp>,
    /// Its stream has a hole: complete only about instants after this one.
    pub complete_after: Option<Timestamp>,
}

impl PeerWatermarks {
    pub fn new(timeout: Duration) -> Self {
        PeerWatermarks {
            timeout,
            peers: BTreeMap::new(),
            topic_time: Timestamp::ZERO,
        }
    }

    /// A message this node wrote: topic time moves on.
    pub fn heard_self(&mut self, published: Timestamp) {
        self.topic_time = self.topic_time.max(published);
    }

    /// A message from `peer`, published at `published` and read at `read_at`, with the
    /// watermark it carried if any, and where its hole ends if it has one.
    pub fn heard(
        &mut self,
        peer: u64,
        published: Timestamp,
        read_at: Timestamp,
        through: Option<Timestamp>,
        after: Option<Timestamp>,
    ) -> PeerView {
        self.heard_self(published);
        let progress = self.peers.entry(peer).or_default();
        progress.seen = progress.seen.max(published);
        if let Some(through) = through {
            if progress.pending.len() >= PENDING_MAX {
                progress.pending.pop_back();
            }
            progress.pending.push_back((read_at, through, after));
        }
        self.view(peer)
    }

    /// This node has read everything the brokers held at `at`: the watermarks read by then
    /// hold.
    pub fn read_through(&mut self, at: Timestamp) {
        for progress in self.peers.values_mut() {
            while let Some(&(read_at, through, after)) = progress.pending.front()
                && read_at <= at
            {
                progress.confirmed = Some(
                    progress
                        .confirmed
                        .map_or(through, |confirmed| confirmed.max(through)),
                );
                progress.complete_after = after;
                progress.pending.pop_front();
            }
        }
    }

    /// Forgets the peers silent for longer than the timeout, and returns them with their
    /// silence.
    pub fn forget_silent(&mut self) -> Vec<(u64, Duration)> {
        let mut forgotten = Vec::new();
        let (now, timeout) = (self.topic_time, self.timeout);
        self.peers.retain(|&peer, progress| {
            let silence = Duration::from_nanos(now.nanos_since(progress.seen));
            let live = silence <= timeout;
            if !live {
                forgotten.push((peer, silence));
            }
            live
        });
        forgotten
    }

    pub fn view(&self, peer: u64) -> PeerView {
        let Some(progress) = self.peers.get(&peer) else {
            return PeerView {
                seen: Timestamp::ZERO,
                complete_through: None,
                complete_after: None,
            };
        };
        let complete_through = match (progress.confirmed, progress.pending.is_empty()) {
            (None, true) => None,
            (confirmed, _) => Some(confirmed.unwrap_or(Timestamp::ZERO)),
        };
        PeerView {
            seen: progress.seen,
            complete_through,
            complete_after: progress.complete_after,
        }
    }

    /// How far every live peer's stream is complete.
    pub fn completeness(&self) -> Completeness {
        let views = || self.peers.keys().map(|&peer| self.view(peer));
        Completeness {
            after: views()
                .filter_map(|view| view.complete_after)
                .max()
                .unwrap_or(Timestamp::ZERO),
            through: views()
                .filter_map(|view| view.complete_through)
                .min()
                .unwrap_or(Timestamp::MAX),
        }
    }

    /// Every peer's stream is complete through this instant (MAX: no peer to wait for).
    #[cfg(test)]
    fn complete_through(&self) -> Timestamp {
        self.completeness().through
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> Timestamp {
        Timestamp::from_nanos(seconds * 1_000_000_000)
    }

    #[test]
    fn a_watermark_holds_once_everything_the_brokers_had_when_it_was_read_has_been_read() {
        let mut watermarks = PeerWatermarks::new(Duration::from_secs(60));
        assert_eq!(
            watermarks.complete_through(),
            Timestamp::MAX,
            "no peer, nothing to wait for"
        );
        watermarks.heard(7, at(100), at(100), Some(at(90)), None);
        assert_eq!(
            watermarks.complete_through(),
            Timestamp::ZERO,
            "read, not yet confirmed"
        );
        watermarks.heard(7, at(101), at(101), Some(at(91)), None);
        watermarks.read_through(at(100));
        assert_eq!(watermarks.view(7).complete_through, Some(at(90)));
        watermarks.read_through(at(102));
        assert_eq!(watermarks.complete_through(), at(91));
        // A peer that never sent a watermark (an older node, a stray writer) is not waited for.
        watermarks.heard(9, at(101), at(102), None, None);
        assert_eq!(watermarks.view(9).complete_through, None);
        assert_eq!(watermarks.complete_through(), at(91));
        // The region waits for its slowest peer.
        watermarks.heard(8, at(102), at(103), Some(at(80)), None);
        watermarks.read_through(at(104));
        assert_eq!(watermarks.complete_through(), at(80));
    }

    #[test]
    fn a_peer_with_a_hole_leaves_the_region_complete_only_after_it_once_confirmed() {
        let mut watermarks = PeerWatermarks::new(Duration::from_secs(60));
        watermarks.heard(7, at(100), at(100), Some(at(90)), None);
        watermarks.heard(8, at(100), at(100), Some(at(95)), Some(at(80)));
        assert_eq!(
            watermarks.completeness().after,
            Timestamp::ZERO,
            "not confirmed yet"
        );
        watermarks.read_through(at(100));
        let region = watermarks.completeness();
        assert_eq!(
            region,
            Completeness {
                after: at(80),
                through: at(90)
            }
        );
        assert!(region.covers(at(81), at(90)));
        assert!(
            !region.covers(at(80), at(85)),
            "a lookup reaching back into the hole"
        );
        assert!(!region.covers(at(85), at(91)), "past the watermark");
        // The hole stops mattering: the peer stops saying it.
        watermarks.heard(8, at(101), at(101), Some(at(96)), None);
        watermarks.read_through(at(101));
        assert_eq!(watermarks.completeness().after, Timestamp::ZERO);
    }

    #[test]
    fn while_nothing_can_be_confirmed_pending_watermarks_stay_bounded_and_the_newest_is_kept() {
        let mut watermarks = PeerWatermarks::new(Duration::from_secs(600));
        for second in 0..1000 {
            watermarks.heard(
                7,
                at(100 + second),
                at(100 + second),
                Some(at(90 + second)),
                None,
            );
        }
        assert!(watermarks.peers[&7].pending.len() <= PENDING_MAX);
        watermarks.read_through(at(2000));
        assert_eq!(watermarks.complete_through(), at(1089));
    }

    #[test]
    fn only_silence_in_topic_time_forgets_a_peer() {
        let mut watermarks = PeerWatermarks::new(Duration::from_secs(60));
        watermarks.heard(7, at(100), at(100), Some(at(90)), None);
        watermarks.heard(8, at(100), at(100), Some(at(95)), None);
        // However long nothing is read, nobody is forgotten.
        assert!(watermarks.forget_silent().is_empty());
        watermarks.heard(8, at(160), at(160), Some(at(150)), None);
        assert!(watermarks.forget_silent().is_empty(), "exactly the timeout");
        watermarks.heard_self(at(161));
        assert_eq!(
            watermarks.forget_silent(),
            vec![(7, Duration::from_secs(61))]
        );
        watermarks.read_through(at(161));
        assert_eq!(watermarks.complete_through(), at(150));
        // A forgotten peer that speaks again is waited for again, from its next watermark.
        watermarks.heard(7, at(162), at(162), Some(at(152)), None);
        assert_eq!(watermarks.complete_through(), Timestamp::ZERO);
    }
}
