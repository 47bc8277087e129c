//! How far this node's broadcast is complete: the instant through which everything its
//! shards learned has been acked by the brokers. Peers wait for it before they answer from
//! their maps (see [`super::watermarks`]), so it must never run ahead of what they can read.
//!
//! Every shard cuts what it learned every publish interval and sends the cut's messages, then
//! the cut itself, down one channel: a cut is complete once none of the messages sent before
//! it is still in flight. The node is complete through the oldest shard's newest complete cut.
//! A message lost for good (the backlog full, a delivery that refused for good) is a hole no
//! later cut fills. What it held was learned before the loss, so it speaks only of instants
//! before then; everything about later instants is in later messages. For `hold`, the longest
//! any flow may look back, the stream is then complete only for instants after the loss:
//! peers answer a flow whose lookup reaches back before it as incomplete, and go on naming
//! the others.
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
    /// After a loss: the latest loss, and until when it matters.
    hole: Option<(Timestamp, Timestamp)>,
    hold: Duration,
}

impl PublishProgress {
    /// `hole`: the stream starts with one (a loss, and until when it matters), as the
    /// previous run left it ([`LastRun::hole_at_start`]).
    pub fn new(shards: usize, hold: Duration, hole: Option<(Timestamp, Timestamp)>) -> Self {
        PublishProgress {
            next_sequence: 0,
            in_flight: BTreeSet::new(),
            cuts: VecDeque::new(),
            complete: vec![Timestamp::ZERO; shards.max(1)],
            hole,
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
    /// sent). For `hold`, the stream is complete only after now.
    pub fn lost(&mut self, sequence: Option<u64>, now: Timestamp) {
        self.hole = Some((now, now.saturating_add(self.hold)));
        if let Some(sequence) = sequence {
            self.delivered(sequence);
        }
    }

    /// Everything the shards learned before this instant is with the brokers (ZERO: not yet
    /// known).
    pub fn through(&self) -> Timestamp {
        self.complete
            .iter()
            .copied()
            .min()
            .unwrap_or(Timestamp::ZERO)
    }

    /// The latest loss (evidence this node learned before it may never reach the brokers) and
    /// until when it matters, while it does.
    pub fn hole(&self, now: Timestamp) -> Option<(Timestamp, Timestamp)> {
        self.hole.filter(|(_, until)| now < *until)
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
/// interval: how far it was with the brokers, when, and the hole a loss left in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastRun {
    pub published_through: Timestamp,
    pub at: Timestamp,
    pub hole: Option<(Timestamp, Timestamp)>,
}

impl LastRun {
    pub fn load(path: &std::path::Path) -> Option<LastRun> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut words = text
            .split_whitespace()
            .map(|word| word.parse().ok().map(Timestamp::from_nanos));
        let (published_through, at) = (words.next()??, words.next()??);
        let hole = match (words.next(), words.next()) {
            (Some(Some(loss)), Some(Some(until))) => Some((loss, until)),
            _ => None,
        };
        Some(LastRun {
            published_through,
            at,
            hole,
        })
    }

    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut text = format!(
            "{} {}",
            self.published_through.as_nanos(),
            self.at.as_nanos()
        );
        if let Some((loss, until)) = self.hole {
            text += &format!(" {} {}", loss.as_nanos(), until.as_nanos());
        }
        text.push('\n');
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
        (self.at.nanos_since(self.published_through) > replayed.as_nanos() as u64)
            .then_some(self.published_through)
    }

    /// The hole a run starting `now` begins with, if any: evidence the last run learned and
    /// may not have published (it mattered until `now + hold`), or a hole the last run still
    /// had.
    pub fn hole_at_start(
        last: Option<LastRun>,
        replayed: Duration,
        hold: Duration,
        now: Timestamp,
    ) -> Option<(Timestamp, Timestamp)> {
        let last = last?;
        let restart = last
            .lost_since(replayed)
            .map(|_| (now, now.saturating_add(hold)));
        let kept = last.hole.filter(|(_, until)| now < *until);
        match (restart, kept) {
            (Some((loss, until)), Some((_, kept_until))) => Some((loss, until.max(kept_until))),
            (restart, kept) => restart.or(kept),
        }
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
        let mut progress = PublishProgress::new(2, Duration::from_secs(100), None);
        let first = progress.sent();
        let second = progress.sent();
        progress.cut(0, at(10));
        progress.cut(1, at(10));
        assert_eq!(progress.through(), Timestamp::ZERO);
        progress.delivered(second);
        assert_eq!(
            progress.through(),
            Timestamp::ZERO,
            "the first is still in flight"
        );
        let third = progress.sent();
        progress.cut(0, at(11));
        progress.cut(1, at(11));
        progress.delivered(first);
        assert_eq!(
            progress.through(),
            at(10),
            "the cuts at 11 wait for the third"
        );
        progress.delivered(third);
        assert_eq!(progress.through(), at(11));
    }

    #[test]
    fn the_node_is_complete_only_as_far_as_its_slowest_shard() {
        let mut progress = PublishProgress::new(2, Duration::from_secs(100), None);
        progress.cut(0, at(5));
        assert_eq!(
            progress.through(),
            Timestamp::ZERO,
            "shard 1 has not cut yet"
        );
        progress.cut(1, at(3));
        progress.cut(0, at(6));
        assert_eq!(progress.through(), at(3));
    }

    #[test]
    fn a_lost_message_leaves_the_stream_complete_only_after_the_loss_for_the_hold() {
        let mut progress = PublishProgress::new(1, Duration::from_secs(100), None);
        progress.cut(0, at(10));
        assert_eq!(progress.hole(at(11)).map(|(loss, _)| loss), None);
        let lost = progress.sent();
        progress.lost(Some(lost), at(12));
        progress.cut(0, at(13));
        assert_eq!(
            progress.through(),
            at(13),
            "later cuts count: the lost message is no longer waited for"
        );
        assert_eq!(progress.hole(at(14)).map(|(loss, _)| loss), Some(at(12)));
        progress.lost(None, at(50));
        assert_eq!(
            progress.hole(at(149)).map(|(loss, _)| loss),
            Some(at(50)),
            "a second loss moves the hole on, and extends it"
        );
        assert_eq!(progress.hole(at(150)).map(|(loss, _)| loss), None);
    }

    #[test]
    fn a_restart_after_evidence_the_delay_buffer_no_longer_holds_starts_with_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("published-through");
        assert_eq!(LastRun::load(&path), None, "a first start");
        let hold = Duration::from_secs(300);
        assert_eq!(
            LastRun::hole_at_start(None, Duration::ZERO, hold, at(101)),
            None
        );
        let healthy = LastRun {
            published_through: at(99),
            at: at(100),
            hole: None,
        };
        healthy.save(&path).unwrap();
        assert_eq!(LastRun::load(&path), Some(healthy));
        assert_eq!(
            healthy.lost_since(Duration::from_secs(30)),
            None,
            "the replay learns the last second again"
        );
        assert_eq!(
            healthy.lost_since(Duration::ZERO),
            Some(at(99)),
            "memory storage replays nothing"
        );
        let outage = LastRun {
            published_through: at(40),
            at: at(100),
            hole: None,
        };
        let hole = LastRun::hole_at_start(Some(outage), Duration::from_secs(30), hold, at(101));
        assert_eq!(
            hole,
            Some((at(101), at(401))),
            "complete only for what this run learns"
        );
        let mut progress = PublishProgress::new(1, hold, hole);
        progress.cut(0, at(102));
        assert_eq!(progress.through(), at(102));
        assert_eq!(progress.hole(at(103)).map(|(loss, _)| loss), Some(at(101)));
        assert_eq!(progress.hole(at(401)).map(|(loss, _)| loss), None);

        // A hole the last run had outlives it.
        let holed = LastRun {
            hole: Some((at(90), at(390))),
            ..healthy
        };
        holed.save(&path).unwrap();
        assert_eq!(LastRun::load(&path), Some(holed));
        assert_eq!(
            LastRun::hole_at_start(Some(holed), Duration::from_secs(30), hold, at(101)),
            Some((at(90), at(390)))
        );
        assert_eq!(
            LastRun::hole_at_start(Some(holed), Duration::from_secs(30), hold, at(391)),
            None
        );
        assert_eq!(
            LastRun::hole_at_start(
                Some(LastRun {
                    hole: Some((at(90), at(500))),
                    ..outage
                }),
                Duration::from_secs(30),
                hold,
                at(101)
            ),
            Some((at(101), at(500)))
        );
        std::fs::write(&path, "garbage").unwrap();
        assert_eq!(LastRun::load(&path), None);
    }
}
