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

/// `holder` held the key for every instant in `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    pub start: Timestamp,
    /// Exclusive, so touching segments share a boundary: `[a, b)` and `[b, c)`.
    pub end: Timestamp,
    pub holder: Holder,
}

// The memory budget is 32 bytes per stored segment.
const _: () = assert!(std::mem::size_of::<Segment>() <= 32);

impl Segment {
    /// Filler for unused arena slots; never visible through a key's slice.
    pub(super) const UNUSED: Segment = Segment {
        start: Timestamp::ZERO,
        end: Timestamp::ZERO,
        holder: Holder::Contested,
    };
}
