use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};
use proptest::prelude::*;

use super::model::ReferenceModel;
use super::*;

fn ip(last: u8) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 0, 0, last))
}

fn w(id: u32) -> WorkloadId {
    WorkloadId::new(id)
}

fn ns(instant: u64) -> Timestamp {
    Timestamp::from_nanos(instant)
}

/// A heartbeat of `owner`, or (None) of a holder its exporter could not name.
fn heartbeat(ip_last: u8, port: u16, owner: Option<u32>, start: u64, end: u64) -> Heartbeat {
    Heartbeat {
        ip: ip(ip_last),
        port,
        owner: owner.map(w),
        start: ns(start),
        end: ns(end),
        source: SourceId::UNKNOWN,
    }
}

/// A map whose time unit is the nanosecond, so tests can use the model's small domain.
fn tiny_map(
    slack: u64,
    merge_gap: u64,
    retention: u64,
    segments_per_key_max: usize,
) -> OwnershipMap {
    tiny_map_guarded(slack, merge_gap, retention, segments_per_key_max, true)
}

fn tiny_map_guarded(
    slack: u64,
    merge_gap: u64,
    retention: u64,
    segments_per_key_max: usize,
    reuse_guard: bool,
) -> OwnershipMap {
    OwnershipMap::new(OwnershipConfig {
        slack: Duration::from_nanos(slack),
        merge_gap: Duration::from_nanos(merge_gap),
        reuse_guard,
        retention: Duration::from_nanos(retention),
        segments_per_key_max,
    })
}

// ---- property tests against the reference model ----

const DOMAIN: u64 = 80;
const IPS: u8 = 3;
const PORTS: [u16; 4] = [0, 1, 2, 7];

#[derive(Debug, Clone)]
enum Op {
    Insert(Heartbeat),
    Evict(u64),
    Compact,
}

fn arb_heartbeat() -> impl Strategy<Value = Heartbeat> {
    (
        0..IPS,
        prop_oneof![5 => Just(0u16), 1 => 1u16..3],
        prop_oneof![6 => (0u32..3).prop_map(Some), 1 => Just(None)],
        0..DOMAIN,
        0u64..12,
    )
        .prop_map(|(ip, port, owner, start, len)| heartbeat(ip, port, owner, start, start + len))
}

fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            12 => arb_heartbeat().prop_map(Op::Insert),
            1 => (0..DOMAIN + 40).prop_map(Op::Evict),
            1 => Just(Op::Compact),
        ],
        0..40,
    )
}

fn arb_knobs() -> impl Strategy<Value = (u64, u64, u64)> {
    (0u64..4, 0u64..8, 10u64..60)
}

/// Every answer of interest: each key, each port, each instant of the domain and past it.
fn all_lookups() -> impl Iterator<Item = (CanonicalIp, u16, u64)> {
    (0..IPS).flat_map(|i| {
        PORTS
            .into_iter()
            .flat_map(move |port| (0..DOMAIN + 20).map(move |t| (ip(i), port, t)))
    })
}

fn answers(map: &OwnershipMap) -> Vec<Attribution> {
    all_lookups()
        .map(|(ip, port, t)| map.attribute(ip, port, ns(t)))
        .collect()
}

fn apply(map: &mut OwnershipMap, model: &mut ReferenceModel, op: &Op) {
    match op {
        Op::Insert(heartbeat) => {
            map.insert(*heartbeat).unwrap();
            model.insert(heartbeat);
        }
        Op::Evict(now) => {
            map.evict(ns(*now));
            model.evict(*now);
        }
        Op::Compact => map.compact_now(),
    }
    map.check_invariants();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn map_agrees_with_reference_model(ops in arb_ops(), (slack, merge_gap, retention) in arb_knobs(), reuse_guard in any::<bool>()) {
        let mut map = tiny_map_guarded(slack, merge_gap, retention, SEGMENTS_PER_KEY_LIMIT, reuse_guard);
        let mut model = ReferenceModel::new(slack, merge_gap, retention);
        model.reuse_guard = reuse_guard;
        for op in &ops {
            apply(&mut map, &mut model, op);
        }
        for (ip, port, t) in all_lookups() {
            prop_assert_eq!(map.attribute(ip, port, ns(t)), model.attribute(ip, port, t), "{} port {} at {}", ip, port, t);
        }
        // A contested segment names exactly the owners with evidence inside it.
        for (key, segments) in map.snapshot() {
            for segment in segments.iter().filter(|segment| segment.holder() == Holder::Contested) {
                let claimants = map.claimants_of_key(key, segment);
                let named: std::collections::BTreeSet<WorkloadId> =
                    claimants.owners.iter().map(|&(owner, _)| owner).collect();
                let expected = model.owners_during(key, segment.start.as_nanos(), segment.end.as_nanos() - 1);
                prop_assert!(expected.len() >= 2, "{:?} {:?}", key, segment);
                prop_assert_eq!(named, expected, "{:?} {:?}", key, segment);
                prop_assert!(claimants.complete);
            }
        }
    }

    #[test]
    fn order_and_duplicates_never_change_the_state(
        heartbeats in proptest::collection::vec(arb_heartbeat(), 0..30),
        permutation_seed in any::<u64>(),
        duplicates in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        (slack, merge_gap, _) in arb_knobs(),
    ) {
        // The guard learns from the order evidence came in (a handover seen before a contested
        // span filled it stays seen); without it, answers are a function of the evidence alone.
        let mut in_order = tiny_map_guarded(slack, merge_gap, 1_000, SEGMENTS_PER_KEY_LIMIT, false);
        for heartbeat in &heartbeats {
            in_order.insert(*heartbeat).unwrap();
        }
        let mut shuffled: Vec<Heartbeat> = heartbeats.clone();
        if !heartbeats.is_empty() {
            shuffled.extend(duplicates.iter().map(|index| heartbeats[index.index(heartbeats.len())]));
        }
        fastrand::Rng::with_seed(permutation_seed).shuffle(&mut shuffled);
        let mut reordered = tiny_map_guarded(slack, merge_gap, 1_000, SEGMENTS_PER_KEY_LIMIT, false);
        for heartbeat in &shuffled {
            reordered.insert(*heartbeat).unwrap();
        }
        reordered.check_invariants();
        prop_assert_eq!(in_order.snapshot(), reordered.snapshot());
        prop_assert_eq!(answers(&in_order), answers(&reordered));
    }

    #[test]
    fn an_owner_always_has_evidence_within_slack_plus_merge_gap(
        heartbeats in proptest::collection::vec(arb_heartbeat(), 0..30),
        (slack, merge_gap, _) in arb_knobs(),
    ) {
        let mut map = tiny_map(slack, merge_gap, 1_000, SEGMENTS_PER_KEY_LIMIT);
        for heartbeat in &heartbeats {
            map.insert(*heartbeat).unwrap();
        }
        for (ip, port, t) in all_lookups() {
            if let Attribution::Owner(owner) = map.attribute(ip, port, ns(t)) {
                let near = heartbeats.iter().any(|h| {
                    let distance = if t < h.start.as_nanos() { h.start.as_nanos() - t } else { t.saturating_sub(h.end.as_nanos()) };
                    h.ip == ip && h.owner == Some(owner) && distance <= slack + merge_gap
                });
                prop_assert!(near, "{:?} answered for {} port {} at {} without evidence nearby", owner, ip, port, t);
            }
        }
    }

    #[test]
    fn eviction_never_turns_an_owner_into_another(
        heartbeats in proptest::collection::vec(arb_heartbeat(), 0..30),
        now in 0..DOMAIN + 60,
        (slack, merge_gap, retention) in arb_knobs(),
    ) {
        let mut map = tiny_map(slack, merge_gap, retention, SEGMENTS_PER_KEY_LIMIT);
        for heartbeat in &heartbeats {
            map.insert(*heartbeat).unwrap();
        }
        let before = answers(&map);
        map.evict(ns(now));
        map.check_invariants();
        for (old, new) in before.iter().zip(answers(&map)) {
            prop_assert!(new == *old || matches!(new, Attribution::Unattributed(_)), "{:?} became {:?}", old, new);
        }
    }

    #[test]
    fn bounded_keys_forget_but_never_misattribute(
        heartbeats in proptest::collection::vec(arb_heartbeat(), 0..40),
        segments_per_key_max in 1usize..4,
        (slack, merge_gap, _) in arb_knobs(),
    ) {
        let mut map = tiny_map(slack, merge_gap, 1_000, segments_per_key_max);
        // Unguarded: a bounded key forgets handovers the full one keeps, so the guarded maps
        // differ in what they bridge; neither bridges more than merge_gap.
        let mut model = ReferenceModel::new(slack, merge_gap, 1_000);
        model.reuse_guard = false;
        for heartbeat in &heartbeats {
            map.insert(*heartbeat).unwrap();
            model.insert(heartbeat);
            map.check_invariants();
        }
        for (ip, port, t) in all_lookups() {
            let (bounded, truth) = (map.attribute(ip, port, ns(t)), model.attribute(ip, port, t));
            prop_assert!(bounded == truth || matches!(bounded, Attribution::Unattributed(_)), "{} port {} at {}: {:?} vs {:?}", ip, port, t, bounded, truth);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn the_reuse_guard_only_ever_withholds_a_bridge(
        heartbeats in proptest::collection::vec(arb_heartbeat(), 0..30),
        (slack, merge_gap, _) in arb_knobs(),
    ) {
        let mut guarded = tiny_map_guarded(slack, merge_gap, 1_000, SEGMENTS_PER_KEY_LIMIT, true);
        let mut unguarded = tiny_map_guarded(slack, merge_gap, 1_000, SEGMENTS_PER_KEY_LIMIT, false);
        for heartbeat in &heartbeats {
            guarded.insert(*heartbeat).unwrap();
            unguarded.insert(*heartbeat).unwrap();
        }
        for ((with, without), (ip, port, t)) in answers(&guarded).into_iter().zip(answers(&unguarded)).zip(all_lookups()) {
            prop_assert!(
                with == without || (with == Attribution::Unattributed(Reason::NoEvidence) && matches!(without, Attribution::Owner(_))),
                "{} port {} at {}: {:?} guarded, {:?} not", ip, port, t, with, without
            );
        }
    }
}

// ---- the worked examples of docs/attribution.md, in seconds with the default config ----

const GATEWAY: u32 = 1;
const BILLING: u32 = 2;

fn secs(seconds: f64) -> Timestamp {
    Timestamp::from_nanos((seconds * 1e9) as u64)
}

/// A heartbeat with times in seconds.
fn beat_on(ip: CanonicalIp, port: u16, owner: u32, start: f64, end: f64) -> Heartbeat {
    Heartbeat {
        ip,
        port,
        owner: Some(w(owner)),
        start: secs(start),
        end: secs(end),
        source: SourceId::UNKNOWN,
    }
}

fn beat(ip_last: u8, owner: u32, start: f64, end: f64) -> Heartbeat {
    beat_on(ip(ip_last), 0, owner, start, end)
}

fn default_map(heartbeats: &[Heartbeat]) -> OwnershipMap {
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    for heartbeat in heartbeats {
        map.insert(*heartbeat).unwrap();
    }
    map.check_invariants();
    map
}

fn at(map: &OwnershipMap, seconds: f64) -> Attribution {
    map.attribute(ip(5), 443, secs(seconds))
}

const UNATTRIBUTED_NO_EVIDENCE: Attribution = Attribution::Unattributed(Reason::NoEvidence);

#[test]
fn example_1_a_reassigned_ip_answers_by_time() {
    let map = default_map(&[beat(5, GATEWAY, 0.0, 300.0), beat(5, BILLING, 330.0, 600.0)]);
    assert_eq!(at(&map, 180.0), Attribution::Owner(w(GATEWAY)));
    assert_eq!(at(&map, 420.0), Attribution::Owner(w(BILLING)));
    assert_eq!(
        at(&map, 310.0),
        UNATTRIBUTED_NO_EVIDENCE,
        "30 s between two owners is never bridged"
    );
}

#[test]
fn example_2_late_heartbeats_change_nothing() {
    let in_order = default_map(&[beat(5, GATEWAY, 0.0, 300.0), beat(5, BILLING, 330.0, 600.0)]);
    let late = default_map(&[
        beat(5, BILLING, 330.0, 600.0),
        beat(5, GATEWAY, 0.0, 300.0),
        beat(5, BILLING, 330.0, 600.0),
    ]);
    assert_eq!(in_order.snapshot(), late.snapshot());
}

#[test]
fn example_3_a_handover_inside_the_window_is_ambiguous() {
    let map = default_map(&[beat(5, GATEWAY, 0.0, 100.0), beat(5, BILLING, 100.4, 200.0)]);
    assert_eq!(
        at(&map, 100.2),
        Attribution::Unattributed(Reason::Ambiguous)
    );
    assert_eq!(at(&map, 98.0), Attribution::Owner(w(GATEWAY)));
    assert_eq!(at(&map, 101.5), Attribution::Owner(w(BILLING)));
}

#[test]
fn example_4_two_claims_at_once_are_a_conflict() {
    let map = default_map(&[beat(5, GATEWAY, 0.0, 100.0), beat(5, BILLING, 50.0, 150.0)]);
    assert_eq!(at(&map, 75.0), Attribution::Unattributed(Reason::Conflict));
    assert_eq!(at(&map, 25.0), Attribution::Owner(w(GATEWAY)));
    assert_eq!(at(&map, 125.0), Attribution::Owner(w(BILLING)));
    assert_eq!(
        at(&map, 49.5),
        Attribution::Unattributed(Reason::Conflict),
        "the window reaches the contested span"
    );
}

#[test]
fn example_5_a_short_gap_of_one_owner_is_bridged_a_mixed_one_is_not() {
    let same = default_map(&[beat(5, GATEWAY, 0.0, 60.0), beat(5, GATEWAY, 63.0, 120.0)]);
    assert_eq!(at(&same, 61.5), Attribution::Owner(w(GATEWAY)));
    let mixed = default_map(&[beat(5, GATEWAY, 0.0, 60.0), beat(5, BILLING, 63.0, 120.0)]);
    assert_eq!(at(&mixed, 61.5), UNATTRIBUTED_NO_EVIDENCE);
}

#[test]
fn example_6_a_long_gap_is_not_bridged() {
    let map = default_map(&[beat(5, GATEWAY, 0.0, 60.0), beat(5, GATEWAY, 70.0, 120.0)]);
    assert_eq!(at(&map, 65.0), UNATTRIBUTED_NO_EVIDENCE);
}

#[test]
fn example_7_evicted_time_answers_expired() {
    let mut map = default_map(&[beat(5, GATEWAY, 0.0, 7200.0)]);
    assert_eq!(at(&map, 1800.0), Attribution::Owner(w(GATEWAY)));
    map.evict(secs(7200.0));
    assert_eq!(at(&map, 1800.0), Attribution::Unattributed(Reason::Expired));
    assert_eq!(at(&map, 5400.0), Attribution::Owner(w(GATEWAY)));
    assert_eq!(
        map.segments(ip(5), 0)[0].start,
        secs(3600.0),
        "the straddling segment is cut at the horizon"
    );
    assert_eq!(
        map.insert(beat(5, BILLING, 0.0, 1000.0)).unwrap(),
        InsertOutcome::Expired
    );
}

#[test]
fn example_8_a_shared_nat64_address_is_owned_per_port() {
    let nat = CanonicalIp::from(Ipv4Addr::new(203, 0, 113, 7));
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    for (port, owner) in [(40_000, GATEWAY), (40_001, BILLING)] {
        map.insert(beat_on(nat, port, owner, 0.0, 60.0)).unwrap();
    }
    assert_eq!(
        map.attribute(nat, 40_000, secs(30.0)),
        Attribution::Owner(w(GATEWAY))
    );
    assert_eq!(
        map.attribute(nat, 40_001, secs(30.0)),
        Attribution::Owner(w(BILLING))
    );
    assert_eq!(
        map.attribute(nat, 40_002, secs(30.0)),
        UNATTRIBUTED_NO_EVIDENCE
    );
}

/// A heartbeat of a holder its exporter could not name, times in seconds.
fn unnamed_beat(ip_last: u8, start: f64, end: f64) -> Heartbeat {
    Heartbeat {
        owner: None,
        ..beat(ip_last, 0, start, end)
    }
}

#[test]
fn example_10_unnamed_evidence_is_someone_and_never_lets_the_next_owner_answer() {
    // The gateway's last seconds went unnamed (its agent restarted, or its pod was past the
    // platform's last listing); billing got the address half a second later.
    let map = default_map(&[
        beat(5, GATEWAY, 0.0, 90.0),
        unnamed_beat(5, 50.0, 100.0),
        beat(5, BILLING, 100.5, 200.0),
    ]);
    assert_eq!(
        at(&map, 99.8),
        Attribution::Unattributed(Reason::Ambiguous),
        "not billing"
    );
    assert_eq!(at(&map, 95.0), Attribution::Unattributed(Reason::Unnamed));
    assert_eq!(
        at(&map, 60.0),
        Attribution::Owner(w(GATEWAY)),
        "someone, where the gateway held it, is the gateway"
    );
    assert_eq!(at(&map, 102.0), Attribution::Owner(w(BILLING)));
    // Never bridged: the gap next to unnamed time could hide a handover.
    let gap = default_map(&[
        beat(5, GATEWAY, 0.0, 60.0),
        unnamed_beat(5, 59.0, 61.0),
        beat(5, GATEWAY, 64.0, 120.0),
    ]);
    assert_eq!(at(&gap, 62.5), UNATTRIBUTED_NO_EVIDENCE);
    // Nor a handover: an owner's own unnamed first moments would read as one of no length.
    let start = default_map(&[
        unnamed_beat(5, 100.0, 100.25),
        beat(5, BILLING, 100.25, 200.0),
    ]);
    assert_eq!(start.reuse().shortest_handover, None);
    assert_eq!(
        at(&start, 101.0),
        Attribution::Unattributed(Reason::Ambiguous)
    );
    assert_eq!(at(&start, 101.5), Attribution::Owner(w(BILLING)));
}

#[test]
fn example_9_ipv6_and_ipv4_mapped_addresses_are_one_key() {
    let v6 = CanonicalIp::from("2001:db8::5".parse::<std::net::IpAddr>().unwrap());
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    map.insert(beat_on(v6, 0, GATEWAY, 0.0, 10.0)).unwrap();
    map.insert(beat(5, BILLING, 0.0, 10.0)).unwrap();
    let mapped = CanonicalIp::from("::ffff:10.0.0.5".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(
        map.attribute(v6, 443, secs(5.0)),
        Attribution::Owner(w(GATEWAY))
    );
    assert_eq!(
        map.attribute(mapped, 443, secs(5.0)),
        Attribution::Owner(w(BILLING))
    );
}

#[test]
fn a_backwards_heartbeat_is_refused() {
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    let error = map.insert(beat(5, GATEWAY, 10.0, 9.0)).unwrap_err();
    assert_eq!(
        error,
        HeartbeatError::EndBeforeStart {
            start: secs(10.0),
            end: secs(9.0)
        }
    );
    assert_eq!(map.key_count(), 0);
}

#[test]
fn evicting_everything_frees_keys_and_recycles_their_blocks() {
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    for last in 0..100 {
        for k in 0..4 {
            map.insert(beat(
                last,
                GATEWAY,
                k as f64 * 100.0,
                k as f64 * 100.0 + 50.0,
            ))
            .unwrap();
        }
    }
    assert_eq!(map.memory_usage().segments, 400);
    // Each key grew through blocks of 1 and 2 segments on its way to 4, and each next key's
    // growth reused them: only the last key's outgrown blocks are left free.
    let free_after_growth = map.free_segment_slots();
    assert_eq!(free_after_growth, 1 + 2);
    map.evict(secs(10_000.0));
    assert_eq!(map.key_count(), 0);
    assert_eq!(map.free_segment_slots(), free_after_growth + 400);
    let bytes_after_eviction = map.memory_usage().bytes();
    for last in 0..100 {
        for k in 0..4 {
            map.insert(beat(
                last,
                GATEWAY,
                10_000.0 + k as f64 * 100.0,
                10_050.0 + k as f64 * 100.0,
            ))
            .unwrap();
        }
    }
    assert_eq!(map.free_segment_slots(), free_after_growth);
    assert_eq!(
        map.memory_usage().bytes(),
        bytes_after_eviction,
        "refilling reuses the freed blocks"
    );
}

#[test]
fn maintenance_compacts_blocks_outgrown_in_lockstep() {
    // Every key gains one segment per round, as IPs do per heartbeat period: the 1- and
    // 2-segment blocks they outgrow are never wanted again.
    let mut map = OwnershipMap::new(OwnershipConfig::default());
    for k in 0..4 {
        for last in 0..=255u8 {
            for third in 0..8u8 {
                let ip = CanonicalIp::from(Ipv4Addr::new(10, 1, third, last));
                let start = k as f64 * 100.0;
                map.insert(beat_on(ip, 0, u32::from(last), start, start + 50.0))
                    .unwrap();
            }
        }
    }
    let before = (map.snapshot(), map.memory_usage());
    assert_eq!(map.free_segment_slots(), 2048 * (1 + 2));
    map.evict(secs(100.0));
    map.check_invariants();
    assert_eq!(map.free_segment_slots(), 0);
    assert_eq!(
        map.snapshot(),
        before.0,
        "compaction moves segments, never changes them"
    );
    assert!(
        map.memory_usage().bytes() < before.1.bytes(),
        "{:?} -> {:?}",
        before.1,
        map.memory_usage()
    );
}
