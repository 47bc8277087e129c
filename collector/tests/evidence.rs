//! The trust boundary, against the collector binary: claims no host could make (a clock years
//! ahead, a record repeated in its batch, evidence older than retention) are refused record by
//! record and counted per exporter, and host-local addresses are never evidence for another host.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use flowattr_common::wire::{
    AckStatus, CLOCK_PROBE_SEQUENCE, ClockReading, ClockedFlowBatch, ExporterId, FlowBatch,
    FlowRecord, RecordRefusal, RefusedRecord, encode_message,
};
use flowattr_common::{CanonicalIp, Direction, Timestamp};
use support::{Collector, closed_flow, read_output, wait_for_records};

fn flow(
    local: (&str, u16),
    remote: (&str, u16),
    workload: u32,
    start: Timestamp,
    end: Timestamp,
) -> FlowRecord {
    let ip = |text: &str| CanonicalIp::from(text.parse::<IpAddr>().unwrap());
    closed_flow(
        (ip(local.0), local.1),
        (ip(remote.0), remote.1),
        Some(workload),
        start,
        end,
    )
}

fn batch(exporter: u64, workloads: &[&str], flows: Vec<FlowRecord>) -> FlowBatch {
    FlowBatch {
        exporter: ExporterId(exporter),
        sequence: 0,
        region: "test".into(),
        workloads: workloads.iter().map(|name| (*name).to_owned()).collect(),
        flows,
    }
}

fn quick_collector(dir: &std::path::Path) -> Collector {
    Collector::start(
        &dir.join("flows.jsonl"),
        &[
            "--cpus",
            "2",
            "--storage",
            "memory",
            "--delay",
            "1s",
            "--segment-span",
            "200ms",
            "--max-retries",
            "0",
        ],
    )
}

#[test]
fn two_hosts_loopback_flows_never_name_each_others_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let now = Timestamp::now();
    let (start, end) = (
        now.saturating_sub(Duration::from_secs(5)),
        now.saturating_sub(Duration::from_secs(4)),
    );
    // Host A sees both ends of its own loopback connection to its redis.
    let host_a = batch(
        1,
        &["host-a-app", "host-a-redis"],
        vec![
            flow(("127.0.0.1", 40_000), ("127.0.0.1", 6379), 0, start, end),
            FlowRecord {
                direction: Direction::Inbound,
                ..flow(("127.0.0.1", 6379), ("127.0.0.1", 40_000), 1, start, end)
            },
        ],
    );
    // Host B's client talks to its own 127.0.0.1:6379, whose server side it did not report
    // (no agent sees it, or it is in another network namespace).
    let host_b = batch(
        2,
        &["host-b-app"],
        vec![flow(
            ("127.0.0.1", 50_000),
            ("127.0.0.1", 6379),
            0,
            start,
            end,
        )],
    );
    let mut connection = collector.connect();
    for sent in [&host_a, &host_b] {
        let ack = connection.send_and_wait(sent).unwrap();
        assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    }
    let records = wait_for_records(&collector.output, 3);
    let remote = |exporter: u64, index: u64| {
        let record = &records[&(exporter, 0, index)];
        (
            record["remote_workload"].as_str().map(str::to_owned),
            record["unattributed"].as_str().map(str::to_owned),
        )
    };
    assert_eq!(
        remote(1, 0),
        (Some("host-a-redis".into()), None),
        "A's client finds its own redis"
    );
    assert_eq!(
        remote(1, 1),
        (Some("host-a-app".into()), None),
        "and A's redis its own client"
    );
    assert_eq!(
        remote(2, 0),
        (None, Some("host_local".into())),
        "B's flow is never A's redis"
    );
    let (_, owner) = collector.get(&format!(
        "/v1/owner?ip=127.0.0.1&port=6379&at={}",
        start.as_nanos() + 500_000_000
    ));
    let owner: serde_json::Value = serde_json::from_str(&owner).unwrap();
    assert_eq!(owner["unattributed"], "host_local", "{owner}");
    assert_eq!(
        owner["segments"],
        serde_json::json!([]),
        "no fleet-wide evidence for a loopback address: {owner}"
    );
    collector.wait_for_metric(
        "flowattr_flows_emitted_total",
        Some("result=\"host_local\""),
        1,
    );
}

#[test]
fn claims_no_host_could_make_are_refused_one_by_one_and_counted_by_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let now = Timestamp::now();
    let ago = |s: u64| now.saturating_sub(Duration::from_secs(s));
    let ahead = |s: u64| now.saturating_add(Duration::from_secs(s));
    let ten_years = 10 * 365 * 24 * 3600;
    let good = flow(("10.0.0.1", 40_000), ("10.0.0.2", 443), 0, ago(5), ago(4));
    let sent = batch(
        7,
        &["api"],
        vec![
            // A host ten years fast claims 10.0.0.70 until 2036...
            flow(
                ("10.0.0.70", 40_001),
                ("10.0.0.2", 443),
                0,
                ahead(ten_years - 10),
                ahead(ten_years),
            ),
            // ...and a host 12 s fast stamps its tenure into its successor's time.
            flow(
                ("10.0.0.70", 40_002),
                ("10.0.0.2", 443),
                0,
                ago(1),
                ahead(12),
            ),
            good,
            good,
            // Older than the 1 h retention: nothing it says can be kept.
            flow(
                ("10.0.0.71", 40_003),
                ("10.0.0.2", 443),
                0,
                ago(7300),
                ago(7200),
            ),
        ],
    );
    let mut connection = collector.connect();
    let ack = connection.send_and_wait(&sent).unwrap();
    assert_eq!(ack.status, AckStatus::Accepted);
    let refused = |record, reason| RefusedRecord { record, reason };
    assert_eq!(
        ack.refused,
        vec![
            refused(0, RecordRefusal::FromTheFuture),
            refused(1, RecordRefusal::FromTheFuture),
            refused(3, RecordRefusal::Repeated),
            refused(4, RecordRefusal::OlderThanRetention),
        ]
    );
    // The ack tells the exporter the collector's clock, to check its own.
    assert!(
        ack.collector_time
            .as_nanos()
            .abs_diff(Timestamp::now().as_nanos())
            < 5_000_000_000
    );
    assert_eq!(
        ack.max_skew_ns, 1_000_000_000,
        "the skew allowed defaults to the slack"
    );

    // The one good record comes out once; the refused ones never.
    wait_for_records(&collector.output, 1);
    std::thread::sleep(Duration::from_millis(1500));
    let (records, counts) = read_output(&collector.output);
    assert_eq!(counts.len(), 1, "{records:?}");
    assert_eq!(counts[&(7, 0, 2)], 1);
    // No refused record's heartbeat reached the map.
    for ip in ["10.0.0.70", "10.0.0.71"] {
        let (_, owner) = collector.get(&format!(
            "/v1/owner?ip={ip}&at={}",
            ahead(ten_years / 2).as_nanos()
        ));
        let owner: serde_json::Value = serde_json::from_str(&owner).unwrap();
        assert_eq!(owner["segments"], serde_json::json!([]), "{ip}: {owner}");
    }
    let counted = |reason: &str| {
        collector.metric(
            "flowattr_records_refused_total",
            Some(&format!("exporter=\"7\",reason=\"{reason}\"")),
        )
    };
    assert_eq!(counted("from_the_future"), 2);
    assert_eq!(counted("repeated"), 1);
    assert_eq!(counted("older_than_retention"), 1);
}

#[test]
fn one_bad_name_costs_only_the_records_that_carry_it() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let now = Timestamp::now();
    let (start, end) = (
        now.saturating_sub(Duration::from_secs(5)),
        now.saturating_sub(Duration::from_secs(4)),
    );
    let sent = batch(
        8,
        &["bad\tname", "fine"],
        vec![
            flow(("10.0.1.1", 40_000), ("10.0.1.2", 443), 0, start, end),
            flow(("10.0.1.1", 40_001), ("10.0.1.3", 443), 1, start, end),
        ],
    );
    let ack = collector.connect().send_and_wait(&sent).unwrap();
    assert_eq!(ack.status, AckStatus::Accepted);
    assert_eq!(
        ack.refused,
        vec![RefusedRecord {
            record: 0,
            reason: RecordRefusal::BadWorkloadName
        }]
    );
    let records = wait_for_records(&collector.output, 1);
    assert_eq!(records[&(8, 0, 1)]["local_workload"], "fine");
}

/// The node checks the assumption `merge_gap` rests on. Two handovers on one IP within 1 s
/// prove the platform reuses IPs faster than the 5 s merge gap: from then on a 4 s gap of
/// another IP's one owner is not bridged (an owner could have come and gone unseen inside it),
/// the node says so on `/healthz`, and counts it. The same evidence, with the guard off, names
/// the owner across the gap: what the guard prevents.
#[test]
fn a_handover_faster_than_merge_gap_stops_bridging_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let unguarded_config = dir.path().join("unguarded.toml");
    std::fs::write(&unguarded_config, "[ownership]\nreuse_guard = false\n").unwrap();
    let args = [
        "--cpus",
        "2",
        "--storage",
        "memory",
        "--delay",
        "3s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
    ];
    let guarded = Collector::start(&dir.path().join("guarded.jsonl"), &args);
    let unguarded_args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--config", unguarded_config.to_str().unwrap()])
        .collect();
    let unguarded = Collector::start(&dir.path().join("unguarded.jsonl"), &unguarded_args);

    let now = Timestamp::now();
    let ago = |ms: u64| now.saturating_sub(Duration::from_millis(ms));
    // 10.0.5.20: api, a 4 s gap, api again. 10.0.5.30: web, then 1 s later db.
    let evidence = [
        batch(
            1,
            &["api"],
            vec![
                flow(
                    ("10.0.5.20", 40_000),
                    ("10.0.9.9", 443),
                    0,
                    ago(40_000),
                    ago(39_000),
                ),
                flow(
                    ("10.0.5.20", 40_001),
                    ("10.0.9.9", 443),
                    0,
                    ago(35_000),
                    ago(34_000),
                ),
            ],
        ),
        batch(
            2,
            &["web"],
            vec![flow(
                ("10.0.5.30", 40_000),
                ("10.0.9.9", 443),
                0,
                ago(40_000),
                ago(39_000),
            )],
        ),
        batch(
            3,
            &["db"],
            vec![flow(
                ("10.0.5.30", 40_000),
                ("10.0.9.9", 443),
                0,
                ago(38_000),
                ago(37_000),
            )],
        ),
    ];
    // A client's flow to 10.0.5.20 in the middle of api's gap.
    let lookup = batch(
        4,
        &["client"],
        vec![flow(
            ("10.0.5.40", 50_000),
            ("10.0.5.20", 443),
            0,
            ago(37_000),
            ago(36_900),
        )],
    );
    for collector in [&guarded, &unguarded] {
        let mut connection = collector.connect();
        for sent in &evidence {
            assert_eq!(
                connection.send_and_wait(sent).unwrap().status,
                AckStatus::Accepted
            );
        }
        // Every shard has heard of the handover within a second.
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            connection.send_and_wait(&lookup).unwrap().status,
            AckStatus::Accepted
        );
    }
    let answer = |collector: &Collector| {
        let records = wait_for_records(&collector.output, 5);
        let record = &records[&(4, 0, 0)];
        (
            record["remote_workload"].as_str().map(str::to_owned),
            record["unattributed"].as_str().map(str::to_owned),
        )
    };
    assert_eq!(
        answer(&unguarded),
        (Some("api".into()), None),
        "without the guard the gap is bridged"
    );
    assert_eq!(
        answer(&guarded),
        (None, Some("no_evidence".into())),
        "with it, it is not"
    );

    assert!(guarded.metric("flowattr_fast_reuse_total", None) >= 1);
    let (status, health) = guarded.get("/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(
        health.contains("degraded: the platform reuses IPs within ownership.merge_gap"),
        "{health}"
    );
    assert!(
        health.contains("set ownership.merge_gap below 1.000 s"),
        "{health}"
    );
    let (_, metrics) = guarded.get("/metrics");
    assert!(
        metrics.contains("flowattr_ownership_bridged_gap_seconds{shard=\"1\"} 0.999"),
        "every shard bridges less:\n{metrics}"
    );
}

/// What the guard learned survives a restart: a node with disk storage keeps the shortest
/// handover in its data directory, and a restarted one neither bridges the gap it would have
/// bridged before learning it nor stops saying why.
#[test]
fn a_restarted_node_remembers_how_fast_the_platform_reuses_ips() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--cpus",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "3s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
    ];
    let output = dir.path().join("flows.jsonl");
    let collector = Collector::start(&output, &args);
    let now = Timestamp::now();
    let ago = |ms: u64| now.saturating_sub(Duration::from_millis(ms));
    // 10.0.5.30: web, then 1 s later db.
    let mut connection = collector.connect();
    for sent in [
        batch(
            2,
            &["web"],
            vec![flow(
                ("10.0.5.30", 40_000),
                ("10.0.9.9", 443),
                0,
                ago(40_000),
                ago(39_000),
            )],
        ),
        batch(
            3,
            &["db"],
            vec![flow(
                ("10.0.5.30", 40_000),
                ("10.0.9.9", 443),
                0,
                ago(38_000),
                ago(37_000),
            )],
        ),
    ] {
        assert_eq!(
            connection.send_and_wait(&sent).unwrap().status,
            AckStatus::Accepted
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !data.join("shortest-handover").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the handover was never kept"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Released, so that the restart has nothing to replay that would teach it again.
    wait_for_records(&output, 2);
    collector.wait_until_released();
    collector.kill();

    let restarted = Collector::start(&output, &args);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = restarted.get("/healthz");
        if health.contains("the shortest ever 1.000 s") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{health}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        restarted.metric("flowattr_delay_flows_replayed_total", None),
        0
    );
    // api, a 4 s gap, api again, on another IP: a fresh node would bridge it.
    let mut connection = restarted.connect();
    let gap = batch(
        1,
        &["api"],
        vec![
            flow(
                ("10.0.5.20", 40_000),
                ("10.0.9.9", 443),
                0,
                ago(40_000),
                ago(39_000),
            ),
            flow(
                ("10.0.5.20", 40_001),
                ("10.0.9.9", 443),
                0,
                ago(35_000),
                ago(34_000),
            ),
        ],
    );
    let lookup = batch(
        4,
        &["client"],
        vec![flow(
            ("10.0.5.40", 50_000),
            ("10.0.5.20", 443),
            0,
            ago(37_000),
            ago(36_900),
        )],
    );
    for sent in [gap, lookup] {
        assert_eq!(
            connection.send_and_wait(&sent).unwrap().status,
            AckStatus::Accepted
        );
    }
    let records = wait_for_records(&output, 5);
    assert_eq!(
        records[&(4, 0, 0)]["unattributed"],
        "no_evidence",
        "{records:?}"
    );
}

/// The clock guard, against the binary. A host 12 s fast that says so (a clock reading with
/// its batch) is corrected: its record is believed and comes out on this node's clock, its
/// offset is on `/metrics`. A reading uncertain by more than half the slack cannot place the
/// records within the lookup window: refused (`clock_uncertain`), counted, said on `/healthz`.
/// A clock probe is answered at once with this node's time.
#[test]
fn clock_readings_correct_a_hosts_times_or_refuse_them() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let now = Timestamp::now();
    let twelve = Duration::from_secs(12);
    let clocked = |exporter: u64, uncertainty_ns: u64, flows| {
        let mut frame = Vec::new();
        let clock = ClockReading {
            offset_ns: 12_000_000_000,
            uncertainty_ns,
        };
        encode_message(
            &ClockedFlowBatch {
                clock,
                batch: batch(exporter, &["fast"], flows),
            },
            &mut frame,
        )
        .unwrap();
        frame
    };
    // Stamped 12 s ahead: ends 11 s in this node's future, as stamped.
    let (start, end) = (
        now.saturating_add(twelve)
            .saturating_sub(Duration::from_secs(2)),
        now.saturating_add(twelve)
            .saturating_sub(Duration::from_secs(1)),
    );
    let mut connection = collector.connect();

    let (sent, received, probe) = connection.probe_clock().unwrap();
    assert_eq!(
        (probe.sequence, probe.status),
        (CLOCK_PROBE_SEQUENCE, AckStatus::Accepted)
    );
    assert!(
        sent <= probe.collector_time && probe.collector_time <= received,
        "{probe:?}"
    );

    connection
        .send_raw(&clocked(
            21,
            2_000_000,
            vec![flow(("10.0.6.1", 40_000), ("10.0.6.2", 443), 0, start, end)],
        ))
        .unwrap();
    let ack = connection.recv_ack().unwrap();
    assert_eq!(
        (ack.status, ack.refused.len()),
        (AckStatus::Accepted, 0),
        "corrected, not from the future"
    );
    connection
        .send_raw(&clocked(
            22,
            900_000_000,
            vec![flow(("10.0.6.3", 40_000), ("10.0.6.2", 443), 0, start, end)],
        ))
        .unwrap();
    let ack = connection.recv_ack().unwrap();
    assert_eq!(
        ack.refused,
        vec![RefusedRecord {
            record: 0,
            reason: RecordRefusal::ClockUncertain
        }]
    );

    let records = wait_for_records(&collector.output, 1);
    let record = &records[&(21, 0, 0)];
    // Corrected, then cut to the microsecond.
    let micros = |nanos: u64| nanos / 1000 * 1000;
    assert_eq!(
        record["start_ns"].as_u64().unwrap(),
        micros(start.as_nanos() - 12_000_000_000),
        "{record}"
    );
    assert_eq!(
        record["end_ns"].as_u64().unwrap(),
        micros(end.as_nanos() - 12_000_000_000),
        "{record}"
    );
    // Its heartbeat holds the corrected time.
    let (_, owner) = collector.get(&format!(
        "/v1/owner?ip=10.0.6.1&at={}",
        start.as_nanos() - 11_500_000_000
    ));
    assert!(owner.contains("\"owner\":\"fast\""), "{owner}");

    let (_, metrics) = collector.get("/metrics");
    assert!(
        metrics.contains("flowattr_exporter_clock_offset_seconds{exporter=\"21\"} 12"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowattr_exporter_clock_uncertainty_seconds{exporter=\"22\"} 0.9"),
        "{metrics}"
    );
    assert_eq!(
        collector.metric(
            "flowattr_records_refused_total",
            Some("exporter=\"22\",reason=\"clock_uncertain\"")
        ),
        1
    );
    let (status, health) = collector.get("/healthz");
    assert_eq!(status, 200);
    assert!(
        health.contains("degraded: exporter 22 knows its clock only to within 0.900 s"),
        "{health}"
    );
    assert!(!health.contains("exporter 21"), "{health}");
}
