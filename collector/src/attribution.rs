//! What a shard knows about who held which IP, and the one rule that turns it into an answer
//! for a flow's remote side. Each shard owns an [`Attributor`]; `flowattr-bench simulate`
//! drives the same type at simulated time, so the attribution it measures is this code's, not
//! a copy of it.
//!
//! Evidence comes in three kinds, kept apart:
//! - heartbeats about fleet addresses, from this node's exporters and its peers: the map every
//!   host's flows are attributed from;
//! - heartbeats about host-local addresses (loopback, link-local, multicast): kept per
//!   exporter, since 127.0.0.1 on one host says nothing about another;
//! - assign/unassign events about IPs that run no exporter: used only for remote IPs inside
//!   the fallback CIDRs, and only where heartbeats hold no evidence at the flow's time.

use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};

use crate::config::{Config, EventsConfig};
use crate::delay::codec::BufferedFlow;
use crate::events::{EventOwnership, IpEvent};
use crate::ownership::{
    Attribution, Completeness, Heartbeat, HeartbeatError, Host, HostLocalOwnership, InsertOutcome,
    OwnershipMap, Prefetch, Reason, WorkloadInterner, lookup_instant,
};
use crate::sink::Provenance;

/// How many items apart the two stages of [`OwnershipMap::prefetch`] are issued, and how far
/// ahead of the item being handled the second one is: enough for several DRAM misses to be in
/// flight at once, few enough that the prefetched lines are still in cache when their turn
/// comes.
pub const PREFETCH_AHEAD: usize = 8;

/// Issues, for a loop over `items` now at `at`, the prefetches of the items ahead of it:
/// the table slot of the item `2 * PREFETCH_AHEAD` on, the segments of the one `PREFETCH_AHEAD`
/// on (whose slot was asked for `PREFETCH_AHEAD` items ago).
pub fn prefetch_ahead<T>(items: &[T], at: usize, prefetch: impl Fn(&T, Prefetch)) {
    if let Some(far) = items.get(at + 2 * PREFETCH_AHEAD) {
        prefetch(far, Prefetch::Slot);
    }
    if let Some(near) = items.get(at + PREFETCH_AHEAD) {
        prefetch(near, Prefetch::Segments);
    }
}

/// One shard's evidence and its attribution rule.
pub struct Attributor {
    pub map: OwnershipMap,
    pub host_local: HostLocalOwnership,
    /// The event fallback's map; None when it is off.
    pub events: Option<EventOwnership>,
    pub names: WorkloadInterner,
    fallback: EventsConfig,
    /// Every event about an instant up to this one is in hand (see
    /// [`crate::events::EventCompleteness`]); set by the caller before attributing.
    events_complete_through: Timestamp,
    /// Which peer nodes' evidence is all in the map (see [`crate::broadcast`]'s watermarks).
    peers_complete: Completeness,
    slack: Duration,
    reach: Duration,
    max_retries: u8,
    retention: Duration,
}

/// What to do with a flow once its remote side has been looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No evidence yet and retries left: look again after the retry delay.
    Retry,
    Emit(Attribution, Provenance),
}

impl Attributor {
    pub fn new(config: &Config) -> Self {
        Attributor {
            map: OwnershipMap::new(config.ownership.to_ownership_config()),
            host_local: HostLocalOwnership::new(config.ownership.to_ownership_config()),
            events: config.events.enabled().then(|| {
                EventOwnership::new(config.ownership.slack, config.events.assignment_lifetime)
            }),
            names: WorkloadInterner::default(),
            fallback: config.events.clone(),
            events_complete_through: Timestamp::ZERO,
            peers_complete: Completeness::EVERYTHING,
            slack: config.ownership.slack,
            reach: config.lookup_reach(),
            max_retries: config.delay.max_retries,
            retention: config.ownership.retention,
        }
    }

    /// Stores a heartbeat `host` reported: about a fleet address in the shared map, about a
    /// host-local one in that host's own evidence. `shared`: the exporter says several
    /// workloads share the IP by port (NAT64).
    pub fn learn(
        &mut self,
        host: Host,
        heartbeat: Heartbeat,
        shared: bool,
    ) -> Result<InsertOutcome, HeartbeatError> {
        if heartbeat.ip.is_host_local() {
            return self.host_local.insert(host, heartbeat);
        }
        if shared {
            self.map.mark_shared(heartbeat.ip);
        }
        self.map.insert(heartbeat)
    }

    /// Stores one checked event, if the event fallback is on.
    pub fn learn_event(&mut self, event: &IpEvent) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        let owner = event.owner.as_deref().map(|name| self.names.intern(name));
        events.insert(event.ip, event.at, owner);
    }

    /// How far the event stream is complete now: event answers are given only for flows
    /// whose window ends by then.
    pub fn set_events_complete_through(&mut self, through: Timestamp) {
        self.events_complete_through = through;
    }

    /// Which peer nodes' evidence is all in the map: answers that need any other wait for it.
    pub fn set_peers_complete(&mut self, region: Completeness) {
        self.peers_complete = region;
    }

    /// The answer for `flow`'s remote side, reported by `host` and first received at
    /// `arrival` (retries keep the first arrival, so every attempt looks at the same instant).
    pub fn attribute(&self, host: Host, arrival: Timestamp, flow: &BufferedFlow) -> Decision {
        if flow.unanswered() {
            return Decision::Emit(
                Attribution::Unattributed(Reason::Unanswered),
                Provenance::Heartbeat,
            );
        }
        let at = lookup_instant(flow.start, flow.end, arrival, self.reach);
        let (ip, port) = (flow.remote_ip, flow.remote_port);
        let (attribution, provenance) = if ip.is_host_local() {
            // This node's exporters' alone: no peer's evidence to wait for.
            self.or_events(self.host_local.attribute(host, ip, port, at), ip, at)
        } else {
            self.owner_at(ip, port, at)
        };
        match attribution {
            // Late evidence can still name it: a first report, or a named one that covers
            // unnamed evidence's time.
            Attribution::Unattributed(
                Reason::NoEvidence | Reason::Incomplete | Reason::Unnamed,
            ) if flow.retries < self.max_retries => Decision::Retry,
            attribution => Decision::Emit(attribution, provenance),
        }
    }

    /// Who held `ip` (and `port`, for a shared IP) at `at`, from evidence complete for that
    /// instant: the region's heartbeats, then the event stream for an IP that runs no
    /// exporter. What flows are named by, and what `/v1/owner` answers.
    pub fn owner_at(&self, ip: CanonicalIp, port: u16, at: Timestamp) -> (Attribution, Provenance) {
        let (floor, horizon) = self.map.evidence_span(at);
        let heartbeats = if !self.peers_complete.covers(floor, horizon) {
            // A peer's evidence not yet read could still change the answer: a second owner, or
            // one where there was none.
            Attribution::Unattributed(Reason::Incomplete)
        } else {
            self.map.attribute(ip, port, at)
        };
        self.or_events(heartbeats, ip, at)
    }

    /// `heartbeats`, or the event stream's answer where they name no one (no evidence, or only
    /// unnamed evidence, which any owner the events name is consistent with) and the IP is one
    /// the fallback covers.
    fn or_events(
        &self,
        heartbeats: Attribution,
        ip: CanonicalIp,
        at: Timestamp,
    ) -> (Attribution, Provenance) {
        if matches!(
            heartbeats,
            Attribution::Unattributed(Reason::NoEvidence | Reason::Unnamed)
        ) && let Some(events) = self.events.as_ref()
            && self.fallback.covers(ip.to_ip_addr())
        {
            // An event not yet published could still change the answer for this window.
            let fallback = if at.saturating_add(self.slack) > self.events_complete_through {
                Attribution::Unattributed(Reason::Incomplete)
            } else {
                events.attribute(ip, at)
            };
            if fallback != Attribution::Unattributed(Reason::NoEvidence) {
                return (fallback, Provenance::Event);
            }
        }
        (heartbeats, Provenance::Heartbeat)
    }

    /// Starts loading what [`Self::attribute`] of `flow`, or [`Self::learn`] of a heartbeat
    /// about `(ip, port)`, will read (see [`OwnershipMap::prefetch`]). Host-local addresses
    /// live in small per-host maps that stay in cache.
    pub fn prefetch(&self, ip: CanonicalIp, port: u16, stage: Prefetch) {
        if !ip.is_host_local() {
            self.map.prefetch(ip, port, stage);
        }
    }

    /// Forgets evidence older than retention.
    pub fn evict(&mut self, now: Timestamp) {
        self.map.evict(now);
        self.host_local.evict(now);
        if let Some(events) = self.events.as_mut() {
            events.evict(now, self.retention);
        }
    }
}
