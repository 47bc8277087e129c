//! The collector killed with SIGKILL where it holds data: at random moments of its life while
//! exporter-like senders send and resend, in the middle of a file sink's write, and in its
//! first milliseconds (while it prepares its data directory and replays). After every kill it
//! must start again, and a reader of the output, line by line, must find every flow that was
//! ever acked.
//!
//! CI runs a few dozen cycles of each; at length (docs/reliability.md):
//! `FLOWATTR_CRASH_CYCLES=1000 cargo test --release -p flowattr-collector --test crash -- --nocapture no_acked`.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, ExporterId, FlowBatch};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, FlowKey, closed_flow, parse_line, read_output};

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
                    (
                        CanonicalIp::from(Ipv4Addr::new(10, 9, 0, 1)),
                        30_000 + (i % 30_000) as u16,
                    ),
                    (
                        CanonicalIp::from(Ipv4Addr::new(
                            10,
                            9,
                            1 + (i / 250) as u8,
                            (i % 250) as u8,
                        )),
                        443,
                    ),
                    Some(0),
                    t0,
                    t0.saturating_add(Duration::from_millis(10)),
                )
            })
            .collect(),
    }
}

/// The flows of complete lines (ending in a newline) of the output, as a line reader sees them.
fn complete_lines(path: &Path) -> HashSet<FlowKey> {
    read_output(path).1.into_keys().collect()
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

/// One shard whose flows are released a second after they arrive, from segments of 100 ms:
/// every part of a node's life happens within a short one.
fn quick_node(data: &Path) -> Vec<&str> {
    vec![
        "--cpus",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "1s",
        "--segment-span",
        "100ms",
        "--retry-delay",
        "1s",
        "--max-retries",
        "0",
    ]
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
    let args = quick_node(&data);
    let mut acked: HashSet<FlowKey> = HashSet::new();
    let mut sequence = 0u64;
    let mut torn = 0;
    // At least `cycles` kills, and on until one has landed inside a sink write: a slow or
    // busy machine may take more tries to catch one (bounded, then the test says it did not).
    let cycles = cycles(12);
    let mut cycle = 0;
    while cycle < cycles || (torn == 0 && cycle < cycles * 5) {
        cycle += 1;
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
        eprintln!(
            "cycle {cycle}: {} flows acked so far, {torn} kills cut a line",
            acked.len()
        );
    }
    assert!(
        torn > 0,
        "no kill of {cycle} landed inside a sink write: the test did not test"
    );

    // One last life with no sender: every acked flow comes out, and every line parses.
    let _collector = Collector::start(&output, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let found = complete_lines(&output);
        let missing = acked.difference(&found).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acked flows never came out",
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_killed_in_its_first_milliseconds_always_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let args = [
        "--cpus",
        "2",
        "--data-dir",
        data.to_str().unwrap(),
        "--delay",
        "20s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
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
        let mut child = Collector::command(&output, &args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
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
    let expected: HashSet<FlowKey> = (0..5)
        .flat_map(|sequence| (0..200).map(move |index| (7, sequence, index)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(&complete_lines(&output)) {
        assert!(
            Instant::now() < deadline,
            "acked flows did not come out after the early kills"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The lines of `path` past `offset` that end in a newline, counted into `seen` by flow; moves
/// `offset` past them and returns (lines, lines of flows already seen). A cut last line is left
/// for the next restart to remove.
fn read_new_lines(path: &Path, offset: &mut u64, seen: &mut HashMap<FlowKey, u32>) -> (u64, u64) {
    let Ok(mut file) = std::fs::File::open(path) else {
        return (0, 0);
    };
    file.seek(SeekFrom::Start(*offset)).unwrap();
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    let Some(end) = text.rfind('\n') else {
        return (0, 0);
    };
    let (mut lines, mut duplicates) = (0, 0);
    for line in text[..=end].lines() {
        let (key, _) = parse_line(line);
        let count = seen.entry(key).or_default();
        duplicates += u64::from(*count > 0);
        *count += 1;
        lines += 1;
    }
    *offset += end as u64 + 1;
    (lines, duplicates)
}

/// An exporter as the collector sees it across crashes: it sends its oldest unacked batch until
/// an ack comes, reconnecting to the same address after every failure and resending; a flow
/// counts as acked only once its batch's ack (Accepted or Duplicate) has arrived.
fn exporter_like_sender(
    exporter: u64,
    host: u8,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    acked_flows: Arc<AtomicU64>,
) -> HashSet<FlowKey> {
    let mut acked = HashSet::new();
    let mut sequence = 0u64;
    let mut pending: Option<FlowBatch> = None;
    let mut connection: Option<CollectorConnection> = None;
    while !stop.load(Ordering::Relaxed) {
        let batch = pending.get_or_insert_with(|| {
            sequence += 1;
            let mut batch = batch(sequence, 100);
            batch.exporter = ExporterId(exporter);
            for flow in &mut batch.flows {
                flow.local_ip = CanonicalIp::from(Ipv4Addr::new(10, 9, 0, host));
            }
            batch
        });
        let Some(open) = connection.as_mut() else {
            match CollectorConnection::connect(addr, Duration::from_secs(2)) {
                Ok(open) => connection = Some(open),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        match open.send_and_wait(batch) {
            Ok(ack) => {
                assert!(
                    matches!(ack.status, AckStatus::Accepted | AckStatus::Duplicate)
                        && ack.refused.is_empty(),
                    "batch {} refused: {ack:?}",
                    batch.sequence
                );
                acked.extend(
                    (0..batch.flows.len() as u64).map(|index| (exporter, batch.sequence, index)),
                );
                acked_flows.fetch_add(batch.flows.len() as u64, Ordering::Relaxed);
                pending = None;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(_) => connection = None,
        }
    }
    acked
}

/// The node killed at random moments of its life (start-up, replay, ingest, fsync, release,
/// sink write, segment delete; a third of the kills within 300 ms of the start) while two
/// exporter-like senders keep sending and resending. Every start must succeed, and after the
/// last one every acked flow must come out; duplicates are counted per cycle and reported.
#[test]
fn no_acked_flow_is_lost_across_sigkills_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    let log_path = dir.path().join("collector.log");
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let listen = addr.to_string();
    let args = [&["--listen", listen.as_str()][..], &quick_node(&data)].concat();
    let stop = Arc::new(AtomicBool::new(false));
    let acked_flows = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = [(21, 21), (22, 22)]
        .into_iter()
        .map(|(exporter, host)| {
            let (stop, acked_flows) = (stop.clone(), acked_flows.clone());
            std::thread::spawn(move || {
                exporter_like_sender(exporter, host, addr, stop, acked_flows)
            })
        })
        .collect();

    let mut seen: HashMap<FlowKey, u32> = HashMap::new();
    let mut offset = 0;
    let (mut total_duplicates, mut cycles_with_duplicates, mut most_in_a_cycle) = (0, 0, 0);
    let cycles = cycles(30);
    for cycle in 0..cycles {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Collector::command(&output, &args)
            .stderr(log)
            .spawn()
            .unwrap();
        let life = Duration::from_millis(match fastrand::u8(..3) {
            0 => fastrand::u64(..300),
            _ => fastrand::u64(..3_000),
        });
        let killed_at = Instant::now() + life;
        while Instant::now() < killed_at {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "cycle {cycle}: the node exited by itself ({status}); its log ends:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let (lines, duplicates) = read_new_lines(&output, &mut offset, &mut seen);
        total_duplicates += duplicates;
        cycles_with_duplicates += u64::from(duplicates > 0);
        most_in_a_cycle = most_in_a_cycle.max(duplicates);
        eprintln!(
            "cycle {cycle}: killed after {} ms; {} flows acked so far; {lines} lines out, {duplicates} duplicates",
            life.as_millis(),
            acked_flows.load(Ordering::Relaxed),
        );
    }
    stop.store(true, Ordering::Relaxed);

    // One last life: a sender's last batch may still be on its way; let it finish first.
    let collector = Collector::start(&output, &args);
    let acked: HashSet<FlowKey> = senders
        .into_iter()
        .flat_map(|sender| sender.join().unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, duplicates) = read_new_lines(&output, &mut offset, &mut seen);
        total_duplicates += duplicates;
        let missing = acked.iter().filter(|key| !seen.contains_key(key)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acked flows never came out",
            acked.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(collector);
    eprintln!(
        "{cycles} SIGKILLs: {} flows acked, 0 lost, 0 failed starts; {total_duplicates} duplicate lines \
         ({:.3}% of acked), in {cycles_with_duplicates} cycles, at most {most_in_a_cycle} in one",
        acked.len(),
        100.0 * total_duplicates as f64 / acked.len().max(1) as f64,
    );
    assert!(
        acked.len() as u64 >= 100 * cycles as u64 / 2,
        "too few flows acked for the test to test"
    );
}
