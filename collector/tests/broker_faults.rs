//! A broker must not be able to kill a node. librdkafka 2.x can crash on a topic that was
//! deleted and created again under the same name (its metadata cache keys topics by id too):
//! exactly what a broker restarted empty does to a region's topics.

mod support;

use std::time::Duration;

use flowattr_bench::process::Broker;
use flowattr_common::Timestamp;
use support::{Collector, host_batch, send, start_node, wait_for_answer, wait_ready};

/// How many times the scenario runs: once in CI (region_faults.rs restarts the broker empty
/// too), 50 or more by hand (`FLOWATTR_BROKER_FAULT_TRIALS=50`).
fn trials() -> usize {
    std::env::var("FLOWATTR_BROKER_FAULT_TRIALS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1)
}

#[test]
fn a_broker_killed_and_restarted_empty_never_crashes_a_node() {
    let binary = Broker::binary_from_env().unwrap();
    for trial in 0..trials() {
        let broker = Broker::start(&binary).unwrap();
        let (port, brokers) = (broker.port(), broker.address.clone());
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Collector> = (1..=2)
            .map(|id| start_node(dir.path(), &brokers, id, &["--storage", "memory"]))
            .collect();
        for node in &nodes {
            wait_ready(node);
        }
        // Heartbeats reach node 1 every second throughout; the broker dies 10 s in and comes
        // back empty 8 s later, on the same address.
        let mut sequence = 0;
        let mut beat = |nodes: &mut Vec<Collector>, seconds: u64| {
            for _ in 0..seconds {
                std::thread::sleep(Duration::from_secs(1));
                for (id, node) in nodes.iter_mut().enumerate() {
                    assert!(
                        node.exited().is_none(),
                        "trial {trial}: node {} ended: {:?}",
                        id + 1,
                        node.exited()
                    );
                }
                let t0 = Timestamp::now().saturating_sub(Duration::from_secs(2));
                send(
                    &nodes[0],
                    &host_batch(10, sequence, 1, "api", t0, &[(9, 0, 1)]),
                );
                sequence += 1;
            }
        };
        beat(&mut nodes, 10);
        broker.kill();
        beat(&mut nodes, 8);
        let _broker = Broker::start_on(&binary, port).unwrap();
        beat(&mut nodes, 20);

        // Broadcast resumes: a claim only node 1 hears reaches node 2.
        let t0 = Timestamp::now().saturating_sub(Duration::from_secs(2));
        send(
            &nodes[0],
            &host_batch(77, 0, 77, "late-svc", t0, &[(9, 0, 1)]),
        );
        wait_for_answer(
            &nodes[1],
            77,
            t0.saturating_add(Duration::from_millis(500)),
            "\"owner\":\"late-svc\"",
        );
        // A topic the broker made again with other partitions is said on /healthz.
        for node in &nodes {
            let partitions = node.metric("flowattr_broadcast_topic_partitions", None);
            let (_, health) = node.get("/healthz");
            assert_eq!(
                partitions != 16,
                health.contains("degraded: topic flowattr-ownership has"),
                "{partitions}: {health}"
            );
        }
    }
}

/// The Kafka readers are processes of their own: one killed is replaced (and counted), the
/// node goes on, and what peers publish still reaches it, even once the node's executable has
/// been replaced on disk under it (an upgrade): the replacement is the running version.
#[test]
fn a_killed_kafka_reader_is_replaced_and_the_node_goes_on() {
    let (_broker, brokers) = support::start_broker(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Node 1 runs from a copy of the binary, deleted once it is running.
    let copy = dir.path().join("flowattr-collector");
    std::fs::copy(env!("CARGO_BIN_EXE_flowattr-collector"), &copy).unwrap();
    let output = dir.path().join("node-1.jsonl");
    let data = dir.path().join("data-1");
    let mut command = std::process::Command::new(&copy);
    command
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--sink",
        ])
        .arg(format!("file:{}", output.display()))
        .args([
            "--cpus",
            "2",
            "--brokers",
            &brokers,
            "--node-id",
            "1",
            "--storage",
            "memory",
            "--delay",
            "4s",
            "--max-retries",
            "0",
        ])
        .args([
            "--exporter-interval",
            "1s",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let first = Collector::start_command(command, &output);
    std::fs::remove_file(&copy).unwrap();
    let nodes = [
        first,
        start_node(dir.path(), &brokers, 2, &["--storage", "memory"]),
    ];
    for node in &nodes {
        wait_ready(node);
    }
    // Children are listed under the thread that started them.
    let readers: Vec<i32> = std::fs::read_dir(format!("/proc/{}/task", nodes[0].pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .map(|pid| pid.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect();
    assert!(
        !readers.is_empty(),
        "node 1 runs its Kafka reader as a child process"
    );
    for reader in readers {
        // SAFETY: signalling a child of our own child process.
        assert_eq!(unsafe { libc::kill(reader, libc::SIGKILL) }, 0);
    }
    nodes[0].wait_for_metric("flowattr_broadcast_reader_restarts_total", None, 1);
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(2));
    send(
        &nodes[1],
        &host_batch(88, 0, 88, "after-svc", t0, &[(9, 0, 1)]),
    );
    wait_for_answer(
        &nodes[0],
        88,
        t0.saturating_add(Duration::from_millis(500)),
        "\"owner\":\"after-svc\"",
    );
    assert_eq!(nodes[0].get("/healthz").0, 200);
}
