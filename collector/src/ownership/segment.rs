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
