//! The brute-force reference the ownership map is tested against: evidence as explicit sets of
//! instants per owner on a small discrete time domain, and every rule of the module docs
//! evaluated instant by instant. Slow, obvious, and written from the rules, not from the map.

use std::collections::{BTreeMap, BTreeSet};

use flowattr_common::{CanonicalIp, WorkloadId};

use super::{Attribution, Heartbeat, Reason};

#[derive(Debug, Default)]
pub(super) struct ReferenceModel {
    /// key → owner (None: unnamed) → instants with evidence.
    evidence: BTreeMap<(CanonicalIp, u16), BTreeMap<Option<WorkloadId>, BTreeSet<u64>>>,
    shared: BTreeSet<CanonicalIp>,
    horizon: u64,
    pub slack: u64,
    pub merge_gap: u64,
    pub retention: u64,
    /// Bridge only gaps shorter than, and name an owner only from evidence nearer than, the
    /// shortest handover ever seen (`reuse_guard`).
    pub reuse_guard: bool,
    /// The fewest empty instants between one owner's last instant and another's first, on any
    /// key, in any state the evidence has been in.
    shortest_handover: Option<u64>,
}

impl ReferenceModel {
    pub fn new(slack: u64, merge_gap: u64, retention: u64) -> Self {
        ReferenceModel {
            slack,
            merge_gap,
            retention,
            reuse_guard: true,
            ..Default::default()
        }
    }

    pub fn insert(&mut self, heartbeat: &Heartbeat) {
        if heartbeat.port != 0 {
            self.shared.insert(heartbeat.ip);
        }
        let instants = self
            .evidence
            .entry((heartbeat.ip, heartbeat.port))
            .or_default()
            .entry(heartbeat.owner)
            .or_default();
        let start = heartbeat.start.as_nanos().max(self.horizon);
        instants.extend(start..=heartbeat.end.as_nanos());
        let key = (heartbeat.ip, heartbeat.port);
        let instants: Vec<u64> = self.instants_with_evidence(key).into_iter().collect();
        for pair in instants.windows(2) {
            let (before, after) = (self.owners_at(key, pair[0]), self.owners_at(key, pair[1]));
            if pair[1] > pair[0] + 1 && before.len() == 1 && after.len() == 1 && before != after {
                let gap = pair[1] - pair[0] - 1;
                self.shortest_handover = Some(
                    self.shortest_handover
                        .map_or(gap, |shortest| shortest.min(gap)),
                );
            }
        }
    }

    pub fn evict(&mut self, now: u64) {
        let cutoff = now.saturating_sub(self.retention);
        if cutoff <= self.horizon {
            return;
        }
        self.horizon = cutoff;
        for owners in self.evidence.values_mut() {
            for instants in owners.values_mut() {
                instants.retain(|&instant| instant >= cutoff);
            }
        }
    }

    /// The named owners with evidence at `instant`. Unnamed evidence is not an owner: at an
    /// instant a named owner holds, it is that owner's; alone, see [`Self::only_unnamed_at`].
    fn owners_at(&self, key: (CanonicalIp, u16), instant: u64) -> BTreeSet<WorkloadId> {
        self.evidence
            .get(&key)
            .map_or_else(BTreeSet::new, |owners| {
                owners
                    .iter()
                    .filter(|(_, instants)| instants.contains(&instant))
                    .filter_map(|(&owner, _)| owner)
                    .collect()
            })
    }

    /// The named owners with evidence at some instant of `[first, last]` of the key.
    pub fn owners_during(
        &self,
        key: (CanonicalIp, u16),
        first: u64,
        last: u64,
    ) -> BTreeSet<WorkloadId> {
        (first..=last)
            .flat_map(|instant| self.owners_at(key, instant))
            .collect()
    }

    /// Someone held the key at `instant`, and no evidence names who.
    fn only_unnamed_at(&self, key: (CanonicalIp, u16), instant: u64) -> bool {
        self.owners_at(key, instant).is_empty()
            && self
                .evidence
                .get(&key)
                .and_then(|owners| owners.get(&None))
                .is_some_and(|instants| instants.contains(&instant))
    }

    fn instants_with_evidence(&self, key: (CanonicalIp, u16)) -> BTreeSet<u64> {
        self.evidence
            .get(&key)
            .map_or_else(BTreeSet::new, |owners| {
                owners.values().flatten().copied().collect()
            })
    }

    pub fn attribute(&self, ip: CanonicalIp, port: u16, at: u64) -> Attribution {
        let key = if port != 0 && self.shared.contains(&ip) {
            (ip, port)
        } else {
            (ip, 0)
        };
        let below_handover = |configured: u64| match self.shortest_handover {
            Some(shortest) if self.reuse_guard => configured.min(shortest.saturating_sub(1)),
            _ => configured,
        };
        let (window_start, window_end) =
            (at.saturating_sub(self.slack), at.saturating_add(self.slack));
        let reach = below_handover(self.slack);
        if window_start < self.horizon {
            return Attribution::Unattributed(Reason::Expired);
        }
        let mut seen = BTreeSet::new();
        let mut unnamed = false;
        for instant in window_start..=window_end {
            let owners = self.owners_at(key, instant);
            if owners.len() >= 2 {
                return Attribution::Unattributed(Reason::Conflict);
            }
            unnamed |= self.only_unnamed_at(key, instant);
            seen.extend(owners);
        }
        match seen.len() {
            0 if unnamed => return Attribution::Unattributed(Reason::Unnamed),
            0 => {}
            _ if unnamed => return Attribution::Unattributed(Reason::Ambiguous),
            1 if (at.saturating_sub(reach)..=at.saturating_add(reach))
                .any(|instant| !self.owners_at(key, instant).is_empty()) =>
            {
                return Attribution::Owner(*seen.first().unwrap());
            }
            1 => return Attribution::Unattributed(Reason::NoEvidence),
            _ => return Attribution::Unattributed(Reason::Ambiguous),
        }
        let instants = self.instants_with_evidence(key);
        let before = instants.range(..window_start).next_back();
        let after = instants.range(window_end + 1..).next();
        if let (Some(&before), Some(&after)) = (before, after) {
            let (owners_before, owners_after) =
                (self.owners_at(key, before), self.owners_at(key, after));
            let empty_instants = after - before - 1;
            if owners_before.len() == 1
                && owners_before == owners_after
                && empty_instants <= below_handover(self.merge_gap)
            {
                return Attribution::Owner(*owners_before.first().unwrap());
            }
        }
        Attribution::Unattributed(Reason::NoEvidence)
    }
}
