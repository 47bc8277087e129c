//! The whole collector, as a process: batches over TCP in, attributed JSON lines out.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, Shutdown};
use std::time::Duration;

use flowattr_bench::simulate::fleet::{Fleet, FleetShape};
use flowattr_bench::simulate::observe::{Arrival, Delivery, observe};
use flowattr_common::client::ClientError;
use flowattr_common::wire::{
    Ack, AckStatus, BatchRefusal, COMPRESSION_LEVEL, ExporterId, FlowBatch, FlowRecord,
    FrameCompressor, FrameKind, MeasuredFlowBatch, PayloadEncoding, WorkloadIndex, checksum_of,
    encode_frame, encode_message,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use support::{Collector, SmallDisk, read_output, wait_for_records};

fn ip(last: u8) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 0, 0, last))
}

/// A batch from the host at `local`, whose workload is `workload`, with one flow per
/// (remote, start, end) in seconds after `t0`.
/// `batch` as exporters send it (with neither host, clock nor round trips).
fn measured(batch: FlowBatch) -> MeasuredFlowBatch {
    MeasuredFlowBatch {
        host: None,
        clock: None,
        batch,
        round_trips: Vec::new(),
    }
}

fn batch(
    exporter: u64,
    sequence: u64,
    local: u8,
    workload: &str,
    t0: Timestamp,
    flows: &[(u8, u64, u64)],
) -> FlowBatch {
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    FlowBatch {
        exporter: ExporterId(exporter),
        sequence,
        region: "test".into(),
        workloads: vec![workload.into()],
        flows: flows
            .iter()
            .map(|&(remote, start, end)| FlowRecord {
                local_ip: ip(local),
                remote_ip: ip(remote),
                local_port: 40_000,
                remote_port: 443,
                local_workload: Some(WorkloadIndex(0)),
                local_shared: false,
                start: at(start),
                end: at(end),
                bytes_sent: 1_000,
                bytes_received: 2_000,
                segments_sent: 10,
                segments_received: 12,
                retransmits: 1,
                direction: Direction::Outbound,
                state: FlowState::Closed,
            })
            .collect(),
    }
}

/// What a test compares of an ack: whose batch, its status, how many records were refused.
fn outcome(ack: Ack) -> (u64, u64, AckStatus, usize) {
    (ack.exporter.0, ack.sequence, ack.status, ack.refused.len())
}

fn accepted(exporter: u64, sequence: u64) -> (u64, u64, AckStatus, usize) {
    (exporter, sequence, AckStatus::Accepted, 0)
}

#[test]
fn attributes_each_flow_once_with_late_heartbeats_a_conflict_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let collector = Collector::start(
        &output,
        &[
            "--cpus",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
            "--delay",
            "1s",
            "--segment-span",
            "200ms",
            "--retry-delay",
            "2s",
            "--max-retries",
            "1",
        ],
    );
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(600));
    let mut connection = collector.connect();
    // Host A (10.0.0.1, api) reports first: its remote sides' heartbeats all come later.
    let a = batch(
        1,
        0,
        1,
        "api",
        t0,
        &[(2, 10, 70), (3, 20, 22), (4, 30, 32), (5, 40, 42)],
    );
    assert_eq!(
        outcome(connection.send_and_wait(&a).unwrap()),
        accepted(1, 0)
    );
    // B (billing) reports after A but within the delay: out of order, still in time.
    let b = batch(2, 0, 2, "billing", t0, &[(1, 10, 50)]);
    // C is claimed by two workloads at once: a conflict.
    let c1 = batch(3, 0, 3, "x", t0, &[(1, 15, 25)]);
    let c2 = batch(4, 0, 3, "y", t0, &[(1, 15, 25)]);
    let acks = connection.send_all(&[b, c1, c2], 3).unwrap();
    assert_eq!(acks.len(), 3);
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));

    // D's heartbeat arrives only after A's flow to D found no evidence and was queued for
    // retry; E's never arrives.
    collector.wait_for_metric("flowattr_flows_retried_total", None, 2);
    let d = batch(5, 0, 4, "dns", t0, &[(1, 29, 33)]);
    assert_eq!(
        outcome(connection.send_and_wait(&d).unwrap()),
        accepted(5, 0)
    );

    let records = wait_for_records(&output, 8);
    let expect =
        |key: (u64, u64, u64), remote: Option<&str>, reason: Option<&str>, retries: u64| {
            let record = &records[&key];
            assert_eq!(record["remote_workload"].as_str(), remote, "{record}");
            assert_eq!(record["unattributed"].as_str(), reason, "{record}");
            assert_eq!(record["retries"].as_u64(), Some(retries), "{record}");
            if remote.is_some() {
                assert_eq!(record["provenance"], "heartbeat", "{record}");
            }
        };
    expect((1, 0, 0), Some("billing"), None, 0);
    expect((1, 0, 1), None, Some("conflict"), 0);
    expect((1, 0, 2), Some("dns"), None, 1);
    expect((1, 0, 3), None, Some("no_evidence"), 1);
    expect((2, 0, 0), Some("api"), None, 0);
    expect((3, 0, 0), Some("api"), None, 0);
    expect((4, 0, 0), Some("api"), None, 0);
    expect((5, 0, 0), Some("api"), None, 0);
    let first = &records[&(1, 0, 0)];
    assert_eq!(first["local_workload"], "api");
    assert_eq!(first["local_ip"], "10.0.0.1");
    assert_eq!(first["remote_ip"], "10.0.0.2");
    assert_eq!(first["bytes_sent"], 1_000);
    assert_eq!(first["direction"], "outbound");
    // Nothing more arrives, and nothing came twice.
    std::thread::sleep(Duration::from_secs(1));
    let (_, counts) = read_output(&output);
    assert_eq!(counts.len(), 8);
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");

    // The control plane agrees.
    let at = t0.saturating_add(Duration::from_secs(20)).as_nanos();
    let (status, owner) = collector.get(&format!("/v1/owner?ip=10.0.0.2&at={at}"));
    assert_eq!(status, 200, "{owner}");
    let owner: serde_json::Value = serde_json::from_str(&owner).unwrap();
    assert_eq!(owner["owner"], "billing", "{owner}");
    assert_eq!(owner["segments"][0]["holder"], "billing", "{owner}");
    let (_, conflict) = collector.get(&format!("/v1/owner?ip=10.0.0.3&at={at}"));
    assert!(
        conflict.contains("\"unattributed\":\"conflict\""),
        "{conflict}"
    );
    let (_, history) = collector.get("/v1/history?ip=10.0.0.1");
    assert!(history.contains("\"holder\":\"api\""), "{history}");
    assert_eq!(collector.get("/v1/owner?ip=banana&at=1").0, 400);
    assert_eq!(collector.get("/healthz"), (200, "ok\n".to_owned()));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dot = loop {
        let (status, dot) = collector.get("/v1/deps?format=dot");
        assert_eq!(status, 200);
        if dot.contains(r#""api" -> "billing" [label="1"]"#) || std::time::Instant::now() > deadline
        {
            break dot;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(dot.contains(r#""api" -> "billing" [label="1"]"#), "{dot}");
    assert!(dot.contains(r#""api" -> "unattributed:conflict""#), "{dot}");
    assert_eq!(
        collector.metric(
            "flowattr_flows_emitted_total",
            Some("result=\"attributed\"")
        ),
        6
    );
    assert_eq!(
        collector.metric("flowattr_flows_emitted_total", Some("result=\"conflict\"")),
        1
    );
    assert_eq!(
        collector.metric(
            "flowattr_flows_emitted_total",
            Some("result=\"no_evidence\"")
        ),
        1
    );
    assert_eq!(collector.metric("flowattr_batches_accepted_total", None), 5);
    // The file sink counts what it appended: the whole file.
    let written = std::fs::metadata(&output).unwrap().len();
    assert_eq!(collector.metric("flowattr_sink_bytes_total", None), written);
    // Every flow released is in the latency histogram, which shards publish about once a
    // second (their view), where the emitted counter is live.
    let emitted = collector.metric("flowattr_flows_emitted_total", None);
    collector.wait_for_metric(
        "flowattr_release_extra_latency_seconds_count",
        None,
        emitted,
    );
    assert_eq!(
        collector.metric("flowattr_release_extra_latency_seconds_count", None),
        emitted
    );
    assert_eq!(
        collector.metric(
            "flowattr_release_extra_latency_seconds_bucket",
            Some("le=\"+Inf\"")
        ),
        emitted
    );
}

#[test]
fn every_acked_flow_comes_out_once_after_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let args = [
        "--cpus",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "2s",
        "--segment-span",
        "300ms",
        "--retry-delay",
        "1s",
        "--max-retries",
        "1",
    ];
    // A simulated fleet's batches, its timeline ending now, with the truth of every flow.
    let fleet = Fleet::generate(FleetShape {
        duration: Duration::from_secs(300),
        services: 10,
        hosts: 20,
        hosts_without_exporter: 0.1,
        connections_per_second: 12.0,
        max_skew: Duration::from_millis(100),
        ..FleetShape::default()
    })
    .unwrap();
    let delivery = Delivery {
        batch_loss: 0.0,
        duplication: 0.0,
        reordering: 0.0,
        restarts_per_hour: 0.0,
        ..Delivery::default()
    };
    let observations = observe(&fleet, &delivery, 3);
    let names: Vec<String> = fleet
        .services
        .iter()
        .map(|service| service.name.clone())
        .collect();
    let sent: Vec<_> = observations
        .arrivals
        .iter()
        .filter_map(|(at, arrival)| match arrival {
            Arrival::Batch(batch) => Some((*at, batch)),
            Arrival::Event(_) => None,
        })
        .collect();
    let last = sent.iter().map(|(at, _)| *at).max().unwrap();
    let shift = Duration::from_nanos(
        Timestamp::now()
            .saturating_sub(Duration::from_secs(1))
            .nanos_since(last),
    );
    let mut truth = HashMap::new();
    let batches: Vec<FlowBatch> = sent
        .iter()
        .map(|(_, batch)| {
            for (index, report) in batch.reports.iter().enumerate() {
                let remote = observations.truth[report.id as usize].remote;
                truth.insert(
                    (batch.exporter, batch.sequence, index as u32),
                    names[remote as usize].clone(),
                );
            }
            batch.to_wire(&names, shift)
        })
        .collect();
    let total: usize = batches.iter().map(|batch| batch.flows.len()).sum();
    let (early, late) = batches.split_at(batches.len() / 3);
    let early_flows: usize = early.iter().map(|batch| batch.flows.len()).sum();

    let collector = Collector::start(&output, &args);
    let mut connection = collector.connect();
    connection.send_all(early, 4).unwrap();
    // Some flows are out (and some re-buffered for retry) before the crash.
    wait_for_records(&output, early_flows / 2);
    let acks = connection.send_all(late, 4).unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    let (_, before) = read_output(&output);
    collector.kill();
    assert!(
        before.len() < total,
        "the kill must land with flows still buffered ({} of {total} out)",
        before.len(),
    );

    // A write torn by the crash: junk after the last whole block of a segment. It was never
    // acked; replay must keep the blocks before it and skip it.
    let segment = std::fs::read_dir(data.join("shard-0"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .max()
        .expect("flows were still buffered in a segment of shard 0");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    file.write_all(b"FLWB\x10\x00\x00\x00torn write").unwrap();
    drop(file);

    let restarted = Collector::start(&output, &args);
    wait_for_records(&output, total);
    std::thread::sleep(Duration::from_secs(1));
    let (records, counts) = read_output(&output);
    let twice: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "emitted more than once: {twice:?}");
    assert_eq!(records.len(), total);
    for (key, record) in &records {
        if let Some(remote) = record["remote_workload"].as_str() {
            assert_eq!(truth[&(key.0, key.1, key.2 as u32)], remote, "{record}");
        }
    }
    assert!(restarted.metric("flowattr_delay_flows_replayed_total", None) > 0);
    assert_eq!(
        restarted.metric("flowattr_delay_corrupt_blocks_total", None),
        0
    );
}

#[test]
fn bad_frames_close_only_their_own_connection_and_bad_content_is_refused_in_an_answer() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        "[ingest]\nmax_frame_bytes = 65536\n[delay]\nstorage = \"memory\"\ndelay = \"500ms\"\nsegment_span = \"100ms\"\nmax_retries = 0\n",
    )
    .unwrap();
    let collector = Collector::start(&output, &["--config", config.to_str().unwrap()]);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(60));
    let mut good = collector.connect();
    let first = batch(1, 0, 1, "api", t0, &[(2, 1, 2)]);
    let first_ack = good.send_and_wait(&first).unwrap();
    assert_eq!(outcome(first_ack.clone()), accepted(1, 0));

    let mut valid = Vec::new();
    encode_message(&first, &mut valid).unwrap();
    let mut bad_checksum = valid.clone();
    *bad_checksum.last_mut().unwrap() ^= 1;
    let mut too_large = valid[..16].to_vec();
    too_large[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let mut ack_frame = Vec::new();
    encode_message(&first_ack, &mut ack_frame).unwrap();
    let mut garbage_payload = Vec::new();
    encode_frame(FrameKind::FlowBatch, &[0xAB; 64], &mut garbage_payload).unwrap();
    let cases: [(&str, &[u8], bool); 5] = [
        ("bad_frame", b"GET / HTTP/1.1\r\n\r\n", false),
        ("bad_frame", &bad_checksum, false),
        ("too_large", &too_large, false),
        ("unexpected_kind", &ack_frame, false),
        ("truncated", &valid[..valid.len() - 5], true),
    ];
    for (reason, bytes, half_close) in cases {
        let mut bad = collector.connect();
        bad.send_raw(bytes).unwrap();
        if half_close {
            bad.stream().shutdown(Shutdown::Write).unwrap();
        }
        // The collector closes the connection without an ack.
        match bad.recv_ack() {
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => {}
            other => panic!("{reason}: expected the connection closed, got {other:?}"),
        }
    }
    // An intact frame whose payload is not a batch is refused with a typed answer naming the
    // frame by its checksum, and the connection stays open for the next batch.
    let mut refused = collector.connect();
    refused.send_raw(&garbage_payload).unwrap();
    let answer = refused.recv_ack().unwrap();
    assert_eq!(answer.status, AckStatus::Refused(BatchRefusal::Malformed));
    assert_eq!(Some(answer.frame_checksum), checksum_of(&garbage_payload));
    let after = batch(2, 0, 1, "api", t0, &[(2, 1, 2)]);
    assert_eq!(
        outcome(refused.send_and_wait(&after).unwrap()),
        accepted(2, 0)
    );
    // Compressed frames are refused the same way when they do not expand, or expand past the
    // largest frame (64 KiB here: a few hundred bytes on the wire would otherwise take memory
    // a plain frame could not), and a good one is read on the same connection.
    let mut compressor = FrameCompressor::new(COMPRESSION_LEVEL).unwrap();
    let mut bomb = Vec::new();
    let many: Vec<(u8, u64, u64)> = (0..4_000).map(|i| (2, i % 50, 55)).collect();
    compressor
        .encode_batch(&measured(batch(2, 1, 1, "api", t0, &many)), &mut bomb)
        .unwrap();
    assert!(bomb.len() < 65_536);
    let mut not_zstd = garbage_payload.clone();
    not_zstd[6] = PayloadEncoding::Zstd as u8;
    let checksum = crc32c::crc32c_append(crc32c::crc32c(&not_zstd[..12]), &not_zstd[16..]);
    not_zstd[12..16].copy_from_slice(&checksum.to_le_bytes());
    for hostile in [&bomb, &not_zstd] {
        refused.send_raw(hostile).unwrap();
        let answer = refused.recv_ack().unwrap();
        assert_eq!(answer.status, AckStatus::Refused(BatchRefusal::Malformed));
        assert_eq!(Some(answer.frame_checksum), checksum_of(hostile));
    }
    let mut packed = Vec::new();
    compressor
        .encode_batch(
            &measured(batch(2, 2, 1, "api", t0, &[(2, 3, 4)])),
            &mut packed,
        )
        .unwrap();
    refused.send_raw(&packed).unwrap();
    let answer = refused.recv_ack().unwrap();
    assert_eq!(
        (answer.sequence, answer.status, answer.frame_checksum),
        (2, AckStatus::Accepted, checksum_of(&packed).unwrap())
    );
    assert_eq!(collector.metric("flowattr_batches_refused_total", None), 3);
    for reason in [
        "bad_frame",
        "too_large",
        "unexpected_kind",
        "bad_payload",
        "truncated",
    ] {
        let label = format!("reason=\"{reason}\"");
        let expected = match reason {
            "bad_frame" => 2,
            "bad_payload" => 3,
            _ => 1,
        };
        collector.wait_for_metric("flowattr_ingest_rejections_total", Some(&label), expected);
        assert_eq!(
            collector.metric("flowattr_ingest_rejections_total", Some(&label)),
            expected
        );
    }

    // The good connection was never disturbed. A retry after a lost ack is recognised.
    let duplicate = good.send_and_wait(&first).unwrap();
    assert_eq!(duplicate.status, AckStatus::Duplicate);
    let second = batch(1, 1, 1, "api", t0, &[(2, 3, 4)]);
    assert_eq!(
        outcome(good.send_and_wait(&second).unwrap()),
        accepted(1, 1)
    );
    // A duplicate on a new connection (the exporter reconnected) is recognised too.
    let mut reconnected = collector.connect();
    assert_eq!(
        reconnected.send_and_wait(&second).unwrap().status,
        AckStatus::Duplicate
    );
    reconnected.stream().flush().unwrap();
    wait_for_records(&output, 4);
    std::thread::sleep(Duration::from_secs(1));
    let (_, counts) = read_output(&output);
    assert_eq!(
        counts.len(),
        4,
        "two from the first connection, one after the refusal, one compressed"
    );
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    assert_eq!(
        collector.metric("flowattr_batches_duplicate_total", None),
        2
    );
}

/// Starts the collector with `toml` as its config file; it must fail. Returns its stderr.
fn start_with_bad_config(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowattr-collector"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_fails_at_start_naming_the_key() {
    let stderr = start_with_bad_config("[delay]\nmax_retries = 9\n");
    assert!(stderr.contains("delay.max_retries"), "{stderr}");
    let stderr = start_with_bad_config("[delay]\ndelay = 60\n");
    assert!(
        stderr.contains("delay") && stderr.contains("bad.toml"),
        "{stderr}"
    );
    // Accepted before: retention above delay + retry_delay, yet flows from the start of an
    // exporter interval would be expired at their first lookup.
    let stderr = start_with_bad_config(
        "[delay]\ndelay = \"60s\"\nretry_delay = \"30s\"\nmax_retries = 2\n[ownership]\nretention = \"100s\"\n",
    );
    assert!(stderr.contains("ownership.retention"), "{stderr}");
    assert!(
        stderr.contains("minimum of 3m 16s"),
        "60 + 10 + 60 + 2 x 30 + 1 + 5 s: {stderr}"
    );
    for term in [
        "ingest.exporter_interval 1m",
        "ingest.exporter_send_time 10s",
        "delay.delay 1m",
        "delay.max_retries 1m",
        "ownership.slack 1s",
        "eviction period 5s",
    ] {
        assert!(stderr.contains(term), "{term}: {stderr}");
    }
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn a_full_disk_stops_acks_loses_nothing_and_recovers() {
    let disk = SmallDisk::new(32);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = disk.mount.join("buffer");
    let args = [
        "--cpus",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "1s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
    ];
    let collector = Collector::start(&output, &args);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(60));
    let mut connection = collector.connect();
    let first = batch(9, 0, 1, "api", t0, &[(2, 1, 2)]);
    assert_eq!(
        outcome(connection.send_and_wait(&first).unwrap()),
        accepted(9, 0)
    );
    // Once its flow is out, its segment is deleted: it must not free space after the fill.
    wait_for_records(&output, 1);
    std::thread::sleep(Duration::from_millis(500));

    let filler = disk.fill();
    let second = batch(9, 1, 1, "api", t0, &[(2, 3, 4), (3, 5, 6)]);
    connection.send(&second).unwrap();
    // No ack while the batch cannot be made durable: the exporter keeps it.
    connection
        .stream()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    match connection.recv_ack() {
        Err(ClientError::Io(error))
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("expected no ack while the disk is full, got {other:?}"),
    }
    assert_eq!(collector.metric("flowattr_delay_storage_failing", None), 1);
    assert!(collector.metric("flowattr_delay_write_errors_total", None) >= 1);
    assert_eq!(collector.get("/healthz").0, 503);

    // Space again: the write goes through, the ack comes, and every flow comes out once.
    std::fs::remove_file(filler).unwrap();
    connection
        .stream()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(outcome(connection.recv_ack().unwrap()), accepted(9, 1));
    assert_eq!(collector.metric("flowattr_delay_storage_failing", None), 0);
    assert_eq!(collector.get("/healthz").0, 200);
    wait_for_records(&output, 3);
    std::thread::sleep(Duration::from_secs(1));
    let (_, counts) = read_output(&output);
    assert_eq!(counts.len(), 3);
    assert_eq!(collector.metric("flowattr_batches_accepted_total", None), 2);
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
}

#[test]
fn a_long_connection_reported_by_both_ends_is_one_dependency() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let collector = Collector::start(
        &output,
        &[
            "--cpus",
            "2",
            "--storage",
            "memory",
            "--delay",
            "1s",
            "--segment-span",
            "200ms",
        ],
    );
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(3_600));
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    // One connection api (10.0.0.1:40000) -> db (10.0.0.2:5432), open for 50 minutes: each
    // end reports it open every minute, then closed with its bytes. The db's clock is 200 ms
    // behind.
    let report = |outbound: bool, minute: u64, state: FlowState, bytes: u64| {
        let (local, remote) = if outbound {
            ((1, 40_000), (2, 5432))
        } else {
            ((2, 5432), (1, 40_000))
        };
        let skew = if outbound { 0 } else { 200 };
        FlowRecord {
            local_ip: ip(local.0),
            remote_ip: ip(remote.0),
            local_port: local.1,
            remote_port: remote.1,
            local_workload: Some(WorkloadIndex(0)),
            local_shared: false,
            start: at(100).saturating_sub(Duration::from_millis(skew)),
            end: at(100 + minute * 60).saturating_sub(Duration::from_millis(skew)),
            bytes_sent: bytes,
            bytes_received: bytes,
            segments_sent: 0,
            segments_received: 0,
            retransmits: 0,
            direction: if outbound {
                Direction::Outbound
            } else {
                Direction::Inbound
            },
            state,
        }
    };
    let mut batches = Vec::new();
    for (exporter, outbound, workload) in [(1, true, "api"), (2, false, "db")] {
        for minute in 1..=50 {
            let (state, bytes) = if minute == 50 {
                (FlowState::Closed, 3_000)
            } else {
                (FlowState::Open, 0)
            };
            batches.push(FlowBatch {
                exporter: ExporterId(exporter),
                sequence: minute,
                region: "test".into(),
                workloads: vec![workload.into()],
                flows: vec![report(outbound, minute, state, bytes)],
            });
        }
    }
    let mut connection = collector.connect();
    assert_eq!(connection.send_all(&batches, 8).unwrap().len(), 100);
    wait_for_records(&output, 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let edges = loop {
        let (status, body) = collector.get("/v1/deps");
        assert_eq!(status, 200);
        let edges: serde_json::Value = serde_json::from_str(&body).unwrap();
        if edges.as_array().is_some_and(|edges| !edges.is_empty())
            || std::time::Instant::now() > deadline
        {
            break edges;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let counts = |edges: &serde_json::Value| {
        edges
            .as_array()
            .unwrap()
            .iter()
            .map(|edge| {
                [
                    "client",
                    "server",
                    "attributed",
                    "connections",
                    "flows",
                    "bytes",
                ]
                .map(|field| edge[field].to_string())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        counts(&edges),
        [["\"api\"", "\"db\"", "true", "1", "50", "6000"].map(str::to_owned)]
    );
    // The connection is the edge's one sample, client first.
    let samples = edges[0]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!(samples[0]["client"], "10.0.0.1:40000");
    assert_eq!(samples[0]["server"], "10.0.0.2:5432");
    // A window that holds the reports counts the same; one long before them, nothing.
    let (status, body) = collector.get("/v1/deps?window=2h");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        counts(&serde_json::from_str(&body).unwrap()),
        counts(&edges)
    );
    let (status, body) =
        collector.get("/v1/deps?from=2020-01-01T00:00:00Z&to=2020-01-01T01:00:00Z");
    assert_eq!((status, body.as_str()), (200, "[]"));
    let (status, body) = collector.get("/v1/deps?window=soon");
    assert_eq!(status, 400, "{body}");
    let (_, dot) = collector.get("/v1/deps?format=dot");
    assert!(dot.contains(r#""api" -> "db" [label="1"];"#), "{dot}");
}

#[test]
fn the_default_relative_data_dir_works_from_any_working_directory() {
    // The default `delay.dir` is relative ("flowattr-data"): every file operation on it must
    // work relative to the working directory (glommio opened directories relative to no
    // descriptor, and the first segment's write failed with EBADF).
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let mut command = Collector::command(
        &output,
        &[
            "--cpus",
            "1",
            "--delay",
            "1s",
            "--segment-span",
            "200ms",
            "--max-retries",
            "0",
        ],
    );
    command.current_dir(dir.path());
    let collector = Collector::start_command(command, &output);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(10));
    let mut connection = collector.connect();
    connection
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let ack = connection
        .send_and_wait(&batch(1, 0, 1, "api", t0, &[(2, 1, 2)]))
        .unwrap();
    assert_eq!(outcome(ack), accepted(1, 0));
    wait_for_records(&output, 1);
    assert!(dir.path().join("flowattr-data/manifest").exists());
}
