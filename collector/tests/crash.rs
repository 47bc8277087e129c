//! The collector killed with SIGKILL where it holds data: in the middle of a file sink's
//! write, and in its first milliseconds (while it prepares its data directory and replays).
//! After every kill it must start again, and a reader of the output, line by line, must find
//! every flow that was ever acked.
//!
//! CI runs a few dozen cycles; `FLOWATTR_CRASH_CYCLES=1000 cargo test --release --test crash`
//! runs them at length.

mod support;

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flowattr_common::wire::{AckStatus, ExporterId, FlowBatch};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, FlowKey, closed_flow};

fn cycles(default: usize) -> usize {
    std::env::var("FLOWATTR_CRASH_CYCLES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default)
}

/// A batch of `flows` flows from one host; flow `i` goes to a remote picked by `i`.
fn batch(sequence: u64, flows: usize) -> FlowBatch {
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(30));
    FlowBatch {
        exporter: ExporterId(7),
        sequence,
        region: "test".into(),
        workloads: vec!["crash-test-client".into()],
        flows: (0..flows)
            .map(|i| {
                closed_flow(
                    (CanonicalIp::from(Ipv4Addr::new(10, 9, 0, 1)), 30_000 + (i % 30_000) as u16),
                    (CanonicalIp::from(Ipv4Addr::new(10, 9, 1 + (i / 250) as u8, (i % 250) as u8)), 443),
                    Some(0),
                    t0,
                    t0.saturating_add(Duration::from_millis(10)),
                )
            })
            .collect(),
    }
}

/// The flows of complete lines (ending in a newline) of the output, as a line reader sees them:
/// every complete line must be a whole JSON record.
fn complete_lines(path: &Path) -> HashSet<FlowKey> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("a line a reader cannot parse ({error}): {line:.200}"));
            (
                record["exporter"].as_u64().unwrap(),
                record["sequence"].as_u64().unwrap(),
                record["index"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Whether the file's last byte is not a newline: a write is in progress (or was cut).
fn ends_mid_line(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(length) = file.metadata().map(|meta| meta.len()) else {
        return false;
    };
    if length == 0 || file.seek(SeekFrom::Start(length - 1)).is_err() {
        return false;
    }
    let mut last = [0u8];
    file.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

fn sigkill(pid: u32) {
    // SAFETY: signalling a child of this test that has not been reaped yet (its Collector
    // reaps it on drop).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

#[test]
fn a_line_reader_finds_every_acked_flow_across_sigkills_during_sink_writes() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let args = [
        "--cpus", "1",
        "--data-dir", data.to_str().unwrap(),
        "--delay", "1s",
        "--segment-span", "100ms",
        "--retry-delay", "1s",
        "--max-retries", "0",
    ];
    let mut acked: HashSet<FlowKey> = HashSet::new();
    let mut sequence = 0u64;
    let mut torn = 0;
    let cycles = cycles(12);
    for cycle in 0..cycles {
        let collector = Collector::start(&output, &args);
        let pid = collector.pid();
        // An exporter-like sender: batches of 1,000 flows (about 0.5 MB of output each), each
        // counted only once acked.
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let mut connection = collector.connect();
            let stop = stop.clone();
            let first = sequence;
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut sequence = first;
                while !stop.load(Ordering::Relaxed) {
                    let batch = batch(sequence, 1_000);
                    // A batch sent just before a kill and sent again after it is acked
                    // `Duplicate` if it was durable: acked either way, as for an exporter.
                    match connection.send_and_wait(&batch) {
                        Ok(_) => acked.push((sequence, batch.flows.len())),
                        Err(_) => break,
                    }
                    sequence += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                (acked, sequence)
            })
        };
        // Once releases have begun, kill the node the moment the output's tail is not a line
        // end, i.e. while a sink write is copying its chunk into the file; if none is caught
        // in time, kill it anyway.
        let released_by = Instant::now() + Duration::from_millis(1_500);
        let give_up = released_by + Duration::from_millis(1_000 + fastrand::u64(..2_000));
        loop {
            let now = Instant::now();
            if now > give_up || (now > released_by && ends_mid_line(&output)) {
                break;
            }
            std::hint::spin_loop();
        }
        sigkill(pid);
        stop.store(true, Ordering::Relaxed);
        if ends_mid_line(&output) {
            torn += 1;
        }
        drop(collector);
        let (batches, next) = sender.join().unwrap();
        sequence = next;
        for (sequence, flows) in batches {
            acked.extend((0..flows as u64).map(|index| (7, sequence, index)));
        }
        eprintln!("cycle {cycle}: {} flows acked so far, {torn} kills cut a line", acked.len());
    }
    assert!(torn > 0, "no kill of {cycles} landed inside a sink write: the test did not test");

    // One last life with no sender: every acked flow comes out, and every line parses.
    let _collector = Collector::start(&output, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found = complete_lines(&output);
        let missing = acked.difference(&found).count();
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} of {} acked flows never came out", acked.len());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_killed_in_its_first_milliseconds_always_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let args = [
        "--cpus", "2",
        "--data-dir", data.to_str().unwrap(),
        "--delay", "20s",
        "--segment-span", "200ms",
        "--max-retries", "0",
    ];
    // Flows buffered (and acked) before the kills, due long after them: each early kill lands
    // in start-up or replay of real segments.
    let collector = Collector::start(&output, &args);
    let mut connection = collector.connect();
    let batches: Vec<FlowBatch> = (0..5).map(|sequence| batch(sequence, 200)).collect();
    let acks = connection.send_all(&batches, 4).unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    collector.kill();

    for attempt in 0..cycles(40) {
        let mut child = Collector::command(&output, &args).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_micros(fastrand::u64(..8_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        // It starts again at once (the ready line comes, or Collector::start panics).
        if attempt % 4 == 0 {
            Collector::start(&output, &args).kill();
        }
    }
    let manifest = std::fs::read_to_string(data.join("manifest")).unwrap();
    assert_eq!(manifest, "shards=2\n");
    let _collector = Collector::start(&output, &args);
    let expected: HashSet<FlowKey> = (0..5).flat_map(|sequence| (0..200).map(move |index| (7, sequence, index))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(&complete_lines(&output)) {
        assert!(Instant::now() < deadline, "acked flows did not come out after the early kills");
        std::thread::sleep(Duration::from_millis(200));
    }
}
