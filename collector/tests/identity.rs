//! Batches under the same exporter id and sequence that are not the same batch, against the
//! collector binary on plain TCP: another client's batches sent first under an exporter's
//! numbers cost none of that exporter's flows, and a retry whose records the gate judges
//! differently the second time stores exactly the records it refused the first time. (Under
//! mutual TLS a client cannot send under another's id at all: `tls.rs`.)

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, FlowRecord, RecordRefusal, RefusedRecord, encode_message};
use flowattr_common::{CanonicalIp, Timestamp};
use serde_json::Value;
use support::{Collector, batch_of, closed_flow};

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

fn flow(local: &str, remote: &str, start: Timestamp, end: Timestamp) -> FlowRecord {
    let ip = |text: &str| CanonicalIp::from(text.parse::<IpAddr>().unwrap());
    closed_flow((ip(local), 40_000), (ip(remote), 443), Some(0), start, end)
}

/// Sends `frame` on a connection of its own, as an exporter resends a batch it kept, and
/// returns the ack.
fn resend(collector: &Collector, frame: &[u8]) -> flowattr_common::wire::Ack {
    let mut connection =
        CollectorConnection::connect(collector.ingest, Duration::from_secs(10)).unwrap();
    connection.send_raw(frame).unwrap();
    connection.recv_ack().unwrap()
}

/// Every record emitted so far, duplicates kept, once `n` are out (within a minute).
fn wait_for_lines(collector: &Collector, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&collector.output).unwrap_or_default();
        // Complete lines only: the node may be writing the next one.
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        let lines: Vec<Value> = complete
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} records emitted: {lines:?}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `records` lines, and a little longer for any extra, and checks that the batch's
/// records came out once each.
fn assert_each_record_once(collector: &Collector, records: u64) {
    let lines = wait_for_lines(collector, records as usize);
    std::thread::sleep(Duration::from_millis(2500));
    let lines = wait_for_lines(collector, lines.len());
    let mut indices: Vec<u64> = lines
        .iter()
        .map(|line| line["index"].as_u64().unwrap())
        .collect();
    indices.sort();
    assert_eq!(
        indices,
        (0..records).collect::<Vec<_>>(),
        "each record once: {lines:?}"
    );
}

#[test]
fn batches_sent_first_under_an_exporters_numbers_cost_none_of_its_flows() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let exporter = 4_242;
    let t = Timestamp::now().saturating_sub(Duration::from_secs(10));
    let end = t.saturating_add(Duration::from_secs(1));
    let mut impostor = collector.connect();
    let mut real = collector.connect();
    for sequence in 0..8u64 {
        // Exporter ids and sequences are readable in the output: anyone can send the next one
        // first. One flow, to one shard or the other.
        let forged = batch_of(
            exporter,
            sequence,
            "impostor",
            vec![flow("10.1.0.9", &format!("10.7.0.{sequence}"), t, end)],
        );
        assert_eq!(
            impostor.send_and_wait(&forged).unwrap().status,
            AckStatus::Accepted
        );
        // The exporter's own batch under the same numbers, its flows on both shards.
        let own = (1..=4)
            .map(|n| flow("10.1.0.1", &format!("10.8.{sequence}.{n}"), t, end))
            .collect();
        let ack = real
            .send_and_wait(&batch_of(exporter, sequence, "real-app", own))
            .unwrap();
        assert_eq!(
            (ack.status, ack.refused.len()),
            (AckStatus::Accepted, 0),
            "batch {sequence}"
        );
    }
    let lines = wait_for_lines(&collector, 40);
    std::thread::sleep(Duration::from_millis(1500));
    let lines_now = wait_for_lines(&collector, 40);
    assert_eq!(lines_now.len(), 40, "no record twice: {lines_now:?}");
    let from = |workload: &str| {
        let mut keys: Vec<(u64, u64, String)> = lines
            .iter()
            .filter(|line| line["local_workload"] == workload)
            .map(|line| {
                assert_eq!(line["exporter"], exporter, "{line}");
                (
                    line["sequence"].as_u64().unwrap(),
                    line["index"].as_u64().unwrap(),
                    line["remote_ip"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        keys.sort();
        keys
    };
    let expected: Vec<_> = (0..8u64)
        .flat_map(|sequence| {
            (1..=4u64).map(move |n| (sequence, n - 1, format!("10.8.{sequence}.{n}")))
        })
        .collect();
    assert_eq!(
        from("real-app"),
        expected,
        "every flow the exporter was acked for is emitted"
    );
    // The stated limit without TLS: the impostor's own flows come out under the id it used.
    assert_eq!(from("impostor").len(), 8);
    assert_eq!(
        collector.metric("flowattr_batches_duplicate_total", None),
        0
    );
}

#[test]
fn a_retry_stores_exactly_the_records_the_first_try_refused() {
    let dir = tempfile::tempdir().unwrap();
    let collector = quick_collector(dir.path());
    let now = Timestamp::now();
    let skew = Duration::from_secs(1);
    let ahead = now.saturating_add(skew + Duration::from_secs(2));
    let batch = batch_of(
        31,
        5,
        "api",
        vec![
            flow(
                "10.2.0.1",
                "10.2.0.50",
                now.saturating_sub(Duration::from_secs(6)),
                now.saturating_sub(Duration::from_secs(5)),
            ),
            // Ends 3 s ahead of the node's clock, past the 1 s it allows: from the future, now.
            flow(
                "10.2.0.1",
                "10.2.0.51",
                now.saturating_sub(Duration::from_secs(1)),
                ahead,
            ),
            flow(
                "10.2.0.1",
                "10.2.0.52",
                now.saturating_sub(Duration::from_secs(6)),
                now.saturating_sub(Duration::from_secs(5)),
            ),
        ],
    );
    // The exporter keeps the frame, and a retry resends it byte for byte.
    let mut frame = Vec::new();
    encode_message(&batch, &mut frame).unwrap();
    let send = |frame: &[u8]| resend(&collector, frame);
    let first = send(&frame);
    assert_eq!(first.status, AckStatus::Accepted);
    assert_eq!(
        first.refused,
        vec![RefusedRecord {
            record: 1,
            reason: RecordRefusal::FromTheFuture
        }]
    );
    // That ack is lost on the way; the exporter resends once the record is within the skew.
    while Timestamp::now().saturating_add(skew) < ahead {
        std::thread::sleep(Duration::from_millis(100));
    }
    let retry = send(&frame);
    assert_eq!(
        (retry.status, retry.refused.len()),
        (AckStatus::Accepted, 0),
        "{retry:?}"
    );
    let again = send(&frame);
    assert_eq!(
        (again.status, again.refused.len()),
        (AckStatus::Duplicate, 0)
    );

    assert_each_record_once(&collector, 3);
}

#[test]
fn a_node_killed_between_the_tries_still_stores_exactly_the_records_the_first_try_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--cpus",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "8s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
    ];
    let output = dir.path().join("flows.jsonl");
    let collector = Collector::start(&output, &args);
    let now = Timestamp::now();
    let ahead = now.saturating_add(Duration::from_secs(3));
    let past = (
        now.saturating_sub(Duration::from_secs(6)),
        now.saturating_sub(Duration::from_secs(5)),
    );
    let batch = batch_of(
        32,
        9,
        "api",
        vec![
            flow("10.3.0.1", "10.3.0.50", past.0, past.1),
            flow(
                "10.3.0.1",
                "10.3.0.51",
                now.saturating_sub(Duration::from_secs(1)),
                ahead,
            ),
            flow("10.3.0.1", "10.3.0.52", past.0, past.1),
        ],
    );
    let mut frame = Vec::new();
    encode_message(&batch, &mut frame).unwrap();
    let send = |collector: &Collector| resend(collector, &frame);
    let first = send(&collector);
    assert_eq!(
        first.refused,
        vec![RefusedRecord {
            record: 1,
            reason: RecordRefusal::FromTheFuture
        }]
    );
    // Acked means on disk: the node dies before it releases anything, and comes back.
    collector.kill();
    let collector = Collector::start(&output, &args);
    while Timestamp::now().saturating_add(Duration::from_secs(1)) < ahead {
        std::thread::sleep(Duration::from_millis(100));
    }
    let retry = send(&collector);
    assert_eq!(
        (retry.status, retry.refused.len()),
        (AckStatus::Accepted, 0),
        "{retry:?}"
    );
    assert_eq!(
        send(&collector).status,
        AckStatus::Duplicate,
        "the replayed filter knows the rest"
    );
    assert_each_record_once(&collector, 3);
}
