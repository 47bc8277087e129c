//! The node on a host that narrows it: shards stay within the CPUs the process may run on.

mod support;

use std::process::{Command, Stdio};

use support::Collector;

/// The CPUs each of the process's threads named `prefix*` may run on.
fn thread_cpus(pid: u32, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        found.push(cpus.trim().to_owned());
    }
    found
}

#[test]
fn shards_are_pinned_within_the_cpu_set_even_when_it_is_smaller_than_node_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flows.jsonl");
    let data = dir.path().join("buffer");
    // The last CPU alone; two shards asked for. glommio's own choice would pin one shard to
    // another CPU, outside the set.
    let cpu = (std::thread::available_parallelism().unwrap().get() - 1).to_string();
    let mut command = Command::new("taskset");
    command
        .args(["-c", &cpu, env!("CARGO_BIN_EXE_flowattr-collector"), "run"])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--cpus",
            "2",
            "--storage",
            "disk",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--sink")
        .arg(format!("file:{}", output.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let node = Collector::start_command(command, &output);
    let shards = thread_cpus(node.pid(), "flowattr-shard");
    assert!(!shards.is_empty(), "no shard threads found");
    assert!(
        shards.iter().all(|cpus| *cpus == cpu),
        "shard threads' CPUs: {shards:?}, the set: {cpu}"
    );
    // Both shards run: the node answers, and each shard counts its own series.
    let (status, metrics) = node.get("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("shard=\"1\""), "{metrics}");
    node.kill();
}
