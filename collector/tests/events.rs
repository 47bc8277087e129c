//! The event fallback, against a real broker and the collector binary: IPs that run no
//! exporter (load balancers) are attributed from assign/unassign events with provenance
//! `event`, only inside the fallback CIDRs, only where heartbeats hold no evidence, and only
//! once the event stream is complete through the flow's time.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use flowattr_bench::process::Broker;
use flowattr_common::wire::FlowBatch;
use flowattr_common::{CanonicalIp, Timestamp};
use support::{
    Collector, batch_of, closed_flow, produce_raw, send, start_broker, start_node, wait_for_flows,
    wait_for_records, wait_ready,
};

fn ip(text: &str) -> CanonicalIp {
    CanonicalIp::from(text.parse::<Ipv4Addr>().unwrap())
}

/// One flow per (remote, start s) from `local`, each one second long.
fn batch(
    exporter: u64,
    sequence: u64,
    local: &str,
    workload: &str,
    t0: Timestamp,
    flows: &[(&str, u64)],
) -> FlowBatch {
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    let flows = flows
        .iter()
        .map(|&(remote, start)| {
            closed_flow(
                (ip(local), 40_000),
                (ip(remote), 443),
                Some(0),
                at(start),
                at(start + 1),
            )
        })
        .collect();
    batch_of(exporter, sequence, workload, flows)
}

/// `flowattr-collector events ...`, as an IP-tracking service's hook would run it.
fn event(brokers: &str, args: &[&str], at: Timestamp) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowattr-collector"))
        .args([
            "events",
            "--to",
            brokers,
            "--at",
            &at.as_nanos().to_string(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The watermark the IP-tracking service of these tests (producer `ipam`) publishes.
fn watermark(brokers: &str, at: Timestamp) {
    event(brokers, &["watermark", "ipam"], at);
}

/// A broker with no topics, and a ready node on it whose event fallback covers 10.8.0.0/16,
/// with `events` added to its `[events]` section and `extra` flags after the cluster's.
fn events_node(events: &str, extra: &[&str]) -> (Broker, String, tempfile::TempDir, Collector) {
    let (broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[events]\nfallback_cidrs = [\"10.8.0.0/16\"]\n{events}\n"),
    )
    .unwrap();
    let mut args = vec!["--storage", "memory", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let node = start_node(dir.path(), &brokers, 1, &args);
    wait_ready(&node);
    (broker, brokers, dir, node)
}

/// [`events_node`] with `ipam` publishing watermarks.
fn fallback_node_with(extra: &[&str]) -> (Broker, String, tempfile::TempDir, Collector) {
    events_node("watermark_producers = [\"ipam\"]", extra)
}

fn fallback_node() -> (Broker, String, tempfile::TempDir, Collector) {
    fallback_node_with(&[])
}

#[test]
fn ips_with_no_agent_are_attributed_from_events_and_heartbeats_win_where_they_exist() {
    // The node creates the events topic when it is missing: nobody else has to.
    let (_broker, brokers, _dir, node) = fallback_node();
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(60));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    event(&brokers, &["assign", "10.8.0.5", "lb-frontend"], at(0));
    event(&brokers, &["unassign", "10.8.0.5"], at(30));
    event(&brokers, &["assign", "10.8.0.6", "lb-claimed"], at(0));
    event(&brokers, &["assign", "10.9.0.7", "lb-outside"], at(0));
    produce_raw(&brokers, "flowattr-ip-events", b"not json");
    produce_raw(
        &brokers,
        "flowattr-ip-events",
        br#"{"event":"assign","ip":"10.8.0.9","ow"#,
    );
    let oversized = format!(
        r#"{{"event":"assign","ip":"10.8.0.9","owner":"{}","at":1}}"#,
        "x".repeat(100_000)
    );
    produce_raw(&brokers, "flowattr-ip-events", oversized.as_bytes());
    produce_raw(
        &brokers,
        "flowattr-ip-events",
        br#"{"event":"assign","ip":"127.0.0.1","owner":"x","at":1}"#,
    );
    // Three hours old, past the events' retention (an hour of ownership retention and an
    // hour of assignment lifetime): nothing it says could still be used.
    event(
        &brokers,
        &["assign", "10.8.0.7", "lb-old"],
        Timestamp::now().saturating_sub(Duration::from_secs(3 * 3600)),
    );
    watermark(&brokers, Timestamp::now());
    node.wait_for_metric("flowattr_events_applied_total", None, 3);
    node.wait_for_metric(
        "flowattr_events_rejected_total",
        Some("reason=\"host_local\""),
        1,
    );
    node.wait_for_metric(
        "flowattr_events_rejected_total",
        Some("reason=\"older_than_retention\""),
        1,
    );
    assert_eq!(
        node.metric(
            "flowattr_events_rejected_total",
            Some("reason=\"outside_fallback\"")
        ),
        1,
        "10.9.0.7 is not kept"
    );
    assert_eq!(node.metric("flowattr_events_applied_total", None), 3);
    assert_eq!(
        node.metric(
            "flowattr_events_rejected_total",
            Some("reason=\"malformed\"")
        ),
        2,
        "garbage and truncated"
    );
    assert_eq!(
        node.metric(
            "flowattr_events_rejected_total",
            Some("reason=\"oversized\"")
        ),
        1
    );

    // 10.8.0.6 runs an exporter after all: its heartbeats win over the events.
    send(
        &node,
        &batch(60, 0, "10.8.0.6", "real-svc", t0, &[("10.7.0.1", 1)]),
    );
    send(
        &node,
        &batch(
            10,
            0,
            "10.7.0.1",
            "api",
            t0,
            &[
                ("10.8.0.5", 10),
                ("10.8.0.6", 1),
                ("10.9.0.7", 10),
                ("10.8.0.5", 40),
            ],
        ),
    );
    let records = wait_for_records(&node.output, 5);
    let remote = |index: u64| {
        let record = &records[&(10, 0, index)];
        (
            record["remote_workload"].clone(),
            record["provenance"].clone(),
            record["unattributed"].clone(),
        )
    };
    use serde_json::Value::Null;
    assert_eq!(
        remote(0),
        ("lb-frontend".into(), "event".into(), Null),
        "{records:?}"
    );
    assert_eq!(
        remote(1),
        ("real-svc".into(), "heartbeat".into(), Null),
        "{records:?}"
    );
    assert_eq!(
        remote(2),
        (Null, Null, "no_evidence".into()),
        "outside the fallback CIDRs: {records:?}"
    );
    assert_eq!(
        remote(3),
        (Null, Null, "no_evidence".into()),
        "unassigned by then: {records:?}"
    );
    assert_eq!(
        node.metric("flowattr_flows_attributed_by_events_total", None),
        1
    );
}

#[test]
fn events_of_one_instant_that_disagree_give_conflict_for_every_flow_until_the_next_event() {
    let (_broker, brokers, _dir, node) = fallback_node();
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(60));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    // Two owners at one instant; an unassign and an assign at one instant; then a clear word.
    event(&brokers, &["assign", "10.8.0.20", "lb-a"], at(0));
    event(&brokers, &["assign", "10.8.0.20", "lb-b"], at(0));
    event(&brokers, &["unassign", "10.8.0.21"], at(0));
    event(&brokers, &["assign", "10.8.0.21", "lb-c"], at(0));
    event(&brokers, &["assign", "10.8.0.20", "lb-b"], at(30));
    watermark(&brokers, Timestamp::now());
    node.wait_for_metric("flowattr_events_applied_total", None, 5);
    send(
        &node,
        &batch(
            11,
            0,
            "10.7.0.2",
            "api",
            t0,
            &[("10.8.0.20", 10), ("10.8.0.21", 10), ("10.8.0.20", 40)],
        ),
    );
    let records = wait_for_records(&node.output, 3);
    let remote = |index: u64| {
        let record = &records[&(11, 0, index)];
        (
            record["remote_workload"].clone(),
            record["unattributed"].clone(),
        )
    };
    use serde_json::Value::Null;
    assert_eq!(
        remote(0),
        (Null, "conflict".into()),
        "ten seconds after two assigns: {records:?}"
    );
    assert_eq!(
        remote(1),
        (Null, "conflict".into()),
        "after an unassign and an assign: {records:?}"
    );
    assert_eq!(
        remote(2),
        ("lb-b".into(), Null),
        "after the next event: {records:?}"
    );
}

/// An event published late (after the flows it concerns arrived) never leaves them named for
/// the IP's previous holder: they wait until the producer's watermark passes their time, then
/// are answered with the late event in hand. A flow the watermark never passes within its
/// retries comes out `incomplete`. The answer does not depend on the order events arrive in.
#[test]
fn a_late_event_never_names_the_old_owner() {
    let (_broker, brokers, _dir, node) =
        fallback_node_with(&["--max-retries", "3", "--retry-delay", "3s"]);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    // lb-a holds 10.8.0.30 from t0; the producer vouches for everything up to t0 + 1 s.
    event(&brokers, &["assign", "10.8.0.30", "lb-a"], at(0));
    // 10.8.0.31's history, published newest first: order makes no difference.
    event(&brokers, &["assign", "10.8.0.31", "lb-d"], at(10));
    event(&brokers, &["unassign", "10.8.0.31"], at(5));
    event(&brokers, &["assign", "10.8.0.31", "lb-c"], at(0));
    watermark(&brokers, at(1));
    node.wait_for_metric("flowattr_events_watermarks_total", None, 1);
    // Flows at t0 + 20 s: past the watermark, so they wait.
    send(
        &node,
        &batch(
            12,
            0,
            "10.7.0.3",
            "api",
            t0,
            &[("10.8.0.30", 20), ("10.8.0.31", 3), ("10.8.0.31", 20)],
        ),
    );
    std::thread::sleep(Duration::from_secs(6));
    let (records, _) = support::read_output(&node.output);
    assert!(
        records.is_empty(),
        "nothing answered before the stream is complete: {records:?}"
    );
    // The IP-tracking service catches up: 10.8.0.30 went to lb-b at t0 + 15 s.
    event(&brokers, &["assign", "10.8.0.30", "lb-b"], at(15));
    watermark(&brokers, Timestamp::now());
    let records = wait_for_records(&node.output, 3);
    let remote = |index: u64| {
        let record = &records[&(12, 0, index)];
        (
            record["remote_workload"].clone(),
            record["unattributed"].clone(),
        )
    };
    use serde_json::Value::Null;
    assert_eq!(
        remote(0),
        ("lb-b".into(), Null),
        "the late event's owner, never lb-a: {records:?}"
    );
    assert_eq!(remote(1), ("lb-c".into(), Null), "{records:?}");
    assert_eq!(remote(2), ("lb-d".into(), Null), "{records:?}");
    assert!(
        records[&(12, 0, 0)]["retries"].as_u64().unwrap() >= 1,
        "it waited: {records:?}"
    );
    assert_eq!(
        node.metric("flowattr_events_late_total", None),
        0,
        "no event came behind a watermark"
    );

    // A flow after the last watermark, which no later one covers: incomplete, not guessed.
    std::thread::sleep(Duration::from_secs(2));
    let after = Timestamp::now().saturating_sub(Duration::from_secs(1));
    send(
        &node,
        &batch(13, 0, "10.7.0.3", "api", after, &[("10.8.0.30", 0)]),
    );
    let records = wait_for_records(&node.output, 4);
    assert_eq!(
        records[&(13, 0, 0)]["unattributed"],
        "incomplete",
        "{records:?}"
    );
    node.wait_for_metric(
        "flowattr_flows_emitted_total",
        Some("result=\"incomplete\""),
        1,
    );
    let (_, health) = node.get("/healthz");
    assert!(
        health.contains("degraded: the event stream is known complete only until"),
        "{health}"
    );
}

/// Without watermarks the node takes `events.max_lateness` as the producer's promise, and
/// checks it: an event that reaches the topic later raises the lateness the node waits for to
/// what it saw, so flows that can no longer wait long enough come out `incomplete` rather than
/// named from a stream that may still be missing events, and `/healthz` says why.
#[test]
fn an_event_later_than_promised_makes_the_node_wait_longer_and_say_so() {
    let (_broker, brokers, _dir, node) = events_node("max_lateness = \"1s\"", &[]);
    let t0 = Timestamp::now();
    event(&brokers, &["assign", "10.8.0.40", "lb-kept"], t0);
    node.wait_for_metric("flowattr_events_applied_total", None, 1);
    std::thread::sleep(Duration::from_secs(2));
    send(
        &node,
        &batch(14, 0, "10.7.0.4", "api", t0, &[("10.8.0.40", 0)]),
    );
    let records = wait_for_records(&node.output, 1);
    assert_eq!(
        records[&(14, 0, 0)]["remote_workload"],
        "lb-kept",
        "within the promise: {records:?}"
    );

    // Thirty seconds late: the promise is broken.
    event(
        &brokers,
        &["assign", "10.8.0.41", "lb-late"],
        Timestamp::now().saturating_sub(Duration::from_secs(30)),
    );
    node.wait_for_metric("flowattr_events_applied_total", None, 2);
    // Published with the node's next progress check, every half second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, health) = loop {
        let (status, health) = node.get("/healthz");
        if health.contains("degraded: an event") || std::time::Instant::now() > deadline {
            break (status, health);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 200);
    assert!(
        health.contains("degraded: an event reached the topic 3"),
        "{health}"
    );
    assert!(
        health.contains("later than events.max_lateness (1.0 s)"),
        "{health}"
    );
    let after = Timestamp::now().saturating_sub(Duration::from_secs(2));
    send(
        &node,
        &batch(15, 0, "10.7.0.4", "api", after, &[("10.8.0.40", 0)]),
    );
    let records = wait_for_records(&node.output, 2);
    assert_eq!(
        records[&(15, 0, 0)]["unattributed"],
        "incomplete",
        "the node now waits 30 s, longer than the flow can: {records:?}"
    );
}

#[test]
fn a_restarted_node_answers_from_the_events_as_a_long_running_one_does() {
    // Ownership kept 30 s; an event speaks for 60 s: a node keeps, and reads at start, 90 s
    // of the topic.
    let (_broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[ownership]\nretention = \"30s\"\n[events]\nfallback_cidrs = [\"10.8.0.0/16\"]\nwatermark_producers = [\"ipam\"]\nassignment_lifetime = \"60s\"\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let node = start_node(dir.path(), &brokers, 1, &args);
    wait_ready(&node);
    let t0 = Timestamp::now();
    event(
        &brokers,
        &["assign", "10.8.0.5", "lb-frontend"],
        t0.saturating_sub(Duration::from_secs(20)),
    );
    watermark(&brokers, Timestamp::now());
    node.wait_for_metric("flowattr_events_applied_total", None, 1);
    // Once the assign is older than the ownership retention, a flow after it is still its.
    std::thread::sleep(Duration::from_secs(12));
    let flow_at = Timestamp::now().saturating_sub(Duration::from_secs(5));
    watermark(&brokers, Timestamp::now());
    send(
        &node,
        &batch(10, 0, "10.7.0.1", "api", flow_at, &[("10.8.0.5", 0)]),
    );
    let records = wait_for_records(&node.output, 1);
    assert_eq!(
        records[&(10, 0, 0)]["remote_workload"],
        "lb-frontend",
        "{records:?}"
    );

    // Restarted, the node reads the topic from 90 s back, and answers alike for the same flow.
    node.kill();
    let node = start_node(dir.path(), &brokers, 1, &args);
    wait_ready(&node);
    watermark(&brokers, Timestamp::now());
    send(
        &node,
        &batch(10, 1, "10.7.0.1", "api", flow_at, &[("10.8.0.5", 0)]),
    );
    // The killed node's unreleased segment replays too, and may write (10, 0, 0) again.
    let records = wait_for_flows(&node.output, &[(10, 1, 0)]);
    assert_eq!(
        records[&(10, 1, 0)]["remote_workload"],
        "lb-frontend",
        "{records:?}"
    );
    assert_eq!(records[&(10, 1, 0)]["provenance"], "event", "{records:?}");
}
