use flowattr_common::{Timestamp, WorkloadId};

/// Who holds a segment of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Workload(WorkloadId),
    /// Evidence says someone held the key, but its exporter could not name the workload (a
    /// container address the platform had not confirmed yet, or no longer). It makes a window
    /// that also holds a named owner ambiguous, as a second owner would: it may well be the
    /// previous or the next holder, whose last or first moments went unnamed.
    Unnamed,
    /// Two or more workloads have evidence for every instant of the segment. Which ones is not
    /// kept: no lookup answer depends on it, and contested is absorbing (more evidence can
    /// never make a contested instant single-owner again).
    Contested,
}

impl Holder {
    /// The holder of an instant with no evidence but `owner`'s (None: unnamed).
    pub(super) fn of(owner: Option<WorkloadId>) -> Holder {
        owner.map_or(Holder::Unnamed, Holder::Workload)
    }

    /// The holder of an instant that had `self` and gains evidence for `owner`. An unnamed
    /// claim on an instant a named owner holds is that owner's: one key has one holder at a
    /// time, so "someone" at an instant `w` held is `w`. (Evidence of one host agrees on
    /// time exactly; across hosts, within the clock bound: docs/attribution.md.)
    pub(super) fn with(self, owner: Option<WorkloadId>) -> Holder {
        match (self, owner) {
            (Holder::Unnamed, owner) => Holder::of(owner),
            (held, None) => held,
            (Holder::Workload(held), Some(owner)) if held == owner => self,
            _ => Holder::Contested,
        }
    }
}

/// A [`Holder`] in four bytes, so that a segment has room for its [`SourceId`] within 24.
/// Workload ids are numbered from 0 by the shard's interner and never come near the two
/// values kept for the other holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedHolder(u32);

impl PackedHolder {
    const CONTESTED: u32 = u32::MAX;
    const UNNAMED: u32 = u32::MAX - 1;

    fn pack(holder: Holder) -> PackedHolder {
        PackedHolder(match holder {
            Holder::Contested => Self::CONTESTED,
            Holder::Unnamed => Self::UNNAMED,
            Holder::Workload(id) => {
                assert!(id.get() < Self::UNNAMED, "workload ids run out at 2^32 - 2");
                id.get()
            }
        })
    }

    fn unpack(self) -> Holder {
        match self.0 {
            Self::CONTESTED => Holder::Contested,
            Self::UNNAMED => Holder::Unnamed,
            id => Holder::Workload(WorkloadId::new(id)),
        }
    }
}

/// Who reported the evidence that last shaped a segment: an index into the shard's
/// [`super::Sources`]. Attribution never reads it; the control plane shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceId(pub(super) u32);

impl SourceId {
    /// Evidence whose source is not kept (tests, benchmarks, past the sources' bound).
    pub const UNKNOWN: SourceId = SourceId(u32::MAX);
}

/// `holder` held the key for every instant in `[start, end)`, as `source` last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    pub start: Timestamp,
    /// Exclusive, so touching segments share a boundary: `[a, b)` and `[b, c)`.
    pub end: Timestamp,
    holder: PackedHolder,
    pub source: SourceId,
}

// The memory budget is 32 bytes per stored segment, arena headroom included.
const _: () = assert!(std::mem::size_of::<Segment>() == 24);

impl Segment {
    /// Filler for unused arena slots; never visible through a key's slice.
    pub(super) const UNUSED: Segment = Segment {
        start: Timestamp::ZERO,
        end: Timestamp::ZERO,
        holder: PackedHolder(PackedHolder::CONTESTED),
        source: SourceId::UNKNOWN,
    };

    pub fn new(start: Timestamp, end: Timestamp, holder: Holder, source: SourceId) -> Segment {
        Segment {
            start,
            end,
            holder: PackedHolder::pack(holder),
            source,
        }
    }

    pub fn holder(&self) -> Holder {
        self.holder.unpack()
    }
}

/// The number of `segments` (a key's, oldest first) for which `before` holds, `before` being
/// true for a prefix of them: what `partition_point` answers, found by stepping back from the
/// newest segment in doubling strides. Lookups and heartbeats are nearly always about the last
/// minutes of a key's hours of segments, so the answer is a few segments from the end, in the
/// lines the map prefetched; a binary search's first probes land mid-list, on lines no recent
/// lookup has touched.
pub(super) fn partition_from_newest(
    segments: &[Segment],
    before: impl Fn(&Segment) -> bool,
) -> usize {
    // Invariant: `before` is false for every segment at `not_before` and after.
    let mut not_before = segments.len();
    let mut stride = 1;
    while not_before > 0 {
        let probe = not_before.saturating_sub(stride);
        if before(&segments[probe]) {
            let rest = &segments[probe + 1..not_before];
            return probe + 1 + rest.partition_point(&before);
        }
        not_before = probe;
        stride *= 2;
    }
    0
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The same answer as a binary search, for every list and every instant.
        #[test]
        fn searching_from_the_newest_answers_as_partition_point(
            ends in proptest::collection::vec(0u64..1000, 0..80),
            at in 0u64..1100,
        ) {
            let mut ends = ends;
            ends.sort_unstable();
            let segments: Vec<Segment> = ends
                .iter()
                .map(|&end| {
                    Segment::new(
                        Timestamp::from_nanos(end),
                        Timestamp::from_nanos(end + 1),
                        Holder::Unnamed,
                        SourceId::UNKNOWN,
                    )
                })
                .collect();
            let at = Timestamp::from_nanos(at);
            for before in [
                &(|segment: &Segment| segment.end <= at) as &dyn Fn(&Segment) -> bool,
                &|segment: &Segment| segment.end < at,
                &|segment: &Segment| segment.start <= at,
            ] {
                prop_assert_eq!(
                    partition_from_newest(&segments, before),
                    segments.partition_point(before)
                );
            }
        }
    }
}
