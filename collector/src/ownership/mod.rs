//! Who owned an IP at a given time: the per-IP ownership time ranges built from heartbeats.
//!
//! Every flow an exporter reports is a heartbeat: "workload W held local IP X throughout
//! [start, end]". [`OwnershipMap`] keeps, per key (an IP, or an (IP, port) pair for IPs shared
//! by several workloads behind NAT64), a sorted list of non-overlapping [`Segment`]s, each held
//! by one workload or contested by several. The rules (docs/attribution.md has worked examples):
//!
//! 1. **Evidence is a set.** A key's state is a function of the union of evidence per owner, so
//!    heartbeats may arrive late, twice or out of order without changing any answer. The map
//!    stores that function in canonical form (maximal runs of one holder), which makes
//!    "same evidence, same state" checkable by equality.
//! 2. **Lookups look at a window** `[t - slack, t + slack]`: an owner is answered only if every
//!    piece of evidence in the window names that owner alone. Two owners in the window, or an
//!    owner and evidence its exporter left unnamed, is [`Reason::Ambiguous`]; a contested span is [`Reason::Conflict`]; nothing is
//!    [`Reason::NoEvidence`], unless the window sits in a gap of at most `merge_gap` between
//!    two segments of the same owner.
//! 3. **Eviction forgets a prefix of time.** Segments that ended before `now - retention` are
//!    dropped and every lookup whose window starts before that horizon answers
//!    [`Reason::Expired`], so forgetting can turn an answer into `Unattributed`, never into
//!    another owner.
//!
//! The map is single-threaded by design: each collector shard owns one for its slice of the
//! IP space and talks to other shards by messages.

mod arena;
mod claims;
mod completeness;
mod host_local;
mod interner;
mod map;
mod reuse;
mod segment;
mod sources;
mod table;

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;

use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};

pub use claims::Claimants;
pub use completeness::Completeness;
pub use host_local::{Host, HostLocalOwnership};
pub use interner::{Dictionary, DictionaryIds, WorkloadInterner};
pub use map::{InsertOutcome, MemoryUsage, OwnershipMap, Prefetch};
pub use reuse::{ReuseStatus, keep_shortest_handover, kept_shortest_handover};
pub use segment::{Holder, Segment, SourceId};
pub use sources::{Source, SourceSeen, Sources};

/// What a lookup concluded about one IP at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribution {
    Owner(WorkloadId),
    Unattributed(Reason),
}

/// Why a lookup named no owner. The flow is emitted without a remote workload, never guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No evidence in the window, and no short same-owner gap to bridge.
    NoEvidence,
    /// Two or more owners claim the same instant inside the window.
    Conflict,
    /// Two owners hold the IP at different instants inside the window: a handover too close to
    /// the flow's start to tell which side of it the flow began on.
    Ambiguous,
    /// The window reaches back before the retention horizon: evidence there may be forgotten.
    Expired,
    /// The remote address means something only on its host (loopback, link-local...) and that
    /// host's own evidence does not name its owner. Evidence from other hosts is never used.
    HostLocal,
    /// The answer would come from the event stream, and the stream was not known complete
    /// through the flow's time within its retry budget: a late event could still change it.
    Incomplete,
    /// An outbound connection the remote never accepted (no answer, or only a reset): no
    /// server socket reported who held the address, so evidence near it (the last owner's,
    /// just before it let the address go) would name someone who may not have been there.
    Unanswered,
    /// The only evidence in the window is its holder's exporter saying it could not name the
    /// workload (an address its container platform had not confirmed): someone held the IP,
    /// and who is not known.
    Unnamed,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::NoEvidence,
        Reason::Conflict,
        Reason::Ambiguous,
        Reason::Expired,
        Reason::HostLocal,
        Reason::Incomplete,
        Reason::Unanswered,
        Reason::Unnamed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoEvidence => "no_evidence",
            Reason::Conflict => "conflict",
            Reason::Ambiguous => "ambiguous",
            Reason::Expired => "expired",
            Reason::HostLocal => "host_local",
            Reason::Incomplete => "incomplete",
            Reason::Unanswered => "unanswered",
            Reason::Unnamed => "unnamed",
        }
    }
}

/// The instant a flow's remote side is looked up at: its start, unless the start lies more
/// than `reach` before the flow's `arrival`, where evidence may be evicted before the lookup
/// (a connection open longer than retention); then `arrival - reach`, the oldest instant every
/// lookup of the flow can still see, and never after the flow's end. `reach` is retention less
/// everything that can pass between arrival and the last lookup ([`crate::config::Config::lookup_reach`]).
///
/// While a TCP connection lives, its remote address cannot pass to another workload, so every
/// instant of its lifetime names the same owner: a connection open for days is attributed from
/// evidence inside retention rather than coming out `Expired` (docs/attribution.md).
pub fn lookup_instant(
    start: Timestamp,
    end: Timestamp,
    arrival: Timestamp,
    reach: Duration,
) -> Timestamp {
    start.max(arrival.saturating_sub(reach).min(end))
}

/// "`owner` held `ip` (or `(ip, port)`) throughout `[start, end]`", both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    pub ip: CanonicalIp,
    /// 0: the whole IP. Otherwise the IP is shared (NAT64) and `owner` holds only this port.
    pub port: u16,
    /// None: the exporter could not name the workload that held it (still evidence that the
    /// key was held, by someone).
    pub owner: Option<WorkloadId>,
    pub start: Timestamp,
    pub end: Timestamp,
    /// Who reported it, kept with the segments it shapes for the control plane.
    pub source: SourceId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    #[error("heartbeat ends ({end:?}) before it starts ({start:?})")]
    EndBeforeStart { start: Timestamp, end: Timestamp },
}

/// The knobs of attribution. Defaults suit a fleet whose clocks agree to well under a second
/// and whose exporters report every 60 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnershipConfig {
    /// Half-width of the lookup window: absorbs clock skew between the two hosts of a flow and
    /// the handshake time between the two ends' view of its start.
    pub slack: Duration,
    /// The longest gap between two segments of one owner that a lookup may bridge. Keep it
    /// below the platform's IP reuse cool-down: an IP reassigned and returned within a bridged
    /// gap, with no heartbeat from the interim owner, would be misattributed. The map checks
    /// it: once it sees a shorter handover it bridges less (see [`reuse`]).
    pub merge_gap: Duration,
    /// Bridge less once a handover shorter than `merge_gap` is seen. Off only to measure what
    /// the guard costs.
    pub reuse_guard: bool,
    /// How long evidence is kept. Must cover the delay buffer and every retry of a flow.
    pub retention: Duration,
    /// Bound on segments per key. A key past it forgets its oldest segments, as eviction does
    /// (its lookups before the forgotten span answer `Expired`), so a flapping IP cannot grow
    /// without limit.
    pub segments_per_key_max: usize,
}

/// Segments a key may hold at most, whatever is configured: the arena's largest block.
pub const SEGMENTS_PER_KEY_LIMIT: usize = arena::BLOCK_SEGMENTS_MAX;

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            slack: Duration::from_secs(1),
            merge_gap: Duration::from_secs(5),
            reuse_guard: true,
            retention: Duration::from_secs(3600),
            segments_per_key_max: SEGMENTS_PER_KEY_LIMIT,
        }
    }
}
