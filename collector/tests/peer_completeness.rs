//! Every answer waits for every peer's evidence: a claim that reaches a peer while the broker
//! is away, or that a peer lost when it was killed, makes the flows that could need it come
//! out `incomplete`, never named from half the evidence. Real node processes over a real
//! Kafka-compatible broker (Tansu), as in cluster.rs.

mod support;

use std::time::{Duration, Instant};

use flowattr_common::Timestamp;
use support::{
    Collector, host_batch as batch, send, start_broker, start_node, wait_for_answer,
    wait_for_records, wait_for_watermark, wait_ready,
};

#[test]
fn a_claim_that_reaches_a_peer_while_the_broker_is_away_makes_the_overlap_incomplete_never_named() {
    let (broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Collector> = (1..=2)
        .map(|id| start_node(dir.path(), &brokers, id, &["--storage", "memory"]))
        .collect();
    for node in &nodes {
        wait_ready(node);
    }
    wait_for_watermark(&nodes[0], 2);
    wait_for_watermark(&nodes[1], 1);
    assert!(!nodes[0].get("/healthz").1.contains("degraded"));

    // The broker stops answering for longer than the delay. Meanwhile two hosts claim
    // 10.7.0.60 over the same seconds: alpha's heartbeats reach node 1, beta's node 2.
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let stopped = Instant::now();
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(8));
    send(&nodes[0], &batch(10, 0, 60, "alpha", t0, &[(9, 0, 7)]));
    send(&nodes[1], &batch(20, 0, 60, "beta", t0, &[(9, 0, 7)]));
    // api's flow to it, inside the overlap, reaches node 1, which knows only alpha's claim.
    send(&nodes[0], &batch(30, 0, 1, "api", t0, &[(60, 3, 4)]));
    // Node 1's output holds alpha's flow too.
    let records = wait_for_records(&nodes[0].output, 2);
    let flow = &records[&(30, 0, 0)];
    assert_eq!(
        flow["remote_workload"],
        serde_json::Value::Null,
        "never named from half the evidence: {records:?}"
    );
    assert_eq!(flow["unattributed"], "incomplete", "{records:?}");
    // And the node says so while it is.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = nodes[0].get("/healthz");
        if body.contains("degraded: attributing from incomplete evidence: peer 2's stream is complete only through")
            && body.contains("degraded: the brokers have acked none of this node's updates for")
        {
            assert_eq!(status, 200, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never said its evidence is incomplete: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        nodes[0].metric(
            "flowattr_flows_emitted_total",
            Some("result=\"incomplete\"")
        ) >= 1
    );
    assert!(
        stopped.elapsed() > Duration::from_secs(4),
        "the broker was away for longer than the delay"
    );

    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGCONT) },
        0
    );
    // Once node 2's claim arrives, node 1 itself answers conflict for that instant, and a flow
    // inside the overlap reported now comes out conflict, once the evidence is complete again.
    wait_for_answer(
        &nodes[0],
        60,
        t0.saturating_add(Duration::from_secs(3)),
        "\"unattributed\":\"conflict\"",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sequence = 1;
    loop {
        send(&nodes[0], &batch(30, sequence, 1, "api", t0, &[(60, 3, 4)]));
        let records = wait_for_records(&nodes[0].output, sequence as usize + 2);
        let flow = &records[&(30, sequence, 0)];
        assert_eq!(
            flow["remote_workload"],
            serde_json::Value::Null,
            "{records:?}"
        );
        if flow["unattributed"] == "conflict" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never complete again: {records:?}"
        );
        sequence += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[0].get("/healthz").1.contains("incomplete evidence") {
        assert!(Instant::now() < deadline, "{}", nodes[0].get("/healthz").1);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_peer_killed_with_a_claim_it_never_published_returns_with_a_hole_that_covers_it() {
    let (broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Node 1 retries for 45 s: long enough to see node 2 return.
    let first = start_node(
        dir.path(),
        &brokers,
        1,
        &[
            "--storage",
            "memory",
            "--max-retries",
            "3",
            "--retry-delay",
            "15s",
        ],
    );
    let second = start_node(dir.path(), &brokers, 2, &["--storage", "memory"]);
    wait_ready(&first);
    wait_ready(&second);
    wait_for_watermark(&first, 2);

    // While the broker is away, beta's claim on 10.7.0.61 reaches node 2, which is killed
    // before it can publish it: node 2's memory and its backlog are gone.
    // SAFETY: signalling our own child process.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let t0 = Timestamp::now();
    send(&second, &batch(20, 0, 61, "beta", t0, &[(9, 0, 1)]));
    // alpha's, on the same IP at the same time, reaches node 1, and so does a flow to it.
    send(&first, &batch(10, 0, 61, "alpha", t0, &[(9, 0, 1)]));
    send(&first, &batch(30, 0, 1, "api", t0, &[(61, 0, 1)]));
    std::thread::sleep(Duration::from_secs(1));
    second.kill();
    // Node 2 returns well after the exporters' lateness (11 s here): its new stream alone would
    // say it is complete past the flow.
    std::thread::sleep(Duration::from_secs(14));
    let second = start_node(dir.path(), &brokers, 2, &["--storage", "memory"]);
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGCONT) },
        0
    );
    wait_ready(&second);

    // Every attempt at the flow finds node 2's stream complete only through before the claim
    // it lost, so the flow is never named alpha.
    let records = wait_for_records(&first.output, 2);
    let flow = &records[&(30, 0, 0)];
    assert_eq!(
        flow["remote_workload"],
        serde_json::Value::Null,
        "never named without the lost claim: {records:?}"
    );
    assert_eq!(flow["unattributed"], "incomplete", "{records:?}");
    assert_eq!(flow["retries"], 3, "{records:?}");
    let series = "flowattr_broadcast_peer_complete_after_seconds{peer=\"2\"}";
    let after = first.gauge(series).unwrap();
    assert!(
        after > t0.as_nanos() as f64 / 1e9 + 1.0,
        "{after}: node 2's hole must cover the claim it lost at {t0:?}"
    );
    let health = second.get("/healthz").1;
    assert!(health.contains("may never reach the brokers"), "{health}");

    // The hole costs only lookups that reach back into it: a claim node 2 learns now is used.
    let t1 = Timestamp::now();
    send(&second, &batch(21, 0, 62, "gamma", t1, &[(9, 0, 1)]));
    send(&first, &batch(30, 1, 1, "api", t1, &[(62, 0, 1)]));
    let records = wait_for_records(&first.output, 3);
    assert_eq!(
        records[&(30, 1, 0)]["remote_workload"],
        "gamma",
        "{records:?}"
    );
}
