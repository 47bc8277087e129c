//! How far a reader of a whole topic has read, in time: "everything published before `t` has
//! been read". The reader asks the brokers for every partition's end (high watermark) at `t`,
//! and `t` is answered once its next offset to read has reached each of those ends, however
//! much was published after `t` meanwhile. Asking "is every partition read to its end right
//! now?" instead never answers while messages keep arriving somewhere faster than one fetch
//! round trip: with 16 partitions written every second, some partition is always a message
//! short, and a node would never confirm what it has read.

use std::collections::{BTreeMap, VecDeque};

use flowattr_common::Timestamp;

/// Per partition, an offset: the next to read, or an end.
pub(crate) type Offsets = BTreeMap<i32, i64>;

/// Questions asked and not yet answered beyond this are not asked: answering them takes as
/// long as answering the ones asked already, and newer ones are asked once there is room.
const PENDING_MAX: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct ReadProgress {
    /// The furthest end seen per partition: an end only moves on, unless the partition was
    /// deleted and made again.
    ends: Offsets,
    /// Unanswered questions, oldest first: when asked, and every partition's end then.
    pending: VecDeque<(Timestamp, Offsets)>,
}

impl ReadProgress {
    /// Records that at `at` the brokers said the partitions end at `ends` (every partition
    /// read). An error, with why, if a partition's end went back: the topic is no longer the
    /// one being read.
    pub(crate) fn asked(&mut self, at: Timestamp, ends: Offsets) -> Result<(), String> {
        for (&partition, &end) in &ends {
            let furthest = self.ends.entry(partition).or_insert(end);
            if end < *furthest {
                return Err(format!(
                    "partition {partition} ends at offset {end}, before the {furthest} it reached"
                ));
            }
            *furthest = end;
        }
        if self.pending.len() < PENDING_MAX {
            self.pending.push_back((at, ends));
        }
        Ok(())
    }

    /// The latest instant through which everything has now been read, given the next offset
    /// to read per partition, if one more question has been answered.
    pub(crate) fn answered(&mut self, next: &Offsets) -> Option<Timestamp> {
        let mut through = None;
        while let Some((at, ends)) = self.pending.front() {
            let read = ends
                .iter()
                .all(|(partition, end)| next.get(partition).is_some_and(|next| next >= end));
            if !read {
                break;
            }
            through = Some(*at);
            self.pending.pop_front();
        }
        through
    }

    /// The partitions whose next offset to read is short of the oldest unanswered question's
    /// end, as (partition, next, end).
    pub(crate) fn behind(&self, next: &Offsets) -> Vec<(i32, i64, i64)> {
        let Some((_, ends)) = self.pending.front() else {
            return Vec::new();
        };
        ends.iter()
            .filter_map(|(&partition, &end)| {
                let next = next.get(&partition).copied().unwrap_or(0);
                (next < end).then_some((partition, next, end))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(pairs: &[(i32, i64)]) -> Offsets {
        pairs.iter().copied().collect()
    }

    #[test]
    fn a_question_is_answered_once_every_partition_reached_its_end_then() {
        let mut progress = ReadProgress::default();
        let t = Timestamp::from_nanos;
        progress.asked(t(1), offsets(&[(0, 5), (1, 3)])).unwrap();
        // Messages keep arriving: by the next question partition 0 has grown.
        progress.asked(t(2), offsets(&[(0, 7), (1, 3)])).unwrap();
        assert_eq!(
            progress.answered(&offsets(&[(0, 5), (1, 2)])),
            None,
            "partition 1 is a message short"
        );
        assert_eq!(
            progress.behind(&offsets(&[(0, 5), (1, 2)])),
            vec![(1, 2, 3)]
        );
        // Read through the first question's ends, not yet the second's: the first is answered
        // although the topic was never read to its end at any one moment.
        assert_eq!(progress.answered(&offsets(&[(0, 6), (1, 3)])), Some(t(1)));
        assert_eq!(progress.answered(&offsets(&[(0, 6), (1, 3)])), None);
        progress.asked(t(3), offsets(&[(0, 8), (1, 3)])).unwrap();
        assert_eq!(
            progress.answered(&offsets(&[(0, 9), (1, 4)])),
            Some(t(3)),
            "the latest answered"
        );
        assert!(progress.behind(&offsets(&[(0, 9), (1, 4)])).is_empty());
    }

    #[test]
    fn an_end_that_goes_back_is_a_topic_made_again() {
        let mut progress = ReadProgress::default();
        progress
            .asked(Timestamp::from_nanos(1), offsets(&[(0, 5)]))
            .unwrap();
        let error = progress
            .asked(Timestamp::from_nanos(2), offsets(&[(0, 2)]))
            .unwrap_err();
        assert!(
            error.contains("partition 0 ends at offset 2, before the 5"),
            "{error}"
        );
    }

    #[test]
    fn questions_past_the_bound_are_not_kept_and_answers_go_on() {
        let mut progress = ReadProgress::default();
        for at in 0..(PENDING_MAX as u64 + 10) {
            progress
                .asked(Timestamp::from_nanos(at), offsets(&[(0, at as i64)]))
                .unwrap();
        }
        let last_kept = Timestamp::from_nanos(PENDING_MAX as u64 - 1);
        assert_eq!(progress.answered(&offsets(&[(0, 1000)])), Some(last_kept));
        progress
            .asked(Timestamp::from_nanos(500), offsets(&[(0, 1000)]))
            .unwrap();
        assert_eq!(
            progress.answered(&offsets(&[(0, 1000)])),
            Some(Timestamp::from_nanos(500))
        );
    }
}
