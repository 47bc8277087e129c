//! Who the event stream says held an IP, by time. Like the heartbeat map, its state is a
//! function of the set of events received (kept sorted, duplicates dropped), so late, repeated
//! and reordered events change nothing.
//!
//! An event speaks for its IP from its instant until the next event, and for at most
//! `events.assignment_lifetime`: producers re-publish every live assignment more often than
//! that. So an answer depends only on the events of a bounded stretch before the flow, which a
//! restarted node reads again from the topic: it answers as a long-running one does.

use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp, WorkloadId, duration_nanos};
use rustc_hash::FxHashMap;

use crate::ownership::{Attribution, Reason};

#[derive(Debug)]
pub struct EventOwnership {
    slack_ns: u64,
    lifetime_ns: u64,
    /// Per IP, its events in order of time (then owner): each sets the IP's holder (None:
    /// unassigned) from its instant to the next event's, for at most the lifetime.
    ips: FxHashMap<CanonicalIp, Vec<(Timestamp, Option<WorkloadId>)>>,
    /// Lookups whose window starts before this answer `Expired`.
    horizon: Timestamp,
    /// IPs that overflowed [`EVENTS_PER_IP_MAX`] and forgot further than `horizon`.
    ip_horizons: FxHashMap<CanonicalIp, Timestamp>,
}

/// Events one IP keeps at most: a producer flapping an IP cannot grow a node's memory. Past
/// it, the IP forgets its oldest instants, as eviction would, and lookups before what it kept
/// answer `Expired`.
pub const EVENTS_PER_IP_MAX: usize = 256;

impl EventOwnership {
    pub fn new(slack: Duration, lifetime: Duration) -> Self {
        EventOwnership {
            slack_ns: duration_nanos(slack),
            lifetime_ns: duration_nanos(lifetime),
            ips: FxHashMap::default(),
            horizon: Timestamp::ZERO,
            ip_horizons: FxHashMap::default(),
        }
    }

    pub fn insert(&mut self, ip: CanonicalIp, at: Timestamp, owner: Option<WorkloadId>) {
        let events = self.ips.entry(ip).or_default();
        let entry = (at, owner);
        if let Err(position) = events.binary_search(&entry) {
            events.insert(position, entry);
        }
        if events.len() > EVENTS_PER_IP_MAX {
            // Whole instants go, so that what is kept still says every word of its first one.
            let excess = events.len() - EVENTS_PER_IP_MAX;
            let cut = events.partition_point(|(time, _)| *time <= events[excess - 1].0);
            let kept_from = events.get(cut).map_or(Timestamp::MAX, |(time, _)| *time);
            events.drain(..cut);
            let horizon = self.ip_horizons.entry(ip).or_insert(kept_from);
            *horizon = (*horizon).max(kept_from);
        }
    }

    /// What the events say about `ip` at `at`, with the heartbeat map's window rules.
    pub fn attribute(&self, ip: CanonicalIp, at: Timestamp) -> Attribution {
        let start = Timestamp::from_nanos(at.as_nanos().saturating_sub(self.slack_ns));
        let end = Timestamp::from_nanos(at.as_nanos().saturating_add(self.slack_ns));
        if start < self.horizon
            || self
                .ip_horizons
                .get(&ip)
                .is_some_and(|horizon| start < *horizon)
        {
            return Attribution::Unattributed(Reason::Expired);
        }
        let Some(events) = self.ips.get(&ip) else {
            return Attribution::Unattributed(Reason::NoEvidence);
        };
        // The holder when the window opens (every event of the last instant before it, if it
        // still speaks at the window's end: two that disagree are a conflict, whichever sorts
        // last), then every change inside it.
        let first_inside = events.partition_point(|(time, _)| *time <= start);
        let at_start = last_instant(&events[..first_inside]);
        let speaks_from = Timestamp::from_nanos(end.as_nanos().saturating_sub(self.lifetime_ns));
        let at_start = match events.get(at_start) {
            Some((time, _)) if *time >= speaks_from => at_start,
            _ => first_inside,
        };
        let inside = events[first_inside..]
            .iter()
            .take_while(|(time, _)| *time <= end);
        let mut holders = events[at_start..first_inside].iter().chain(inside);
        let Some(&(first_time, first)) = holders.next() else {
            return Attribution::Unattributed(Reason::NoEvidence);
        };
        let mut previous_time = first_time;
        let mut previous = first;
        let mut changed = false;
        for &(time, holder) in holders {
            if time == previous_time && holder != previous {
                return Attribution::Unattributed(Reason::Conflict);
            }
            changed |= holder != first;
            previous_time = time;
            previous = holder;
        }
        match (first, changed) {
            (Some(owner), false) => Attribution::Owner(owner),
            (None, false) => Attribution::Unattributed(Reason::NoEvidence),
            (_, true) => Attribution::Unattributed(Reason::Ambiguous),
        }
    }

    /// Lookups before `now - retention` answer `Expired` from now on; events older than that
    /// less the lifetime can speak for none of the others, and are forgotten.
    pub fn evict(&mut self, now: Timestamp, retention: Duration) {
        let horizon = now.saturating_sub(retention);
        self.horizon = self.horizon.max(horizon);
        self.ip_horizons
            .retain(|_, ip_horizon| *ip_horizon > horizon);
        let oldest = Timestamp::from_nanos(horizon.as_nanos().saturating_sub(self.lifetime_ns));
        self.ips.retain(|_, events| {
            events.drain(..events.partition_point(|(time, _)| *time < oldest));
            !events.is_empty()
        });
    }

    pub fn ip_count(&self) -> usize {
        self.ips.len()
    }
}

/// Where the events of the last instant in `events` (sorted by time) begin.
fn last_instant(events: &[(Timestamp, Option<WorkloadId>)]) -> usize {
    events.last().map_or(0, |(last, _)| {
        events.partition_point(|(time, _)| time < last)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_nanos(s * 1_000_000_000)
    }

    #[test]
    fn the_event_stream_answers_by_time_in_any_order_and_never_across_a_change() {
        let ip = CanonicalIp::from_v4([10, 200, 0, 5].into());
        let (lb, other) = (Some(WorkloadId::new(1)), Some(WorkloadId::new(2)));
        let events = [
            (at(100), lb),
            (at(200), None),
            (at(300), other),
            (at(400), other),
        ];
        let mut forward = EventOwnership::new(Duration::from_secs(1), Duration::from_secs(3_600));
        let mut backward = EventOwnership::new(Duration::from_secs(1), Duration::from_secs(3_600));
        for &(time, owner) in &events {
            forward.insert(ip, time, owner);
        }
        for &(time, owner) in events.iter().rev().chain(events.iter()) {
            backward.insert(ip, time, owner);
        }
        for map in [&forward, &backward] {
            assert_eq!(
                map.attribute(ip, at(50)),
                Attribution::Unattributed(Reason::NoEvidence)
            );
            assert_eq!(
                map.attribute(ip, at(150)),
                Attribution::Owner(WorkloadId::new(1))
            );
            assert_eq!(
                map.attribute(ip, at(250)),
                Attribution::Unattributed(Reason::NoEvidence)
            );
            assert_eq!(
                map.attribute(ip, at(350)),
                Attribution::Owner(WorkloadId::new(2))
            );
            // A change inside the window is never read as either side of it.
            assert_eq!(
                map.attribute(ip, at(200)),
                Attribution::Unattributed(Reason::Ambiguous)
            );
            assert_eq!(
                map.attribute(ip, at(299)),
                Attribution::Unattributed(Reason::Ambiguous)
            );
            // A repeated assign of the same owner is no change.
            assert_eq!(
                map.attribute(ip, at(400)),
                Attribution::Owner(WorkloadId::new(2))
            );
        }
        forward.insert(ip, at(500), lb);
        forward.insert(ip, at(500), other);
        assert_eq!(
            forward.attribute(ip, at(500)),
            Attribution::Unattributed(Reason::Conflict)
        );

        forward.evict(at(3_900), Duration::from_secs(3_600));
        assert_eq!(
            forward.attribute(ip, at(290)),
            Attribution::Unattributed(Reason::Expired)
        );
        assert_eq!(
            forward.attribute(ip, at(350)),
            Attribution::Owner(WorkloadId::new(2)),
            "the state at the horizon is kept"
        );
    }

    #[test]
    fn an_event_speaks_for_its_lifetime_only_so_a_restarted_node_reading_a_bounded_past_answers_alike()
     {
        let ip = CanonicalIp::from_v4([10, 200, 0, 8].into());
        let lb = Some(WorkloadId::new(1));
        let (retention, lifetime) = (Duration::from_secs(600), Duration::from_secs(300));
        let mut long_running = EventOwnership::new(Duration::from_secs(1), lifetime);
        long_running.insert(ip, at(1_000), lb);
        assert_eq!(
            long_running.attribute(ip, at(1_298)),
            Attribution::Owner(WorkloadId::new(1))
        );
        assert_eq!(
            long_running.attribute(ip, at(1_300)),
            Attribution::Unattributed(Reason::NoEvidence),
            "not re-asserted"
        );
        long_running.insert(ip, at(1_250), lb);
        assert_eq!(
            long_running.attribute(ip, at(1_500)),
            Attribution::Owner(WorkloadId::new(1))
        );
        long_running.insert(ip, at(1_600), None);
        // Eviction at 2,000 s forgets what is older than 2,000 - 600 - 300 s.
        long_running.evict(at(2_000), retention);
        assert_eq!(long_running.ips[&ip].len(), 2);
        // A node that started at 2,000 s read the topic from 2,000 - 600 - 300 s.
        let mut restarted = EventOwnership::new(Duration::from_secs(1), lifetime);
        for &(time, owner) in &[(at(1_250), lb), (at(1_600), None)] {
            restarted.insert(ip, time, owner);
        }
        restarted.evict(at(2_000), retention);
        for second in (1_390..2_000).step_by(7) {
            assert_eq!(
                long_running.attribute(ip, at(second)),
                restarted.attribute(ip, at(second)),
                "at {second} s"
            );
        }
        assert_eq!(
            restarted.attribute(ip, at(1_500)),
            Attribution::Owner(WorkloadId::new(1))
        );
    }

    #[test]
    fn a_flapping_ip_keeps_a_bounded_number_of_events_and_answers_expired_before_them() {
        let ip = CanonicalIp::from_v4([10, 200, 0, 7].into());
        let (a, b) = (Some(WorkloadId::new(1)), Some(WorkloadId::new(2)));
        let mut map = EventOwnership::new(Duration::from_secs(1), Duration::from_secs(3_600));
        for second in 0..1_000u64 {
            map.insert(ip, at(10 * second), if second % 2 == 0 { a } else { b });
        }
        assert_eq!(map.ips[&ip].len(), EVENTS_PER_IP_MAX);
        // The last 256 events (from 7,440 s) are kept; before them, nothing is known any more.
        assert_eq!(
            map.attribute(ip, at(9_995)),
            Attribution::Owner(WorkloadId::new(2))
        );
        assert_eq!(
            map.attribute(ip, at(7_445)),
            Attribution::Owner(WorkloadId::new(1))
        );
        assert_eq!(
            map.attribute(ip, at(7_435)),
            Attribution::Unattributed(Reason::Expired)
        );
        assert_eq!(
            map.attribute(ip, at(5)),
            Attribution::Unattributed(Reason::Expired)
        );
    }

    #[test]
    fn events_of_one_instant_that_disagree_are_a_conflict_until_the_next_word_and_past_eviction() {
        let ip = CanonicalIp::from_v4([10, 200, 0, 6].into());
        let (a, b) = (Some(WorkloadId::new(1)), Some(WorkloadId::new(2)));
        for same_instant in [[a, b], [b, a], [None, a], [a, None]] {
            let mut map = EventOwnership::new(Duration::from_secs(1), Duration::from_secs(3_600));
            for owner in same_instant {
                map.insert(ip, at(100), owner);
            }
            // Ten seconds on, the window holds no event at all: the word at its start decides,
            // and that word is two words.
            assert_eq!(
                map.attribute(ip, at(110)),
                Attribution::Unattributed(Reason::Conflict),
                "{same_instant:?}"
            );
            map.insert(ip, at(120), b);
            assert_eq!(
                map.attribute(ip, at(130)),
                Attribution::Owner(WorkloadId::new(2))
            );
            // Past the horizon the instant is kept whole for its lifetime.
            let mut evicted = EventOwnership::new(Duration::from_secs(1), Duration::from_secs(60));
            for owner in same_instant {
                evicted.insert(ip, at(100), owner);
            }
            evicted.evict(at(105), Duration::from_secs(2));
            assert_eq!(
                evicted.attribute(ip, at(110)),
                Attribution::Unattributed(Reason::Conflict),
                "{same_instant:?}"
            );
        }
    }
}
