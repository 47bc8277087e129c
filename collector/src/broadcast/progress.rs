//! How far this node's broadcast is complete: the instant through which everything its
//! shards learned has been acked by the brokers. Peers wait for it before they answer from
//! their maps (see [`super::watermarks`]), so it must never run ahead of what they can read.
//!
//! Every shard cuts what it learned every publish interval and sends the cut's messages, then
//! the cut itself, down one channel: a cut is complete once none of the messages sent before
//! it is still in flight. The node is complete through the oldest shard's newest complete cut.
//! A message lost for good (the backlog full, a delivery that failed) is a hole no later cut
//! fills: the claim then stays where it was for `hold`, the longest any flow may look back, so
//! every flow that could need the lost evidence comes out incomplete instead of named without
//! it.
//!
//! A restart is such a loss when the previous run died with evidence the brokers had not
//! acked and that the replay of its delay buffer will not learn again ([`LastRun`]).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use flowattr_common::Timestamp;

#[derive(Debug)]
pub struct PublishProgress {
    next_sequence: u64,
    in_flight: BTreeSet<u64>,
    /// Cuts not yet complete, oldest first: (sequence of the first message sent after it,
    /// shard, instant of the cut).
    cuts: VecDeque<(u64, usize, Timestamp)>,
    /// Per shard, its newest complete cut (ZERO until its first).
    complete: Vec<Timestamp>,
    /// After a loss: the claim at the loss, kept until the instant given.
    frozen: Option<(Timestamp, Timestamp)>,
    hold: Duration,
}

impl PublishProgress {
    /// `lost_since`: the previous run's evidence after this instant may be lost (see
    /// [`LastRun::lost_since`]); the claim starts frozen there.
    pub fn new(shards: usize, hold: Duration, lost_since: Option<Timestamp>, now: Timestamp) -> Self {
        PublishProgress {
            next_sequence: 0,
            in_flight: BTreeSet::new(),
            cuts: VecDeque::new(),
            complete: vec![Timestamp::ZERO; shards.max(1)],
            frozen: lost_since.map(|claim| (claim, now.saturating_add(hold))),
            hold,
        }
    }

    /// A message handed to the producer: its sequence, for [`Self::delivered`] or
    /// [`Self::lost`].
    pub fn sent(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.in_flight.insert(sequence);
        sequence
    }

    /// Shard `shard` has sent everything it learned before `at`.
    pub fn cut(&mut self, shard: usize, at: Timestamp) {
        if shard < self.complete.len() {
            self.cuts.push_back((self.next_sequence, shard, at));
            self.advance();
        }
    }

    pub fn delivered(&mut self, sequence: u64) {
        self.in_flight.remove(&sequence);
        self.advance();
    }

    /// A message that will never reach the brokers (`sequence` None: refused before it was
    /// sent). The claim stops where it is now for `hold`.
    pub fn lost(&mut self, sequence: Option<u64>, now: Timestamp) {
        let claim = self.through(now);
        self.frozen = Some((claim, now.saturating_add(self.hold)));
        if let Some(sequence) = sequence {
            self.delivered(sequence);
        }
    }

    /// Everything the shards learned before this instant is with the brokers (ZERO: not yet
    /// known).
    pub fn through(&self, now: Timestamp) -> Timestamp {
        let through = self.complete.iter().copied().min().unwrap_or(Timestamp::ZERO);
        match self.frozen {
            Some((claim, until)) if now < until => through.min(claim),
            _ => through,
        }
    }

    /// Whether a loss holds the claim back now.
    pub fn frozen(&self, now: Timestamp) -> bool {
        self.frozen.is_some_and(|(_, until)| now < until)
    }

    fn advance(&mut self) {
        let oldest_in_flight = self.in_flight.first().copied().unwrap_or(u64::MAX);
        while let Some(&(after, shard, at)) = self.cuts.front()
            && after <= oldest_in_flight
        {
            self.complete[shard] = self.complete[shard].max(at);
            self.cuts.pop_front();
        }
    }
}

/// What a run of this node last said of its stream, kept in the data directory every publish
/// interval: how far it was with the brokers, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastRun {
    pub published_through: Timestamp,
    pub at: Timestamp,
}

impl LastRun {
    pub fn load(path: &std::path::Path) -> Option<LastRun> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut words = text.split_whitespace().map(|word| word.parse().ok().map(Timestamp::from_nanos));
        Some(LastRun {
            published_through: words.next()??,
            at: words.next()??,
        })
    }

    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = format!("{} {}\n", self.published_through.as_nanos(), self.at.as_nanos());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        flowattr_common::durable::replace_file(path, text.as_bytes())
    }

    /// Where the previous run's stream may have a hole: evidence it learned after
    /// `published_through` and had not published when it stopped is learned again at start
    /// only if the delay buffer still holds its flows, that is if it came at most `replayed`
    /// before the run's end (half the delay with disk storage; nothing with memory storage).
    pub fn lost_since(&self, replayed: Duration) -> Option<Timestamp> {
        (self.at.nanos_since(self.published_through) > replayed.as_nanos() as u64).then_some(self.published_through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> Timestamp {
        Timestamp::from_nanos(seconds * 1_000_000_000)
    }

    #[test]
    fn a_cut_counts_once_every_message_sent_before_it_is_acked_whatever_the_order() {
        let mut progress = PublishProgress::new(2, Duration::from_secs(100), None, at(0));
        let first = progress.sent();
        let second = progress.sent();
        progress.cut(0, at(10));
        progress.cut(1, at(10));
        assert_eq!(progress.through(at(11)), Timestamp::ZERO);
        progress.delivered(second);
        assert_eq!(progress.through(at(11)), Timestamp::ZERO, "the first is still in flight");
        let third = progress.sent();
        progress.cut(0, at(11));
        progress.cut(1, at(11));
        progress.delivered(first);
        assert_eq!(progress.through(at(12)), at(10), "the cuts at 11 wait for the third");
        progress.delivered(third);
        assert_eq!(progress.through(at(12)), at(11));
    }

    #[test]
    fn the_node_is_complete_only_as_far_as_its_slowest_shard() {
        let mut progress = PublishProgress::new(2, Duration::from_secs(100), None, at(0));
        progress.cut(0, at(5));
        assert_eq!(progress.through(at(6)), Timestamp::ZERO, "shard 1 has not cut yet");
        progress.cut(1, at(3));
        progress.cut(0, at(6));
        assert_eq!(progress.through(at(7)), at(3));
    }

    #[test]
    fn a_lost_message_holds_the_claim_where_it_was_for_the_hold() {
        let mut progress = PublishProgress::new(1, Duration::from_secs(100), None, at(0));
        progress.cut(0, at(10));
        let lost = progress.sent();
        progress.lost(Some(lost), at(12));
        progress.cut(0, at(13));
        assert_eq!(progress.through(at(14)), at(10));
        progress.lost(None, at(50));
        progress.cut(0, at(60));
        assert_eq!(progress.through(at(149)), at(10), "a second loss extends the hold, keeps the claim");
        assert!(progress.frozen(at(149)));
        assert_eq!(progress.through(at(150)), at(60));
    }

    #[test]
    fn a_restart_after_evidence_the_delay_buffer_no_longer_holds_starts_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("published-through");
        assert_eq!(LastRun::load(&path), None, "a first start");
        let healthy = LastRun {
            published_through: at(99),
            at: at(100),
        };
        healthy.save(&path).unwrap();
        assert_eq!(LastRun::load(&path), Some(healthy));
        assert_eq!(healthy.lost_since(Duration::from_secs(30)), None, "the replay learns the last second again");
        assert_eq!(healthy.lost_since(Duration::ZERO), Some(at(99)), "memory storage replays nothing");
        let outage = LastRun {
            published_through: at(40),
            at: at(100),
        };
        assert_eq!(outage.lost_since(Duration::from_secs(30)), Some(at(40)));
        let mut progress = PublishProgress::new(1, Duration::from_secs(300), Some(at(40)), at(101));
        progress.cut(0, at(102));
        assert_eq!(progress.through(at(103)), at(40));
        assert_eq!(progress.through(at(401)), at(102));
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(LastRun::load(&path), None);
    }
}
