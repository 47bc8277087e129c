//! Whose evidence is all in the map: the region's peers' streams, as their watermarks say
//! (see `crate::broadcast`'s watermarks). An answer is given only when every piece of evidence
//! it can depend on is covered.

use flowattr_common::Timestamp;

/// Evidence about every instant after `after`, up to `through`, is all in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completeness {
    pub after: Timestamp,
    pub through: Timestamp,
}

impl Completeness {
    /// No peer to wait for.
    pub const EVERYTHING: Completeness = Completeness {
        after: Timestamp::ZERO,
        through: Timestamp::MAX,
    };

    /// Whether all evidence about instants from `floor` to `horizon` is in.
    pub fn covers(&self, floor: Timestamp, horizon: Timestamp) -> bool {
        floor > self.after && horizon <= self.through
    }
}
