use flowattr_common::{Timestamp, WorkloadId};

/// Who holds a segment of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Workload(WorkloadId),
    /// Two or more workloads have evidence for every instant of the segment. Which ones is not
    /// kept: no lookup answer depends on it, and contested is absorbing (more evidence can
    /// never make a contested instant single-owner again).
    Contested,
}

impl Holder {
    /// The holder of an instant that had `self` and gains evidence for `owner`.
    pub(super) fn with(self, owner: WorkloadId) -> Holder {
        match self {
            Holder::Workload(held) if held == owner => self,
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
