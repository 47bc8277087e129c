//! The strategies users run today: a current-state view of an inventory's assign/unassign
//! events, asked "who owns this IP now?" when a flow arrives.
//!
//! - [`EventMap`]: an IP -> owner map that applies events in the order they arrive, as a flow
//!   pipeline fed by an IP-tracking service does; optionally it holds every flow back before
//!   asking (the mitigation that reduces misattribution without ending it).
//! - [`CurrentStateCache`]: a cache of workload objects and their IPs, as Kubernetes flow
//!   tools keep from the API server's watch: when two objects claim one IP, either the last
//!   one written wins, or the first live one does; a variant keeps finished batch jobs, whose
//!   objects linger after their IPs went back to the pool.

use std::collections::HashMap;
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp};

use super::{Answers, HoldBack, Strategy, Verdict};
use crate::simulate::fleet::{InstanceId, ServiceId};
use crate::simulate::observe::{Batch, InventoryEvent};

const NOT_IN_INVENTORY: &str = "not_in_inventory";

/// A current-state IP -> owner map driven by events in arrival order.
#[derive(Debug, Default)]
pub struct EventMap {
    hold: Duration,
    owners: HashMap<CanonicalIp, ServiceId>,
    held: HoldBack<(u32, CanonicalIp)>,
}

impl EventMap {
    /// `hold`: how long every flow waits before its remote IP is looked up.
    pub fn new(hold: Duration) -> Self {
        EventMap {
            hold,
            ..EventMap::default()
        }
    }

    fn answer(&self, ip: CanonicalIp) -> Verdict {
        self.owners
            .get(&ip)
            .map_or(Verdict::Unattributed(NOT_IN_INVENTORY), |&owner| {
                Verdict::Owner(owner)
            })
    }
}

impl Strategy for EventMap {
    fn name(&self) -> String {
        if self.hold.is_zero() {
            "event-based".into()
        } else {
            format!(
                "event-based, {} hold-back",
                humantime::format_duration(self.hold)
            )
        }
    }

    fn batch(&mut self, now: Timestamp, batch: &Batch, answers: &mut Answers) {
        for report in &batch.reports {
            if self.hold.is_zero() {
                answers.push((report.id, self.answer(report.remote_ip)));
            } else {
                self.held
                    .push(now.saturating_add(self.hold), (report.id, report.remote_ip));
            }
        }
    }

    fn event(&mut self, _now: Timestamp, event: &InventoryEvent, _answers: &mut Answers) {
        // Whatever the event's own time says: it is applied when it arrives.
        if event.assigned {
            self.owners.insert(event.ip, event.service);
        } else {
            self.owners.remove(&event.ip);
        }
    }

    fn advance(&mut self, now: Timestamp, answers: &mut Answers) {
        while let Some((_, (id, ip))) = self.held.pop_due(now) {
            answers.push((id, self.answer(ip)));
        }
    }

    fn finish(&mut self, answers: &mut Answers) {
        self.advance(Timestamp::from_nanos(u64::MAX), answers);
    }
}

/// Which of several objects claiming one IP a cache names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimPolicy {
    /// The object written last (an update overwrites the IP's index entry).
    LastWriter,
    /// The first object still in the cache; with `keep_finished_jobs`, objects of batch jobs
    /// that ran to completion stay in it, as their delete never comes.
    FirstLive { keep_finished_jobs: bool },
}

/// A cache of workload objects and their IPs, answering from its current state.
#[derive(Debug)]
pub struct CurrentStateCache {
    policy: ClaimPolicy,
    /// The objects claiming each IP, oldest first.
    claims: HashMap<CanonicalIp, Vec<(InstanceId, ServiceId)>>,
}

impl CurrentStateCache {
    pub fn new(policy: ClaimPolicy) -> Self {
        CurrentStateCache {
            policy,
            claims: HashMap::new(),
        }
    }
}

impl Strategy for CurrentStateCache {
    fn name(&self) -> String {
        match self.policy {
            ClaimPolicy::LastWriter => "current-state cache, last writer wins".into(),
            ClaimPolicy::FirstLive {
                keep_finished_jobs: false,
            } => "current-state cache, first live claimant".into(),
            ClaimPolicy::FirstLive {
                keep_finished_jobs: true,
            } => "current-state cache, finished jobs kept".into(),
        }
    }

    fn batch(&mut self, _now: Timestamp, batch: &Batch, answers: &mut Answers) {
        for report in &batch.reports {
            let claims = self
                .claims
                .get(&report.remote_ip)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let claim = match self.policy {
                ClaimPolicy::LastWriter => claims.last(),
                ClaimPolicy::FirstLive { .. } => claims.first(),
            };
            let verdict = claim.map_or(Verdict::Unattributed(NOT_IN_INVENTORY), |&(_, owner)| {
                Verdict::Owner(owner)
            });
            answers.push((report.id, verdict));
        }
    }

    fn event(&mut self, _now: Timestamp, event: &InventoryEvent, _answers: &mut Answers) {
        let claims = self.claims.entry(event.ip).or_default();
        if event.assigned {
            claims.push((event.instance, event.service));
            return;
        }
        match self.policy {
            // The IP's one index entry goes if it names this object; an older object that
            // claimed the IP is not put back.
            ClaimPolicy::LastWriter
                if claims
                    .last()
                    .is_some_and(|(instance, _)| *instance == event.instance) =>
            {
                claims.clear()
            }
            ClaimPolicy::FirstLive {
                keep_finished_jobs: true,
            } if event.finished_job => {}
            _ => claims.retain(|(instance, _)| *instance != event.instance),
        }
    }

    fn advance(&mut self, _now: Timestamp, _answers: &mut Answers) {}

    fn finish(&mut self, _answers: &mut Answers) {}
}
