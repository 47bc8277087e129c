//! What a map learns about how fast the platform reuses IPs, and how it protects itself.
//!
//! Bridging a gap between two segments of one owner is right only if no other workload could
//! have held the key inside it, and the only thing that says so is the platform's reuse
//! cool-down, which `merge_gap` must stay below. The map sees every handover it holds evidence
//! for: the last evidence of one owner and the first of the next on one key. Evidence only
//! ever narrows such a gap, so a handover gap shorter than `merge_gap` proves the platform
//! hands IPs out faster than configured. From then on the map bridges only gaps shorter than
//! the shortest handover it has seen: an owner that came and went unseen inside a bridged gap
//! needed two handovers' worth of time. And an owner is named only from evidence nearer the
//! flow than that too: a window reaching a handover's length past the flow could see only the
//! next owner's evidence where the flow's owner left none. Fast reuse then costs coverage,
//! never correctness.

use std::time::Duration;

use flowattr_common::Timestamp;

use super::segment::{Holder, Segment, partition_from_newest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReuseGuard {
    enabled: bool,
    merge_gap_ns: u64,
    slack_ns: u64,
    shortest_handover_ns: Option<u64>,
    fast_handovers: u64,
}

/// What a map has seen of IP reuse, for metrics and `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReuseStatus {
    /// The shortest gap between two owners of one key seen so far.
    pub shortest_handover: Option<Duration>,
    /// Handovers seen shorter than the configured `merge_gap` (each heartbeat that reveals or
    /// narrows one counts once).
    pub fast_handovers: u64,
    /// The longest gap a lookup bridges now.
    pub bridged_gap: Duration,
    /// How near a lookup's instant an owner's evidence must lie now.
    pub owner_reach: Duration,
}

impl ReuseGuard {
    /// `enabled: false` keeps bridging every gap up to `merge_gap` whatever is seen: only to
    /// measure what the guard costs.
    pub fn new(merge_gap: Duration, slack: Duration, enabled: bool) -> Self {
        ReuseGuard {
            enabled,
            merge_gap_ns: flowattr_common::duration_nanos(merge_gap),
            slack_ns: flowattr_common::duration_nanos(slack),
            shortest_handover_ns: None,
            fast_handovers: 0,
        }
    }

    /// Looks at the two boundaries of the span `[start, end)` just merged into a key, whose
    /// segments were `before` and are now `after`: those are the only handovers an insert can
    /// reveal or narrow. One it leaves as it was is not seen again.
    pub fn observe(
        &mut self,
        before: &[Segment],
        after: &[Segment],
        start: Timestamp,
        end: Timestamp,
    ) {
        for side in [Side::Start(start), Side::End(end)] {
            let Some(gap) = side.handover(after) else {
                continue;
            };
            if side.handover(before).is_none_or(|earlier| gap < earlier) {
                self.saw_handover(gap);
            }
        }
    }

    fn saw_handover(&mut self, gap_ns: u64) {
        if gap_ns <= self.merge_gap_ns {
            self.fast_handovers += 1;
        }
        self.heard_of_handover(gap_ns);
    }

    /// A handover another map saw (another shard's: the platform's reuse speed is one for
    /// every key). Bridges less, counts nothing.
    pub fn heard_of_handover(&mut self, gap_ns: u64) {
        self.shortest_handover_ns = Some(
            self.shortest_handover_ns
                .map_or(gap_ns, |shortest| shortest.min(gap_ns)),
        );
    }

    /// The longest gap between two segments of one owner a lookup may bridge.
    pub fn bridged_gap_ns(&self) -> u64 {
        self.below_shortest_handover(self.merge_gap_ns)
    }

    /// How near a lookup's instant an owner's evidence must lie for the answer to name it,
    /// `slack_ns` as configured. A window wider than a handover could hold only the next
    /// owner's first evidence while the flow's true owner, whose last evidence went missing,
    /// held the IP at its start: the same unseen-owner hole as a bridged gap. The window keeps
    /// its width (two owners in it stay ambiguous); only its owner must also be this near.
    pub fn owner_reach_ns(&self, slack_ns: u64) -> u64 {
        self.below_shortest_handover(slack_ns)
    }

    fn below_shortest_handover(&self, configured_ns: u64) -> u64 {
        match self.shortest_handover_ns {
            Some(shortest) if self.enabled => configured_ns.min(shortest.saturating_sub(1)),
            _ => configured_ns,
        }
    }

    pub fn status(&self) -> ReuseStatus {
        ReuseStatus {
            shortest_handover: self.shortest_handover_ns.map(Duration::from_nanos),
            fast_handovers: self.fast_handovers,
            bridged_gap: Duration::from_nanos(self.bridged_gap_ns()),
            owner_reach: Duration::from_nanos(self.owner_reach_ns(self.slack_ns)),
        }
    }
}

/// Where a node keeps the shortest handover it has seen, in its data directory: the platform's
/// reuse speed does not change with a restart, so neither does what the guard allows.
pub const SHORTEST_HANDOVER_FILE: &str = "shortest-handover";

/// The shortest handover a previous run kept in `dir`, if any.
pub fn kept_shortest_handover(dir: &std::path::Path) -> Option<Duration> {
    let text = std::fs::read_to_string(dir.join(SHORTEST_HANDOVER_FILE)).ok()?;
    text.trim().parse().ok().map(Duration::from_nanos)
}

pub fn keep_shortest_handover(dir: &std::path::Path, gap: Duration) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = format!("{}\n", gap.as_nanos());
    flowattr_common::durable::replace_file(&dir.join(SHORTEST_HANDOVER_FILE), text.as_bytes())
}

impl ReuseStatus {
    /// Several maps' statuses as one: the shortest handover of any, the sum of fast ones, the
    /// shortest bridged gap.
    pub fn combine(self, other: ReuseStatus) -> ReuseStatus {
        ReuseStatus {
            shortest_handover: match (self.shortest_handover, other.shortest_handover) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            fast_handovers: self.fast_handovers + other.fast_handovers,
            bridged_gap: self.bridged_gap.min(other.bridged_gap),
            owner_reach: self.owner_reach.min(other.owner_reach),
        }
    }
}

/// One side of a merged span.
#[derive(Clone, Copy)]
enum Side {
    Start(Timestamp),
    End(Timestamp),
}

impl Side {
    /// The handover gap, if any, across this side of the span in a key's `segments`.
    fn handover(self, segments: &[Segment]) -> Option<u64> {
        let boundary = match self {
            Side::Start(start) => partition_from_newest(segments, |segment| segment.end <= start),
            Side::End(end) => partition_from_newest(segments, |segment| segment.start < end),
        };
        handover_gap(segments[boundary.checked_sub(1)?], *segments.get(boundary)?)
    }
}

/// The empty time between `before` and `after` if they are one owner's last evidence and
/// another's first. Contested time is not a handover: it is a conflict, answered as one.
fn handover_gap(before: Segment, after: Segment) -> Option<u64> {
    match (before.holder(), after.holder()) {
        (Holder::Workload(a), Holder::Workload(b)) if a != b && before.end < after.start => {
            Some(after.start.nanos_since(before.end))
        }
        _ => None,
    }
}
