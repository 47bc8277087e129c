//! Retried batches: which records of a batch part a shard has stored already.

use std::collections::hash_map::Entry;
use std::sync::Arc;

use flowattr_common::Timestamp;
use rustc_hash::FxHashMap;

use crate::delay::codec::BlockHeader;

/// Remembers, for `ingest.dedup_window`, the batches this shard stored part of, to recognise
/// retries. A batch is named by its sender, exporter, sequence and frame checksum: a retry
/// resends the same frame, so another batch under the same numbers (a sequence reused after
/// the exporter lost its state, or a client sending under another's id without TLS) is never
/// taken for a retry of the first. Within a retry only records are new that the evidence gate
/// refused on every earlier arrival (one refused as from the future is admitted once the clock
/// has caught up); they are stored, the rest are duplicates.
#[derive(Default)]
pub struct DuplicateFilter {
    seen: FxHashMap<BatchKey, Seen>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct BatchKey {
    sender: u64,
    exporter: u64,
    sequence: u64,
    frame_checksum: u32,
}

struct Seen {
    at: Timestamp,
    /// Refused on every arrival so far (ascending); None: nothing.
    refused: Option<Arc<[u32]>>,
}

/// Which records of a batch part are new to the shard.
#[derive(Debug, PartialEq, Eq)]
pub enum NewRecords {
    /// The batch was not seen: all of them.
    All,
    /// A retry: those at these indices (refused on every earlier arrival).
    Only(Arc<[u32]>),
    /// A retry with nothing left to admit.
    None,
}

impl NewRecords {
    /// Whether the record at `index` of the batch is new.
    pub fn includes(&self, index: u32) -> bool {
        match self {
            NewRecords::All => true,
            NewRecords::Only(indices) => indices.binary_search(&index).is_ok(),
            NewRecords::None => false,
        }
    }
}

impl DuplicateFilter {
    /// Remembers the batch `header` names and says which of its records are new.
    pub fn admit(&mut self, header: &BlockHeader, now: Timestamp) -> NewRecords {
        match self.seen.entry(BatchKey::of(header)) {
            Entry::Vacant(vacant) => {
                vacant.insert(Seen {
                    at: now,
                    refused: header.refused.clone(),
                });
                NewRecords::All
            }
            Entry::Occupied(mut occupied) => {
                let seen = occupied.get_mut();
                seen.at = now;
                let Some(earlier) = seen.refused.take() else {
                    return NewRecords::None;
                };
                seen.refused = still_refused(&earlier, header.refused.as_deref());
                NewRecords::Only(earlier)
            }
        }
    }

    /// Remembers a batch found on disk at start-up: what every block of it says was refused.
    pub fn remember(&mut self, header: &BlockHeader, now: Timestamp) {
        match self.seen.entry(BatchKey::of(header)) {
            Entry::Vacant(vacant) => {
                vacant.insert(Seen {
                    at: now,
                    refused: header.refused.clone(),
                });
            }
            Entry::Occupied(mut occupied) => {
                let seen = occupied.get_mut();
                seen.refused = seen
                    .refused
                    .take()
                    .and_then(|earlier| still_refused(&earlier, header.refused.as_deref()));
            }
        }
    }

    pub fn forget_before(&mut self, horizon: Timestamp) {
        self.seen.retain(|_, seen| seen.at >= horizon);
    }
}

impl BatchKey {
    fn of(header: &BlockHeader) -> BatchKey {
        BatchKey {
            sender: header.sender,
            exporter: header.exporter,
            sequence: header.sequence,
            frame_checksum: header.frame_checksum,
        }
    }
}

/// The indices in both ascending lists; None if none.
fn still_refused(earlier: &[u32], now: Option<&[u32]>) -> Option<Arc<[u32]>> {
    let now = now?;
    let both: Arc<[u32]> = earlier
        .iter()
        .copied()
        .filter(|index| now.binary_search(index).is_ok())
        .collect();
    (!both.is_empty()).then_some(both)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(sequence: u64, frame_checksum: u32, refused: &[u32]) -> BlockHeader {
        BlockHeader {
            frame_checksum,
            refused: (!refused.is_empty()).then(|| refused.into()),
            ..BlockHeader::of_exporter(7, sequence, Timestamp::from_nanos(1))
        }
    }

    #[test]
    fn a_retry_brings_only_what_every_earlier_try_had_refused() {
        let mut filter = DuplicateFilter::default();
        let now = Timestamp::from_nanos(10);
        assert_eq!(
            filter.admit(&header(1, 0xaa, &[2, 5, 9]), now),
            NewRecords::All
        );
        // The retry has 5 admitted, 2 and 9 still refused: of its records, 2, 5 and 9 are new.
        assert_eq!(
            filter.admit(&header(1, 0xaa, &[2, 9]), now),
            NewRecords::Only(Arc::from([2, 5, 9]))
        );
        assert_eq!(
            filter.admit(&header(1, 0xaa, &[]), now),
            NewRecords::Only(Arc::from([2, 9]))
        );
        assert_eq!(filter.admit(&header(1, 0xaa, &[]), now), NewRecords::None);
    }

    #[test]
    fn another_frame_or_sender_under_the_same_numbers_is_another_batch() {
        let mut filter = DuplicateFilter::default();
        let now = Timestamp::from_nanos(10);
        assert_eq!(filter.admit(&header(1, 0xaa, &[]), now), NewRecords::All);
        assert_eq!(filter.admit(&header(1, 0xbb, &[]), now), NewRecords::All);
        let relayed = BlockHeader {
            sender: 99,
            ..header(1, 0xaa, &[])
        };
        assert_eq!(filter.admit(&relayed, now), NewRecords::All);
        assert_eq!(filter.admit(&header(1, 0xaa, &[]), now), NewRecords::None);
    }

    #[test]
    fn a_restart_remembers_what_every_block_of_a_batch_says_was_refused_in_any_order() {
        for order in [[0, 1], [1, 0]] {
            let blocks = [header(3, 0xcc, &[4, 6]), header(3, 0xcc, &[6])];
            let mut filter = DuplicateFilter::default();
            for at in order {
                filter.remember(&blocks[at], Timestamp::from_nanos(5));
            }
            assert_eq!(
                filter.admit(&header(3, 0xcc, &[]), Timestamp::from_nanos(6)),
                NewRecords::Only(Arc::from([6]))
            );
        }
    }

    #[test]
    fn batches_are_forgotten_after_the_window() {
        let mut filter = DuplicateFilter::default();
        assert_eq!(
            filter.admit(&header(1, 0xaa, &[]), Timestamp::from_nanos(10)),
            NewRecords::All
        );
        filter.forget_before(Timestamp::from_nanos(11));
        assert_eq!(
            filter.admit(&header(1, 0xaa, &[]), Timestamp::from_nanos(12)),
            NewRecords::All
        );
    }
}
