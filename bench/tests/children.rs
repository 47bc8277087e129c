//! A benchmark killed mid-run (by a user, or a CI job's timeout) takes the processes it
//! started with it: no broker or collector is left holding memory and CPU.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flowattr_common::proc_stat::ProcStat;

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&pid| stat(pid).is_some_and(|stat| stat.parent() == Some(parent)))
        .collect()
}

/// None once the process is gone.
fn stat(pid: u32) -> Option<ProcStat> {
    ProcStat::read(format!("/proc/{pid}/stat")).ok()
}

fn name(pid: u32) -> String {
    stat(pid)
        .map(|stat| stat.name().to_owned())
        .unwrap_or_default()
}

/// Whether `pid` still runs: a zombie has ended, whether or not anyone reaps it.
fn running(pid: u32) -> bool {
    stat(pid).is_some_and(|stat| stat.running())
}

#[test]
fn a_benchmark_killed_mid_run_leaves_no_broker_or_collector_behind() {
    let mut bench = Command::new(env!("CARGO_BIN_EXE_flowattr-bench"))
        .args(["pipeline", "--sink", "kafka-columns", "--seconds", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the benchmark starts");
    // The broker starts first, then the collector.
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let started = children(bench.id());
        if started.iter().any(|&pid| name(pid) == "flowattr-collec") {
            break started;
        }
        assert!(
            bench.try_wait().unwrap().is_none(),
            "the benchmark ended before it started a collector"
        );
        assert!(
            Instant::now() < deadline,
            "no collector started in 120 s (children: {started:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Into the run: the collector has taken flows for a few seconds.
    std::thread::sleep(Duration::from_secs(5));
    let names: Vec<String> = started.iter().map(|&pid| name(pid)).collect();
    assert!(
        names.iter().any(|name| name == "tansu") && started.iter().all(|&pid| running(pid)),
        "the broker and the collector run: {names:?}"
    );
    bench.kill().unwrap();
    bench.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.iter().any(|&pid| running(pid)) {
        let left: Vec<String> = started
            .iter()
            .filter(|&&pid| running(pid))
            .map(|&pid| format!("{} ({pid})", name(pid)))
            .collect();
        assert!(
            Instant::now() < deadline,
            "10 s after the benchmark was killed, still running: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
