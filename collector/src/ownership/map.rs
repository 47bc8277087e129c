use flowattr_common::{CanonicalIp, Timestamp, WorkloadId, duration_nanos};
use rustc_hash::{FxHashMap, FxHashSet};

use super::arena::{Block, SegmentArena};
use super::claims::{Claim, Claimants, ConflictClaims};
use super::reuse::{ReuseGuard, ReuseStatus};
use super::segment::{Holder, Segment, SourceId, partition_from_newest};
use super::table::{KeyTable, OwnershipKey};
use super::{
    Attribution, Heartbeat, HeartbeatError, OwnershipConfig, Reason, SEGMENTS_PER_KEY_LIMIT,
};

/// The two stages of [`OwnershipMap::prefetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    Slot,
    Segments,
}

/// What [`OwnershipMap::insert`] did with a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Stored,
    /// The heartbeat lies wholly before the retention horizon: nothing to store.
    Expired,
    /// Stored, and the key went over `segments_per_key_max` and forgot its oldest segments.
    StoredForgettingOldest,
}

/// Memory held by the map, from capacities (what is reserved, not only what is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    pub keys: usize,
    pub segments: usize,
    /// The hash table: the per-key cost.
    pub table_bytes: usize,
    /// The segment arena with its free blocks and growth headroom: the per-segment cost.
    pub arena_bytes: usize,
    /// Who claimed contested segments: nothing in a healthy fleet, bounded otherwise.
    pub claim_bytes: usize,
}

impl MemoryUsage {
    pub fn bytes(&self) -> usize {
        self.table_bytes + self.arena_bytes + self.claim_bytes
    }
}

/// The ownership time ranges of every key one shard is responsible for. See the module docs
/// for the rules; `tests.rs` checks them against a brute-force model.
#[derive(Debug)]
pub struct OwnershipMap {
    slack_ns: u64,
    /// Handovers seen, and the longest gap lookups may bridge given them.
    reuse: ReuseGuard,
    config: OwnershipConfig,
    keys: KeyTable,
    arena: SegmentArena,
    /// IPs owned per port. A lookup of one of these uses its (IP, port) key.
    shared_ips: FxHashSet<CanonicalIp>,
    /// Everything before this instant is forgotten; lookups reaching before it are `Expired`.
    horizon: Timestamp,
    /// Keys that overflowed `segments_per_key_max` and forgot further than `horizon`.
    key_horizons: FxHashMap<OwnershipKey, Timestamp>,
    /// Who claimed the contested segments' instants (for the console; no lookup reads it).
    claims: ConflictClaims,
    /// Reused by every insert so the hot path does not allocate.
    scratch: Vec<Segment>,
    new_claims: Vec<Claim>,
}

impl OwnershipMap {
    pub fn new(config: OwnershipConfig) -> Self {
        let segments_per_key_max = config.segments_per_key_max.clamp(1, SEGMENTS_PER_KEY_LIMIT);
        OwnershipMap {
            slack_ns: duration_nanos(config.slack),
            reuse: ReuseGuard::new(config.merge_gap, config.slack, config.reuse_guard),
            config: OwnershipConfig {
                segments_per_key_max,
                ..config
            },
            keys: KeyTable::default(),
            arena: SegmentArena::default(),
            shared_ips: FxHashSet::default(),
            horizon: Timestamp::ZERO,
            key_horizons: FxHashMap::default(),
            claims: ConflictClaims::default(),
            scratch: Vec::with_capacity(2 * SEGMENTS_PER_KEY_LIMIT + 3),
            new_claims: Vec::new(),
        }
    }

    pub fn config(&self) -> &OwnershipConfig {
        &self.config
    }

    /// Adds one heartbeat's evidence. A heartbeat with a port marks its IP as shared.
    pub fn insert(&mut self, heartbeat: Heartbeat) -> Result<InsertOutcome, HeartbeatError> {
        let Heartbeat {
            ip,
            port,
            owner,
            start,
            end,
            source,
        } = heartbeat;
        if end < start {
            return Err(HeartbeatError::EndBeforeStart { start, end });
        }
        if port != 0 {
            self.shared_ips.insert(ip);
        }
        let key = OwnershipKey { ip, port };
        let start = start.max(self.horizon_of(&key));
        // Closed [start, end] to half-open [start, end + 1).
        let end = Timestamp::from_nanos(end.as_nanos().saturating_add(1));
        if end <= start {
            return Ok(InsertOutcome::Expired);
        }
        // One probe of the table: the slot is found (or the vacancy for the key located) once,
        // read, and written back through the same index.
        let slot = self.keys.find(&key);
        let block = slot.ok().map(|index| self.keys.block(index));
        if let Some(block) = block
            && extend_newest(&mut self.arena, block, start, end, owner, source)
        {
            return Ok(InsertOutcome::Stored);
        }
        self.scratch.clear();
        let current = block.map_or(&[][..], |block| self.arena.get(block));
        merge_evidence(
            current,
            (start, end),
            (owner, source),
            &mut self.scratch,
            &mut self.new_claims,
        );
        for claim in self.new_claims.drain(..) {
            self.claims.add(key, claim);
        }
        let outcome = forget_oldest_past_bound(
            &mut self.scratch,
            &mut self.key_horizons,
            self.config.segments_per_key_max,
            key,
        );
        self.reuse.observe(current, &self.scratch, start, end);
        let stored = self
            .arena
            .store(block, &self.scratch)
            .expect("a merge never empties a key");
        match slot {
            Ok(index) => self.keys.set_block(index, stored),
            Err(vacancy) => self.keys.insert_at(vacancy, key, stored),
        }
        Ok(outcome)
    }

    /// Marks `ip` as shared: from now on it is looked up per (IP, port).
    pub fn mark_shared(&mut self, ip: CanonicalIp) {
        self.shared_ips.insert(ip);
    }

    /// Who owned `ip` (the `port` matters only if the IP is shared) at `at`.
    pub fn attribute(&self, ip: CanonicalIp, port: u16, at: Timestamp) -> Attribution {
        let key = self.lookup_key(ip, port);
        let window = |half_width: u64| {
            (
                Timestamp::from_nanos(at.as_nanos().saturating_sub(half_width)),
                Timestamp::from_nanos(at.as_nanos().saturating_add(half_width).saturating_add(1)),
            )
        };
        let (window_start, window_end) = window(self.slack_ns);
        if window_start < self.horizon_of(&key) {
            return Attribution::Unattributed(Reason::Expired);
        }
        match self.keys.get(&key) {
            Some(block) => attribute_in(
                self.arena.get(block),
                (window_start, window_end),
                window(self.reuse.owner_reach_ns(self.slack_ns)),
                self.reuse.bridged_gap_ns(),
            ),
            None => Attribution::Unattributed(Reason::NoEvidence),
        }
    }

    /// The earliest and the latest instant whose evidence [`Self::attribute`] at `at` can
    /// depend on: the ends of its window, or of a gap it may bridge. An answer is final once
    /// all evidence between them is in.
    pub fn evidence_span(&self, at: Timestamp) -> (Timestamp, Timestamp) {
        let reach = self
            .slack_ns
            .saturating_add(self.reuse.bridged_gap_ns())
            .max(self.reuse.owner_reach_ns(self.slack_ns))
            .saturating_add(1);
        (
            Timestamp::from_nanos(at.as_nanos().saturating_sub(reach)),
            Timestamp::from_nanos(at.as_nanos().saturating_add(reach)),
        )
    }

    /// Prepares a coming [`Self::attribute`] of `(ip, port)`, or [`Self::insert`] of a heartbeat
    /// about it, in two stages issued a few items apart: [`Prefetch::Slot`] starts loading the
    /// key's table slot; [`Prefetch::Segments`], once that slot is in cache, reads it and starts
    /// loading the key's segments. On a map much larger than the CPU's caches both are DRAM
    /// misses; a caller working through a batch that prefetches ahead of the item it handles
    /// keeps several in flight at once instead of paying them one after the other.
    pub fn prefetch(&self, ip: CanonicalIp, port: u16, stage: Prefetch) {
        let key = self.lookup_key(ip, port);
        match stage {
            Prefetch::Slot => self.keys.prefetch(&key),
            Prefetch::Segments => {
                if let Some(block) = self.keys.get(&key) {
                    self.arena.prefetch(block);
                }
            }
        }
    }

    /// The stored segments of the key `(ip, port)` resolves to, oldest first.
    pub fn segments(&self, ip: CanonicalIp, port: u16) -> &[Segment] {
        let key = self.lookup_key(ip, port);
        self.keys
            .get(&key)
            .map_or(&[], |block| self.arena.get(block))
    }

    /// The owners that claimed instants of `segment`, one of `(ip, port)`'s contested ones.
    pub fn claimants(&self, ip: CanonicalIp, port: u16, segment: &Segment) -> Claimants {
        self.claims
            .of(&self.lookup_key(ip, port), segment.start, segment.end)
    }

    fn lookup_key(&self, ip: CanonicalIp, port: u16) -> OwnershipKey {
        let shared = port != 0 && !self.shared_ips.is_empty() && self.shared_ips.contains(&ip);
        OwnershipKey {
            ip,
            port: if shared { port } else { 0 },
        }
    }

    fn horizon_of(&self, key: &OwnershipKey) -> Timestamp {
        if self.key_horizons.is_empty() {
            return self.horizon;
        }
        self.key_horizons
            .get(key)
            .map_or(self.horizon, |&key_horizon| key_horizon.max(self.horizon))
    }

    /// What the map has seen of the platform's IP reuse (see [`ReuseGuard`]).
    pub fn reuse(&self) -> ReuseStatus {
        self.reuse.status()
    }

    /// A handover another shard's map saw: the platform reuses IPs alike for every key.
    pub fn heard_of_handover(&mut self, gap: std::time::Duration) {
        self.reuse.heard_of_handover(duration_nanos(gap));
    }

    /// The instant before which everything is forgotten.
    pub fn horizon(&self) -> Timestamp {
        self.horizon
    }

    /// Periodic upkeep: forgets evidence that ended before `now - retention`, then compacts the
    /// arena if free blocks have piled up. Returns the segments dropped.
    pub fn evict(&mut self, now: Timestamp) -> usize {
        let dropped = self.forget_before(now.saturating_sub(self.config.retention));
        if self.arena.is_fragmented() {
            self.arena.compact(self.keys.blocks_mut());
        }
        dropped
    }

    fn forget_before(&mut self, cutoff: Timestamp) -> usize {
        if cutoff <= self.horizon {
            return 0;
        }
        self.horizon = cutoff;
        self.key_horizons
            .retain(|_, key_horizon| *key_horizon > cutoff);
        self.claims.forget_before(cutoff);
        let (arena, scratch) = (&mut self.arena, &mut self.scratch);
        let mut dropped = 0;
        self.keys.retain(|_, block| {
            let segments = arena.get(*block);
            let dead = segments.partition_point(|segment| segment.end <= cutoff);
            if dead == 0 && segments[0].start >= cutoff {
                return true;
            }
            dropped += dead;
            scratch.clear();
            scratch.extend_from_slice(&segments[dead..]);
            // A segment that straddles the horizon keeps only its part after it, so the state
            // stays exactly "all evidence from the horizon on" whatever order things happen in.
            if let Some(first) = scratch.first_mut() {
                first.start = first.start.max(cutoff);
            }
            match arena.store(Some(*block), scratch) {
                Some(stored) => {
                    *block = stored;
                    true
                }
                None => false,
            }
        });
        dropped
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            keys: self.keys.len(),
            segments: self.keys.iter().map(|(_, block)| block.len()).sum(),
            table_bytes: self.keys.allocation_size(),
            arena_bytes: self.arena.capacity_bytes(),
            claim_bytes: self.claims.bytes(),
        }
    }

    /// Arena slots sitting in free lists (reusable, not returned to the allocator).
    pub fn free_segment_slots(&self) -> usize {
        self.arena.free_slots()
    }
}

/// The fast path: a heartbeat of the newest segment's own holder that starts inside or at the
/// end of it (an ongoing connection reporting again) only moves that segment's end.
fn extend_newest(
    arena: &mut SegmentArena,
    block: Block,
    start: Timestamp,
    end: Timestamp,
    owner: Option<WorkloadId>,
    source: SourceId,
) -> bool {
    let Some(newest) = arena.last_mut(block) else {
        return false;
    };
    if newest.holder() != Holder::of(owner) || start < newest.start || start > newest.end {
        return false;
    }
    newest.end = newest.end.max(end);
    newest.source = source;
    true
}

/// Drops the oldest of `merged` past `segments_per_key_max`, remembering how far `key` forgot.
fn forget_oldest_past_bound(
    merged: &mut Vec<Segment>,
    key_horizons: &mut FxHashMap<OwnershipKey, Timestamp>,
    segments_per_key_max: usize,
    key: OwnershipKey,
) -> InsertOutcome {
    let excess = merged.len().saturating_sub(segments_per_key_max);
    if excess == 0 {
        return InsertOutcome::Stored;
    }
    // The gap after the last forgotten segment holds no evidence, so forgetting up to its end
    // leaves exactly "all evidence from the key horizon on".
    let key_horizon = merged[excess - 1].end;
    merged.drain(..excess);
    let entry = key_horizons.entry(key).or_insert(key_horizon);
    *entry = (*entry).max(key_horizon);
    InsertOutcome::StoredForgettingOldest
}

/// Writes to `out` the canonical segments of `current` after `owner` gains evidence for
/// `[start, end)`. Every instant keeps its holder outside the span; inside, each instant's
/// holder joins `owner` ([`Holder::with`]). Every owner's claim on an instant that is
/// contested after the merge goes to `claims`.
fn merge_evidence(
    current: &[Segment],
    (start, end): (Timestamp, Timestamp),
    (owner, source): (Option<WorkloadId>, SourceId),
    out: &mut Vec<Segment>,
    claims: &mut Vec<Claim>,
) {
    debug_assert!(start < end);
    let piece = |start, end, holder, source| Segment::new(start, end, holder, source);
    // Touching segments (end == start, start == end) join the merge so equal holders coalesce.
    let first = partition_from_newest(current, |segment| segment.end < start);
    let after = partition_from_newest(current, |segment| segment.start <= end);
    for &segment in &current[..first] {
        push_coalescing(out, segment);
    }
    let mut cursor = start;
    for segment in &current[first..after] {
        if segment.start < start {
            push_coalescing(
                out,
                piece(segment.start, start, segment.holder(), segment.source),
            );
        }
        let overlap_start = segment.start.max(start);
        if cursor < overlap_start {
            push_coalescing(out, piece(cursor, overlap_start, Holder::of(owner), source));
        }
        let overlap_end = segment.end.min(end);
        if overlap_start < overlap_end {
            // The newest evidence for these instants is this heartbeat's.
            let holder = segment.holder().with(owner);
            if let (Holder::Contested, Some(owner)) = (holder, owner) {
                let claim = |owner, source| Claim {
                    start: overlap_start,
                    end: overlap_end,
                    owner,
                    source,
                };
                if let Holder::Workload(held) = segment.holder() {
                    claims.push(claim(held, segment.source));
                }
                claims.push(claim(owner, source));
            }
            push_coalescing(out, piece(overlap_start, overlap_end, holder, source));
        }
        if segment.end > end {
            let rest = piece(
                segment.start.max(end),
                segment.end,
                segment.holder(),
                segment.source,
            );
            push_coalescing(out, rest);
        }
        cursor = cursor.max(overlap_end);
    }
    if cursor < end {
        push_coalescing(out, piece(cursor, end, Holder::of(owner), source));
    }
    for &segment in &current[after..] {
        push_coalescing(out, segment);
    }
}

/// Appends `segment`, joined to the last one if it touches it with the same holder (the
/// joined segment keeps the later piece's source: pieces come in time order).
fn push_coalescing(out: &mut Vec<Segment>, segment: Segment) {
    debug_assert!(segment.start < segment.end);
    if let Some(last) = out.last_mut() {
        debug_assert!(last.end <= segment.start, "segments are pushed in order");
        if last.holder() == segment.holder() && last.end == segment.start {
            last.end = segment.end;
            last.source = segment.source;
            return;
        }
    }
    out.push(segment);
}

/// The answer for the window `[window_start, window_end)` over one key's segments; an owner
/// is named only if it also has evidence in `near`, a window inside it.
fn attribute_in(
    segments: &[Segment],
    (window_start, window_end): (Timestamp, Timestamp),
    near: (Timestamp, Timestamp),
    merge_gap_ns: u64,
) -> Attribution {
    let first = partition_from_newest(segments, |segment| segment.end <= window_start);
    let mut owner = None;
    let mut several_owners = false;
    let mut unnamed = false;
    let mut evidence_near = false;
    for segment in segments[first..]
        .iter()
        .take_while(|segment| segment.start < window_end)
    {
        match segment.holder() {
            Holder::Contested => return Attribution::Unattributed(Reason::Conflict),
            Holder::Unnamed => {
                unnamed = true;
                continue;
            }
            Holder::Workload(workload) => match owner {
                None => owner = Some(workload),
                Some(seen) if seen != workload => several_owners = true,
                Some(_) => {}
            },
        }
        evidence_near |= segment.start < near.1 && segment.end > near.0;
    }
    if several_owners || (unnamed && owner.is_some()) {
        return Attribution::Unattributed(Reason::Ambiguous);
    }
    if unnamed {
        return Attribution::Unattributed(Reason::Unnamed);
    }
    if let Some(workload) = owner {
        return if evidence_near {
            Attribution::Owner(workload)
        } else {
            Attribution::Unattributed(Reason::NoEvidence)
        };
    }
    // Nothing in the window: bridge it only if the evidence right before and right after is
    // one owner's, and the gap between them is short.
    if let (Some(before), Some(after)) = (
        first.checked_sub(1).map(|i| segments[i]),
        segments.get(first),
    ) && let (Holder::Workload(a), Holder::Workload(b)) = (before.holder(), after.holder())
        && a == b
        && after.start.nanos_since(before.end) <= merge_gap_ns
    {
        return Attribution::Owner(a);
    }
    Attribution::Unattributed(Reason::NoEvidence)
}

#[cfg(test)]
impl OwnershipMap {
    /// Compacts whatever the fragmentation, so property tests reach compaction on tiny maps.
    pub(super) fn compact_now(&mut self) {
        self.arena.compact(self.keys.blocks_mut());
    }

    /// The claimants of `segment` of exactly the key `(ip, port)`.
    pub(super) fn claimants_of_key(
        &self,
        (ip, port): (CanonicalIp, u16),
        segment: &Segment,
    ) -> Claimants {
        self.claims
            .of(&OwnershipKey { ip, port }, segment.start, segment.end)
    }

    /// Every key's segments, for comparing two maps' states.
    pub(super) fn snapshot(&self) -> std::collections::BTreeMap<(CanonicalIp, u16), Vec<Segment>> {
        self.keys
            .iter()
            .map(|(key, block)| ((key.ip, key.port), self.arena.get(block).to_vec()))
            .collect()
    }

    /// Panics if any stored state breaks the invariants.
    pub(super) fn check_invariants(&self) {
        self.keys.check_invariants();
        for (key, block) in self.keys.iter() {
            let segments = self.arena.get(block);
            assert!(!segments.is_empty(), "{key:?} is stored with no segments");
            assert!(segments.len() <= self.config.segments_per_key_max);
            assert!(
                segments[0].start >= self.horizon_of(key),
                "{key:?} keeps evidence before its horizon"
            );
            for segment in segments {
                assert!(
                    segment.start < segment.end,
                    "{key:?}: empty segment {segment:?}"
                );
            }
            for pair in segments.windows(2) {
                assert!(
                    pair[0].end <= pair[1].start,
                    "{key:?}: overlap or disorder {pair:?}"
                );
                assert!(
                    pair[0].end < pair[1].start || pair[0].holder() != pair[1].holder(),
                    "{key:?}: touching segments of one holder not coalesced {pair:?}"
                );
            }
        }
    }
}
