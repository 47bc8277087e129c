//! A region of collector nodes sharing ownership over a real Kafka-compatible broker (Tansu,
//! as the Kafka sink's test uses): three nodes as separate processes; any node attributes
//! flows from heartbeats that only its peers received.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flowattr_common::wire::{AckStatus, ExporterId, FlowBatch};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, closed_flow, start_broker, wait_for_records};

fn ip(last: u8) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 7, 0, last))
}

/// A batch from host `local` (workload `workload`), one flow per (remote, start s, end s).
fn batch(exporter: u64, sequence: u64, local: u8, workload: &str, t0: Timestamp, flows: &[(u8, u64, u64)]) -> FlowBatch {
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    FlowBatch {
        exporter: ExporterId(exporter),
        sequence,
        region: "test".into(),
        workloads: vec![workload.into()],
        flows: flows
            .iter()
            .map(|&(remote, start, end)| closed_flow((ip(local), 40_000), (ip(remote), 443), Some(0), at(start), at(end)))
            .collect(),
    }
}

fn start_node(dir: &std::path::Path, brokers: &str, id: u64, extra: &[&str]) -> Collector {
    let output = dir.join(format!("node-{id}.jsonl"));
    let data = dir.join(format!("data-{id}"));
    let id = id.to_string();
    let mut args = vec![
        "--cpus", "2",
        "--brokers", brokers,
        "--node-id", &id,
        "--data-dir", data.to_str().unwrap(),
        "--delay", "4s",
        "--segment-span", "200ms",
        "--max-retries", "0",
    ];
    args.extend_from_slice(extra);
    Collector::start(&output, &args)
}

/// Waits until the node has caught up with the broadcast topic (`/healthz` says ok).
fn wait_ready(node: &Collector) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = node.get("/healthz");
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn send(node: &Collector, batch: &FlowBatch) {
    let ack = node.connect().send_and_wait(batch).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
}

#[test]
fn any_node_attributes_from_heartbeats_only_its_peers_received_and_a_restarted_node_rebuilds() {
    let (_broker, brokers) = start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Collector> = (1..=3).map(|id| start_node(dir.path(), &brokers, id, &[])).collect();
    for node in &nodes {
        wait_ready(node);
    }
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    // Billing (10.7.0.2) reports only to node 2, dns (10.7.0.3) only to node 3.
    send(&nodes[1], &batch(20, 0, 2, "billing", t0, &[(9, 1, 20)]));
    send(&nodes[2], &batch(30, 0, 3, "dns", t0, &[(9, 1, 20)]));
    // api's flows to both reach node 1 only.
    send(&nodes[0], &batch(10, 0, 1, "api", t0, &[(2, 5, 6), (3, 5, 6)]));
    // A flow to cache (10.7.0.4) whose heartbeat reaches node 2 a second later: within the delay.
    send(&nodes[0], &batch(10, 1, 1, "api", t0, &[(4, 8, 9)]));
    std::thread::sleep(Duration::from_secs(1));
    send(&nodes[1], &batch(40, 0, 4, "cache", t0, &[(9, 2, 25)]));

    let records = wait_for_records(&nodes[0].output, 3);
    let remote = |key| records[&key]["remote_workload"].as_str().map(str::to_owned);
    assert_eq!(remote((10, 0, 0)).as_deref(), Some("billing"), "{records:?}");
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
    send(&restarted, &batch(10, 2, 1, "api", t0, &[(2, 10, 11), (3, 10, 11)]));
    let records = wait_for_records(&restarted.output, 5);
    assert_eq!(records[&(10, 2, 0)]["remote_workload"], "billing", "{records:?}");
    assert_eq!(records[&(10, 2, 1)]["remote_workload"], "dns", "{records:?}");
}
