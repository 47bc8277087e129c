//! Overload: exporter-like senders go as fast as they can into a node whose only sink is
//! blocked (its stdout is a pipe nobody reads). The node must keep its resident memory under
//! `node.max_memory_bytes` and its delay buffer under `delay.max_buffer_bytes`, stop taking
//! flows (the senders' acks stop coming: their batches stay theirs), and once the sink reads
//! again, emit every flow it acked. The load runs until the buffer is at its cap, however fast
//! the machine. The figures it prints are in docs/reliability.md.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::AckStatus;
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, FlowKey, batch_of, closed_flow, parse_line};

const MEMORY_CAP: u64 = 160 << 20;
const BUFFER_CAP: u64 = 12 << 20;
const MAX_UNWRITTEN: u64 = 1 << 20;
const DELAY: Duration = Duration::from_secs(60);
const FLOWS_PER_BATCH: usize = 4_000;

/// Resident bytes of process `pid`.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// Bytes of every segment file under `data`.
fn segment_bytes(data: &Path) -> u64 {
    let Ok(shards) = std::fs::read_dir(data) else {
        return 0;
    };
    shards
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .flat_map(|shard| {
            std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| meta.len())
        .sum()
}

/// Sends batches one after another, each counted once its ack arrives, until `stop` or until
/// its connection is shut down (the batch then in flight was never acked: it stays the
/// sender's). A clone of the connection's socket goes to `sockets` for that.
fn sender(
    exporter: u64,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
) -> Vec<FlowKey> {
    let mut connection = CollectorConnection::connect(addr, Duration::from_secs(300)).unwrap();
    sockets
        .lock()
        .unwrap()
        .push(connection.stream().try_clone().unwrap());
    let mut keys = Vec::new();
    let mut sequence = 0;
    while !stop.load(Ordering::Relaxed) {
        // Flows as varied as a busy host's, so that the buffer fills with few of them and the
        // drain after the block is short.
        let t0 = Timestamp::now().saturating_sub(Duration::from_secs(20));
        let flows = (0..FLOWS_PER_BATCH)
            .map(|_| {
                let start = t0.saturating_add(Duration::from_micros(fastrand::u64(..10_000_000)));
                let mut flow = closed_flow(
                    (
                        CanonicalIp::from(Ipv4Addr::new(10, 7, exporter as u8, 1)),
                        fastrand::u16(1024..),
                    ),
                    (
                        CanonicalIp::from(Ipv4Addr::from(0x0a00_0000 | fastrand::u32(..1 << 24))),
                        fastrand::u16(1..),
                    ),
                    Some(0),
                    start,
                    start.saturating_add(Duration::from_micros(fastrand::u64(..5_000_000))),
                );
                flow.bytes_sent = fastrand::u64(..1 << 30);
                flow.bytes_received = fastrand::u64(..1 << 30);
                flow.segments_sent = fastrand::u32(..1 << 20);
                flow.segments_received = fastrand::u32(..1 << 20);
                flow
            })
            .collect();
        let Ok(ack) = connection.send_and_wait(&batch_of(exporter, sequence, "loader", flows))
        else {
            assert!(
                stop.load(Ordering::Relaxed),
                "the connection failed before the test shut it down"
            );
            break;
        };
        assert_eq!(ack.status, AckStatus::Accepted);
        keys.extend((0..FLOWS_PER_BATCH as u64).map(|index| (exporter, sequence, index)));
        acked.fetch_add(FLOWS_PER_BATCH as u64, Ordering::Relaxed);
        sequence += 1;
    }
    keys
}

#[test]
fn with_its_sink_blocked_the_node_stays_under_its_caps_stops_taking_flows_and_drains_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("buffer");
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ncpus = 1\nmax_memory_bytes = {MEMORY_CAP}\n\
             [delay]\ndir = \"{}\"\ndelay = \"{}s\"\nsegment_span = \"250ms\"\nmax_retries = 0\nmax_unwritten_bytes = {MAX_UNWRITTEN}\nmax_buffer_bytes = {BUFFER_CAP}\n\
             [[sinks]]\nkind = \"stdout\"\n",
            data.display(),
            DELAY.as_secs(),
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowattr-collector"));
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut collector = Collector::start_command(command, &dir.path().join("unused"));
    // Nobody reads it yet: once the pipe's 64 KiB are full, every sink write blocks.
    let stdout = collector.take_stdout();
    let pid = collector.pid();
    let idle_rss = rss_of(pid);
    // RSS sampled every 10 ms for the whole run, load and drain.
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (max_rss, sampling) = (max_rss.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                max_rss.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let sockets = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (1..=3)
        .map(|exporter| {
            let (addr, stop, acked, sockets) = (
                collector.ingest,
                stop.clone(),
                acked.clone(),
                sockets.clone(),
            );
            std::thread::spawn(move || sender(exporter, addr, stop, acked, sockets))
        })
        .collect();

    // Load until the buffer is at its cap: the shard stops taking flows once what it holds and
    // one more write would pass its share. The delay is long enough for a slow, busy machine
    // to get there before anything falls due (after that, the blocked sink would stop intake
    // first, and the buffer cap would go untested).
    let started = Instant::now();
    let mut max_buffer = 0;
    let stop_at = BUFFER_CAP - MAX_UNWRITTEN;
    let full_at = loop {
        max_buffer = max_buffer.max(segment_bytes(&data));
        if collector.metric("flowattr_delay_buffered_bytes", None) >= stop_at {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < DELAY - Duration::from_secs(5),
            "after {:?} of load the buffer holds {} of {stop_at} bytes ({} flows acked): too slow to fill it within the delay",
            started.elapsed(),
            collector.metric("flowattr_delay_buffered_bytes", None),
            acked.load(Ordering::Relaxed),
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A batch being written as the cap was reached may still be acked; after that, nothing,
    // through the time the first segments fall due and meet the blocked sink, and 5 s more.
    std::thread::sleep(Duration::from_secs(1));
    let acked_full = acked.load(Ordering::Relaxed);
    let unblock_at = (DELAY + Duration::from_secs(5)).max(full_at + Duration::from_secs(6));
    while started.elapsed() < unblock_at {
        max_buffer = max_buffer.max(segment_bytes(&data));
        std::thread::sleep(Duration::from_millis(50));
    }
    let buffered_metric = collector.metric("flowattr_delay_buffered_bytes", None);
    // The senders give up the batches they are waiting on (unacked, so still theirs): acked
    // after the sink returns, they would fall due a whole delay later.
    stop.store(true, Ordering::Relaxed);
    for socket in sockets.lock().unwrap().iter() {
        let _ = socket.shutdown(Shutdown::Both);
    }
    let keys: Vec<FlowKey> = senders
        .into_iter()
        .flat_map(|sender| sender.join().unwrap())
        .collect();
    let acked_blocked = acked.load(Ordering::Relaxed);

    // The sink reads again.
    let unblocked = Instant::now();
    let emitted = Arc::new(Mutex::new(HashSet::<FlowKey>::new()));
    {
        let emitted = emitted.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let (key, _) = parse_line(&line);
                emitted.lock().unwrap().insert(key);
            }
        });
    }
    let deadline = unblocked + Duration::from_secs(300);
    let drained = loop {
        let missing = {
            let emitted = emitted.lock().unwrap();
            keys.iter().filter(|key| !emitted.contains(key)).count()
        };
        if missing == 0 {
            break unblocked.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acked flows never came out",
            keys.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    // Once the flows are out, the memory they held goes back, and ingest reads again.
    let resumed = Instant::now() + Duration::from_secs(30);
    while collector.metric("flowattr_ingest_memory_paused", None) == 1 {
        assert!(
            Instant::now() < resumed,
            "ingest stayed paused after the drain, at RSS {} MiB",
            rss_of(pid) >> 20
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let max_rss = max_rss.load(Ordering::Relaxed);
    let pauses = collector.metric("flowattr_ingest_memory_pauses_total", None);
    eprintln!(
        "overload: idle RSS {} MiB, max RSS {} MiB (cap {} MiB; ingest paused {pauses} times); delay buffer at most {} MiB on disk (cap {} MiB; {} MiB by the node's count at the end of the block); \
         buffer full after {:.1} s of load with {acked_full} flows acked, {} more acked in the {:.1} s after it (the first due at {} s); every one of the {} acked flows out {:.1} s after the sink returned",
        idle_rss >> 20,
        max_rss >> 20,
        MEMORY_CAP >> 20,
        max_buffer >> 20,
        BUFFER_CAP >> 20,
        buffered_metric >> 20,
        full_at.as_secs_f64(),
        acked_blocked - acked_full,
        (unblock_at - full_at - Duration::from_secs(1)).as_secs_f64(),
        DELAY.as_secs(),
        keys.len(),
        drained.as_secs_f64(),
    );
    assert!(
        max_rss <= MEMORY_CAP,
        "RSS {max_rss} over the cap {MEMORY_CAP}"
    );
    // One batch being taken when the cap was reached may pass it.
    assert!(
        max_buffer <= BUFFER_CAP + (1 << 20),
        "buffer {max_buffer} over the cap {BUFFER_CAP}"
    );
    assert_eq!(
        acked_blocked, acked_full,
        "flows were still taken with the buffer full and the sink blocked"
    );
}
