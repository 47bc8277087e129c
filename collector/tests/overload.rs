//! Overload: exporter-like senders go as fast as they can into a node whose only sink is
//! blocked (its stdout is a pipe nobody reads). The node must keep its resident memory under
//! `node.max_memory_bytes` and its delay buffer under `delay.max_buffer_bytes`, stop taking
//! flows (the senders' acks stop coming: their batches stay theirs), and once the sink reads
//! again, emit every flow it acked. The figures it prints are in docs/reliability.md.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
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
const BUFFER_CAP: u64 = 48 << 20;
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
    let Ok(shards) = std::fs::read_dir(data) else { return 0 };
    shards
        .flatten()
        .filter(|entry| entry.path().is_dir())
        .flat_map(|shard| std::fs::read_dir(shard.path()).into_iter().flatten().flatten())
        .filter_map(|entry| entry.metadata().ok())
        .map(|meta| meta.len())
        .sum()
}

/// Sends batches one after another, each counted once its ack arrives, until `stop`.
fn sender(exporter: u64, addr: SocketAddr, stop: Arc<AtomicBool>, acked: Arc<AtomicU64>) -> Vec<FlowKey> {
    let mut connection = CollectorConnection::connect(addr, Duration::from_secs(120)).unwrap();
    let mut keys = Vec::new();
    let mut sequence = 0;
    while !stop.load(Ordering::Relaxed) {
        let t0 = Timestamp::now().saturating_sub(Duration::from_secs(20));
        let flows = (0..FLOWS_PER_BATCH)
            .map(|i| {
                closed_flow(
                    (CanonicalIp::from(Ipv4Addr::new(10, 7, exporter as u8, 1)), 30_000 + i as u16),
                    (CanonicalIp::from(Ipv4Addr::new(10, 6, (i >> 8) as u8, i as u8)), 443),
                    Some(0),
                    t0,
                    t0.saturating_add(Duration::from_millis(5)),
                )
            })
            .collect();
        let ack = connection.send_and_wait(&batch_of(exporter, sequence, "loader", flows)).unwrap();
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
             [delay]\ndir = \"{}\"\ndelay = \"8s\"\nsegment_span = \"250ms\"\nmax_retries = 0\nmax_unwritten_bytes = {}\nmax_buffer_bytes = {BUFFER_CAP}\n\
             [[sinks]]\nkind = \"stdout\"\n",
            data.display(),
            4 << 20
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowattr-collector"));
    command
        .args(["run", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--config"])
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
    let senders: Vec<_> = (1..=3)
        .map(|exporter| {
            let (addr, stop, acked) = (collector.ingest, stop.clone(), acked.clone());
            std::thread::spawn(move || sender(exporter, addr, stop, acked))
        })
        .collect();

    // 20 s of load: the buffer fills to its cap within the delay, then the first segments fall
    // due and the blocked sink stops the releases too.
    let started = Instant::now();
    let mut max_buffer = 0;
    let mut acked_at = Vec::new();
    while started.elapsed() < Duration::from_secs(20) {
        max_buffer = max_buffer.max(segment_bytes(&data));
        acked_at.push((started.elapsed(), acked.load(Ordering::Relaxed)));
        std::thread::sleep(Duration::from_millis(50));
    }
    let acked_blocked = acked.load(Ordering::Relaxed);
    let five_seconds_before = acked_at
        .iter()
        .rev()
        .find(|(at, _)| *at <= Duration::from_secs(15))
        .map_or(0, |(_, count)| *count);
    let buffered_metric = collector.metric("flowattr_delay_buffered_bytes", None);

    // The sink reads again; the senders stop after the batch they are sending is acked.
    stop.store(true, Ordering::Relaxed);
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
    let keys: Vec<FlowKey> = senders.into_iter().flat_map(|sender| sender.join().unwrap()).collect();
    let deadline = unblocked + Duration::from_secs(180);
    let drained = loop {
        let missing = keys.iter().filter(|key| !emitted.lock().unwrap().contains(key)).count();
        if missing == 0 {
            break unblocked.elapsed();
        }
        assert!(Instant::now() < deadline, "{missing} of {} acked flows never came out", keys.len());
        std::thread::sleep(Duration::from_millis(100));
    };
    // Once the flows are out, the memory they held goes back, and ingest reads again.
    let resumed = Instant::now() + Duration::from_secs(30);
    while collector.metric("flowattr_ingest_memory_paused", None) == 1 {
        assert!(Instant::now() < resumed, "ingest stayed paused after the drain, at RSS {} MiB", rss_of(pid) >> 20);
        std::thread::sleep(Duration::from_millis(50));
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let max_rss = max_rss.load(Ordering::Relaxed);
    let pauses = collector.metric("flowattr_ingest_memory_pauses_total", None);
    eprintln!(
        "overload: idle RSS {} MiB, max RSS {} MiB (cap {} MiB; ingest paused {pauses} times); delay buffer at most {} MiB on disk (cap {} MiB; {} MiB by the node's count at the end of the block); \
         {acked_blocked} flows acked in 20 s of load ({} in its last 5 s); every one of the {} acked flows out {:.1} s after the sink returned",
        idle_rss >> 20,
        max_rss >> 20,
        MEMORY_CAP >> 20,
        max_buffer >> 20,
        BUFFER_CAP >> 20,
        buffered_metric >> 20,
        acked_blocked - five_seconds_before,
        keys.len(),
        drained.as_secs_f64(),
    );
    assert!(max_rss <= MEMORY_CAP, "RSS {max_rss} over the cap {MEMORY_CAP}");
    // One batch being taken when the cap was reached may pass it.
    assert!(max_buffer <= BUFFER_CAP + (1 << 20), "buffer {max_buffer} over the cap {BUFFER_CAP}");
    assert!(max_buffer >= BUFFER_CAP / 2, "the load never filled the buffer ({max_buffer} bytes): the test did not test");
    assert_eq!(acked_blocked, five_seconds_before, "flows were still taken with the sink blocked and the buffer full");
}
