//! Who claimed the instants of a contested segment. The segment itself keeps only "contested"
//! (no answer depends on who), so the console's "which owners conflicted, and who reported
//! them" lives here, beside the map, off the lookup path: a healthy fleet has no conflicts, and
//! a hostile or broken one is bounded by [`CLAIMS_MAX`].

use flowattr_common::{Timestamp, WorkloadId};
use rustc_hash::FxHashMap;

use super::SourceId;
use super::table::OwnershipKey;

/// Claims kept per shard (24 bytes each); past it, new ones are dropped and the keys they were
/// about say their claimants are not all known.
const CLAIMS_MAX: usize = 1 << 16;

/// `owner` had evidence for `[start, end)`, instants also claimed by another owner, as `source`
/// last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub start: Timestamp,
    pub end: Timestamp,
    pub owner: WorkloadId,
    pub source: SourceId,
}

/// The owners that claimed a contested segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimants {
    /// Each owner once, with the source of its latest claim.
    pub owners: Vec<(WorkloadId, SourceId)>,
    /// False when claims about the key were dropped past [`CLAIMS_MAX`].
    pub complete: bool,
}

#[derive(Debug, Default)]
struct KeyClaims {
    claims: Vec<Claim>,
    dropped: bool,
}

#[derive(Debug, Default)]
pub struct ConflictClaims {
    keys: FxHashMap<OwnershipKey, KeyClaims>,
    count: usize,
}

impl ConflictClaims {
    /// Records `claim`: joined to an earlier claim of its owner it overlaps or touches (the
    /// two lie in one contested run, so one segment), else kept apart.
    pub fn add(&mut self, key: OwnershipKey, claim: Claim) {
        let full = self.count >= CLAIMS_MAX;
        let key_claims = self.keys.entry(key).or_default();
        if let Some(same) = key_claims.claims.iter_mut().find(|kept| {
            kept.owner == claim.owner && kept.start <= claim.end && claim.start <= kept.end
        }) {
            same.start = same.start.min(claim.start);
            same.end = same.end.max(claim.end);
            same.source = claim.source;
            return;
        }
        if full {
            key_claims.dropped = true;
            return;
        }
        key_claims.claims.push(claim);
        self.count += 1;
    }

    /// The owners that claimed instants of `[start, end)` of `key`.
    pub fn of(&self, key: &OwnershipKey, start: Timestamp, end: Timestamp) -> Claimants {
        let Some(key_claims) = self.keys.get(key) else {
            return Claimants {
                owners: Vec::new(),
                complete: true,
            };
        };
        let mut owners: Vec<(WorkloadId, SourceId)> = Vec::new();
        for claim in &key_claims.claims {
            if claim.start >= end || claim.end <= start {
                continue;
            }
            match owners.iter_mut().find(|(owner, _)| *owner == claim.owner) {
                // Claims are kept in the order they came: the later one's source is newer.
                Some(seen) => seen.1 = claim.source,
                None => owners.push((claim.owner, claim.source)),
            }
        }
        owners.sort_by_key(|(owner, _)| *owner);
        Claimants {
            owners,
            complete: !key_claims.dropped,
        }
    }

    /// Forgets claims about instants before `cutoff`, as the map forgets their segments.
    pub fn forget_before(&mut self, cutoff: Timestamp) {
        let count = &mut self.count;
        self.keys.retain(|_, key_claims| {
            let before = key_claims.claims.len();
            key_claims.claims.retain_mut(|claim| {
                claim.start = claim.start.max(cutoff);
                claim.end > cutoff
            });
            *count -= before - key_claims.claims.len();
            !key_claims.claims.is_empty()
        });
    }

    /// About the memory held: the claims, and a table entry per key with any.
    pub fn bytes(&self) -> usize {
        self.count * std::mem::size_of::<Claim>()
            + self.keys.capacity() * (std::mem::size_of::<(OwnershipKey, KeyClaims)>() + 1)
    }
}
