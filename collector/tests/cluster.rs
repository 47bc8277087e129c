//! A region of collector nodes sharing ownership over a real Kafka-compatible broker (Tansu,
//! as the Kafka sink's test uses): three nodes as separate processes; any node attributes
//! flows from heartbeats that only its peers received.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flowattr_bench::dashboard::{DASHBOARD, exports, expressions, series_names};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{
    Collector, batch_of, closed_flow, host_batch as batch, host_ip as ip, produce_raw, send,
    start_broker, start_node, wait_for_flows, wait_for_records, wait_for_watermark, wait_ready,
};

#[test]
fn any_node_attributes_from_heartbeats_only_its_peers_received_and_a_restarted_node_rebuilds() {
    let (_broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Collector> = (1..=3)
        .map(|id| start_node(dir.path(), &brokers, id, &[]))
        .collect();
    for node in &nodes {
        wait_ready(node);
    }
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    // Billing (10.7.0.2) reports only to node 2, dns (10.7.0.3) only to node 3.
    send(&nodes[1], &batch(20, 0, 2, "billing", t0, &[(9, 1, 20)]));
    send(&nodes[2], &batch(30, 0, 3, "dns", t0, &[(9, 1, 20)]));
    // api's flows to both reach node 1 only.
    send(
        &nodes[0],
        &batch(10, 0, 1, "api", t0, &[(2, 5, 6), (3, 5, 6)]),
    );
    // A flow to cache (10.7.0.4) whose heartbeat reaches node 2 a second later: within the delay.
    send(&nodes[0], &batch(10, 1, 1, "api", t0, &[(4, 8, 9)]));
    std::thread::sleep(Duration::from_secs(1));
    send(&nodes[1], &batch(40, 0, 4, "cache", t0, &[(9, 2, 25)]));

    let records = wait_for_records(&nodes[0].output, 3);
    let remote = |key| records[&key]["remote_workload"].as_str().map(str::to_owned);
    assert_eq!(
        remote((10, 0, 0)).as_deref(),
        Some("billing"),
        "{records:?}"
    );
    assert_eq!(remote((10, 0, 1)).as_deref(), Some("dns"), "{records:?}");
    assert_eq!(remote((10, 1, 0)).as_deref(), Some("cache"), "{records:?}");
    assert!(nodes[0].metric("flowattr_broadcast_consumed_messages_total", None) > 0);
    assert!(nodes[1].metric("flowattr_broadcast_published_updates_total", None) >= 2);

    // Node 1 dies without a word and comes back with an empty map: before any new heartbeat
    // arrives, it rebuilds billing's and dns's evidence from the topic.
    let mut nodes = nodes.into_iter();
    nodes.next().unwrap().kill();
    let restarted = start_node(dir.path(), &brokers, 1, &[]);
    wait_ready(&restarted);
    assert_eq!(restarted.metric("flowattr_broadcast_caught_up", None), 1);
    send(
        &restarted,
        &batch(10, 2, 1, "api", t0, &[(2, 10, 11), (3, 10, 11)]),
    );
    // The killed node's last segments replay too: their flows may come out again.
    let records = wait_for_flows(&restarted.output, &[(10, 2, 0), (10, 2, 1)]);
    assert_eq!(
        records[&(10, 2, 0)]["remote_workload"],
        "billing",
        "{records:?}"
    );
    assert_eq!(
        records[&(10, 2, 1)]["remote_workload"],
        "dns",
        "{records:?}"
    );
}

#[test]
fn bad_broadcast_messages_are_counted_and_skipped_and_a_peers_good_one_is_applied() {
    use flowattr_common::wire::{
        FrameKind, RangeUpdate, RangeUpdateBatch, Span, encode_frame, encode_message,
    };
    let (_broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &brokers, 1, &["--storage", "memory"]);
    wait_ready(&node);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    let update = |ip: CanonicalIp, start, end| RangeUpdate {
        ip,
        port: 0,
        owner: 0,
        spans: vec![Span { start, end }],
    };
    let peer = RangeUpdateBatch {
        origin_node: 99,
        workloads: vec!["peer-svc".into()],
        updates: vec![
            update(ip(50), at(1), at(20)),
            // Loopback is one per host: no peer speaks for it.
            update(CanonicalIp::from(Ipv4Addr::LOCALHOST), at(1), at(20)),
            // Ten years ahead.
            update(
                ip(51),
                at(1),
                Timestamp::now().saturating_add(Duration::from_secs(315_360_000)),
            ),
        ],
    };
    let mut good = Vec::new();
    encode_message(&peer, &mut good).unwrap();
    let mut wrong_kind = Vec::new();
    encode_frame(FrameKind::FlowBatch, &[0xAB; 32], &mut wrong_kind).unwrap();
    let mut oversized = good[..16].to_vec();
    oversized[8..12].copy_from_slice(&(64u32 << 20).to_le_bytes());
    produce_raw(&brokers, "flowattr-ownership", b"not a frame at all");
    produce_raw(&brokers, "flowattr-ownership", &good[..good.len() - 3]);
    produce_raw(&brokers, "flowattr-ownership", &oversized);
    produce_raw(&brokers, "flowattr-ownership", &wrong_kind);
    produce_raw(&brokers, "flowattr-ownership", &good);
    let rejected = |reason: &str| {
        node.metric(
            "flowattr_broadcast_rejected_total",
            Some(&format!("reason=\"{reason}\"")),
        )
    };
    node.wait_for_metric(
        "flowattr_broadcast_rejected_total",
        Some("reason=\"from_the_future\""),
        1,
    );
    assert_eq!(rejected("bad_frame"), 2, "garbage and a truncated frame");
    assert_eq!(rejected("too_large"), 1);
    assert_eq!(rejected("bad_payload"), 1);
    assert_eq!(rejected("host_local"), 1);
    assert_eq!(rejected("from_the_future"), 1);
    // The node goes on, and the good update of the good message counts.
    send(
        &node,
        &batch(10, 0, 1, "api", t0, &[(50, 5, 6), (51, 5, 6)]),
    );
    let records = wait_for_records(&node.output, 2);
    assert_eq!(
        records[&(10, 0, 0)]["remote_workload"],
        "peer-svc",
        "{records:?}"
    );
    assert_eq!(
        records[&(10, 0, 1)]["unattributed"],
        "no_evidence",
        "{records:?}"
    );
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn with_the_broker_away_longer_than_the_delay_nothing_is_misattributed_and_broadcast_resumes() {
    let (broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Collector> = (1..=2)
        .map(|id| start_node(dir.path(), &brokers, id, &["--storage", "memory"]))
        .collect();
    for node in &nodes {
        wait_ready(node);
    }
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(60));
    // 10.7.0.60 was "old"'s, and every node knows it.
    send(&nodes[1], &batch(20, 0, 60, "old", t0, &[(9, 1, 10)]));
    send(&nodes[0], &batch(10, 0, 1, "api", t0, &[(60, 5, 6)]));
    let records = wait_for_records(&nodes[0].output, 1);
    assert_eq!(records[&(10, 0, 0)]["remote_workload"], "old");

    // The broker stops answering for twice the delay. Meanwhile 10.7.0.60 passes to "new",
    // whose heartbeats reach node 2 only, and node 1 sees a flow to it.
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    send(&nodes[1], &batch(30, 0, 60, "new", t0, &[(9, 20, 45)]));
    send(&nodes[0], &batch(10, 1, 1, "api", t0, &[(60, 30, 31)]));
    let records = wait_for_records(&nodes[0].output, 2);
    assert_eq!(
        records[&(10, 1, 0)]["remote_workload"],
        serde_json::Value::Null,
        "never the old owner: {records:?}"
    );
    assert_eq!(records[&(10, 1, 0)]["unattributed"], "no_evidence");
    // Neither reading nor publishing goes on: both are said, and the node stays ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = nodes[0].get("/healthz");
        if body.contains("degraded: this node has read topic flowattr-ownership only through")
            && body.contains("have acked none")
        {
            assert_eq!(status, 200, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A node started now cannot read the topic's history: it starts, and says it is not ready.
    let late = start_node(dir.path(), &brokers, 3, &["--storage", "memory"]);
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = late.get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("catching up"), "{body}");
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGCONT) },
        0
    );
    wait_ready(&late);

    // Node 2's backlog goes out: node 1 learns "new", and the lag falls back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sequence = 2;
    loop {
        send(
            &nodes[0],
            &batch(10, sequence, 1, "api", t0, &[(60, 40, 41)]),
        );
        let records = wait_for_records(&nodes[0].output, sequence as usize + 1);
        let remote = records[&(10, sequence, 0)]["remote_workload"].clone();
        if remote == "new" {
            break;
        }
        assert_eq!(
            remote,
            serde_json::Value::Null,
            "unattributed or right, never wrong: {records:?}"
        );
        assert!(
            Instant::now() < deadline,
            "node 1 never learned the new owner"
        );
        sequence += 1;
    }
    // The histogram is cumulative: the lag now is that of the messages read between two
    // scrapes (peers publish their watermarks every interval, so there are some).
    let deadline = Instant::now() + Duration::from_secs(60);
    let lag = || {
        let series = |name: &str| nodes[0].gauge(name).unwrap_or_default();
        (
            series("flowattr_broadcast_lag_seconds_bucket{le=\"2.5\"}"),
            series("flowattr_broadcast_lag_seconds_count"),
        )
    };
    let mut before = lag();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = lag();
        let (quick, read) = (now.0 - before.0, now.1 - before.1);
        if read > 0.0 && quick >= 0.99 * read {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lag never fell back: {quick} of {read} messages read within 2.5 s"
        );
        before = now;
    }
    // Node 2's stream is complete again once all it sent during the outage is delivered.
    let deadline = Instant::now() + Duration::from_secs(90);
    while nodes[0].get("/healthz").1.contains("degraded") {
        assert!(Instant::now() < deadline, "{}", nodes[0].get("/healthz").1);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_peer_that_stops_publishing_is_reported_on_healthz_and_metrics() {
    let (_broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        "[cluster]\npeer_silence = \"2s\"\npeer_timeout = \"12s\"\n",
    )
    .unwrap();
    let args = ["--storage", "memory", "--config", config.to_str().unwrap()];
    let nodes: Vec<Collector> = (1..=2)
        .map(|id| start_node(dir.path(), &brokers, id, &args))
        .collect();
    for node in &nodes {
        wait_ready(node);
    }
    // Both publish at least once per interval: each hears from the other.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes[0]
        .get("/metrics")
        .1
        .contains("flowattr_broadcast_peer_silence_seconds{peer=\"2\"}")
    {
        assert!(Instant::now() < deadline, "node 1 never heard from node 2");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_watermark(&nodes[0], 2);
    assert!(
        !nodes[0].get("/healthz").1.contains("degraded"),
        "{}",
        nodes[0].get("/healthz").1
    );
    // The Grafana dashboard's region panels read only series a node of a region exports, and
    // its text keeps Prometheus' conventions (exporter/tests/metrics.rs checks the rest).
    let text = nodes[0].get("/metrics").1;
    flowattr_bench::dashboard::check_metrics(&text)
        .unwrap_or_else(|said| panic!("promtool: {said}"));
    for expression in expressions(DASHBOARD) {
        for name in series_names(&expression)
            .into_iter()
            .filter(|name| name.starts_with("flowattr_broadcast_"))
        {
            assert!(
                exports(&text, name),
                "the dashboard's {expression:?} reads {name}, which a node of a region does not export"
            );
        }
    }
    let mut nodes = nodes.into_iter();
    let first = nodes.next().unwrap();
    nodes.next().unwrap().kill();
    // 10.7.0.70 is claimed by a host that reports to node 1 only.
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(3));
    send(&first, &batch(70, 0, 70, "solo", t0, &[(9, 0, 3)]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = first.get("/healthz");
        if body.contains("degraded: peer 2 silent") {
            // Still ready: it attributes less, never wrongly, and says so.
            assert_eq!(status, 200, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent peer was never reported: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let silence = first.get("/metrics").1;
    let seconds: f64 = silence
        .lines()
        .find_map(|line| line.strip_prefix("flowattr_broadcast_peer_silence_seconds{peer=\"2\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(seconds > 2.0, "{seconds}");

    // A flow to it waits for node 2's evidence, and comes out incomplete; once node 2 has
    // been silent for cluster.peer_timeout it is forgotten, and the same flow is named.
    send(&first, &batch(71, 0, 1, "api", t0, &[(70, 1, 2)]));
    let records = wait_for_records(&first.output, 2);
    assert_eq!(
        records[&(71, 0, 0)]["unattributed"],
        "incomplete",
        "{records:?}"
    );
    first.wait_for_metric("flowattr_broadcast_peers_forgotten_total", None, 1);
    send(&first, &batch(71, 1, 1, "api", t0, &[(70, 1, 2)]));
    let records = wait_for_records(&first.output, 3);
    assert_eq!(
        records[&(71, 1, 0)]["remote_workload"],
        "solo",
        "{records:?}"
    );
    assert!(
        !first.get("/healthz").1.contains("degraded"),
        "{}",
        first.get("/healthz").1
    );
}

#[test]
fn past_the_publish_backlog_bound_updates_are_dropped_and_counted_and_publishing_resumes() {
    let (broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "[cluster]\npublish_backlog_bytes = 65536\n").unwrap();
    let node = start_node(
        dir.path(),
        &brokers,
        1,
        &["--storage", "memory", "--config", config.to_str().unwrap()],
    );
    wait_ready(&node);
    node.wait_for_metric("flowattr_broadcast_published_messages_total", None, 1);

    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    // 20,000 IPs, each a range update of its own: ~1 MB of updates for a 64 KiB backlog.
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    for sequence in 0..10u64 {
        let flows = (0..2_000u64)
            .map(|index| {
                let n = sequence * 2_000 + index;
                let local = CanonicalIp::from(Ipv4Addr::new(10, 8, (n >> 8) as u8, n as u8));
                closed_flow((local, 40_000), (ip(9), 443), Some(0), at(1), at(2))
            })
            .collect();
        send(&node, &batch_of(40, sequence, "fleet", flows));
    }
    node.wait_for_metric("flowattr_broadcast_dropped_updates_total", None, 1);
    let backlog = node.metric("flowattr_broadcast_backlog_bytes", None);
    assert!(
        backlog <= 65_536,
        "the backlog holds {backlog} bytes past its 64 KiB bound"
    );
    // The node kept attributing what it knows throughout.
    assert_eq!(node.get("/healthz").0, 200);

    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGCONT) },
        0
    );
    send(&node, &batch(40, 10, 7, "late", t0, &[(9, 3, 4)]));
    // Every update is published or counted as dropped, and the backlog drains.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (published, dropped) = loop {
        let published = node.metric("flowattr_broadcast_published_updates_total", None);
        let dropped = node.metric("flowattr_broadcast_dropped_updates_total", None);
        if published + dropped >= 20_001
            && node.metric("flowattr_broadcast_backlog_bytes", None) == 0
        {
            break (published, dropped);
        }
        assert!(
            Instant::now() < deadline,
            "{published} published and {dropped} dropped of 20,001"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(published + dropped, 20_001);
    assert!(
        published > 1 && dropped > 1,
        "{published} published, {dropped} dropped"
    );
}

/// A topic made by someone else with too short a retention is said at start: a restarted node
/// would learn less than a long-running one knows.
#[test]
fn a_broadcast_topic_that_keeps_too_little_is_reported_at_start() {
    let (broker, brokers) = start_broker(&[]);
    let made =
        std::process::Command::new(flowattr_bench::process::Broker::binary_from_env().unwrap())
            .args([
                "topic",
                "create",
                "flowattr-ownership",
                "--partitions",
                "16",
                "--config",
                "retention.ms=1000",
                "--broker",
            ])
            .arg(format!("tcp://{}", broker.address))
            .status()
            .unwrap();
    assert!(made.success());
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), &brokers, 1, &["--storage", "memory"]);
    let line = node.wait_for_log("topic flowattr-ownership keeps messages 1000 ms");
    assert!(
        line.contains("WARN") && line.contains("set its retention.ms to at least"),
        "{line}"
    );
}
