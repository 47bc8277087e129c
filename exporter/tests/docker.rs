//! Workload identity from a real Docker daemon: containers on a user-defined bridge network
//! start and stop in churn, their IPs passing from a container of one name to one of another,
//! and they keep connecting to each other. No address is registered by hand: the exporter's
//! watcher names them. Every flow the collector writes names each side as the container that
//! held the address at the flow's start, or leaves it unnamed; the agent and the daemon are
//! restarted meanwhile.
//!
//! Needs root, Debian's `docker.io` (dockerd) and `busybox-static` (the containers' one
//! binary, imported as an image: no registry is reachable). `.ci/run` installs both.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use flowattr_common::Timestamp;
use serde_json::Value;
use support::docker::{DockerDaemon, import_busybox};
use support::holdings::{Holdings, Platform};
use support::{Scratch, assert_promtool_clean, require_root};

/// An RFC 3339 instant as Docker writes it, through date(1).
fn parse_docker_time(text: &str) -> Option<Timestamp> {
    let output = Command::new("date")
        .args(["-u", "-d", text, "+%s%N"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()
        .map(Timestamp::from_nanos)
}

const SLOTS: usize = 12;
/// At least this many generations of containers (36 containers), and more while the output
/// holds fewer than [`FLOWS_WANTED`] container-to-container flows (a slow machine connects
/// less often), up to [`GENERATIONS_MAX`].
const GENERATIONS: usize = 3;
const GENERATIONS_MAX: usize = 12;
const FLOWS_WANTED: usize = 400;
const SUBNET: &str = "172.31.250";

const NETWORK: &str = "flowattr-churn";

/// Deletes the bridges a killed earlier run of this test left on the host with its subnet.
fn remove_stale_bridges() {
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let mut words = line.split_whitespace();
        let name = words.nth(1).unwrap_or("");
        if name.starts_with("br-") && line.contains(&format!("{SUBNET}.1/24")) {
            let _ = Command::new("ip").args(["link", "del", name]).status();
        }
    }
}

fn slot_ip(slot: usize) -> String {
    format!("{SUBNET}.{}", 10 + slot)
}

#[test]
fn containers_in_churn_are_named_by_the_docker_watcher_and_never_wrongly() {
    require_root();
    let scratch = Scratch::new("docker");
    let daemon_dir = scratch.dir.path().join("docker");
    let mut daemon = DockerDaemon::start(&daemon_dir);
    let image = import_busybox(&daemon, scratch.dir.path());
    remove_stale_bridges();
    daemon.must(&[
        "network",
        "create",
        "--driver",
        "bridge",
        "--subnet",
        &format!("{SUBNET}.0/24"),
        NETWORK,
    ]);

    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let socket = daemon.socket().display().to_string();
    let watch = ["--runtime", "docker", "--runtime-socket", socket.as_str()];
    let mut exporter = Some(scratch.start_exporter_with(collector.ingest_addr, &watch));

    // Every container serves a page and fetches one from a random slot's address every 0.3 s
    // (with nc: a static glibc busybox's wget crashes looking up names).
    let script = format!(
        "httpd -p 8080 -h /www; while true; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {SUBNET}.$((10 + RANDOM % {SLOTS})) 8080 >/dev/null; sleep 0.3; done"
    );
    let mut held = Holdings::default();
    // When Docker says each container started (`State.StartedAt`).
    let mut started: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut running: Vec<Option<String>> = vec![None; SLOTS];
    let (mut agent_restarted, mut daemon_restarted) = (false, false);
    let container_flows = || {
        let in_subnet = |record: &Value, field: &str| {
            record[field]
                .as_str()
                .is_some_and(|ip| ip.starts_with(SUBNET))
        };
        scratch
            .records()
            .iter()
            .filter(|record| in_subnet(record, "local_ip") && in_subnet(record, "remote_ip"))
            .count()
    };
    #[allow(clippy::needless_range_loop)] // slots are addresses, and the restarts come at one
    for generation in 0..GENERATIONS_MAX {
        if generation >= GENERATIONS && container_flows() >= FLOWS_WANTED {
            break;
        }
        for slot in 0..SLOTS {
            if generation == 1 && slot == SLOTS / 2 && !agent_restarted {
                // SIGKILL mid-churn: the new agent lists everything again.
                drop(exporter.take());
                exporter = Some(scratch.start_exporter_with(collector.ingest_addr, &watch));
                agent_restarted = true;
            }
            if generation == 2 && slot == SLOTS / 2 && !daemon_restarted {
                daemon.restart(|| {
                    exporter
                        .as_ref()
                        .expect("running")
                        .wait_until_runtime_seen_away("docker");
                });
                daemon_restarted = true;
            }
            let ip = slot_ip(slot);
            if let Some(name) = running[slot].take() {
                let _ = daemon.docker(&["rm", "-f", &name]);
                held.end(&ip, Timestamp::now());
            }
            // Each generation's container has a name of its own: the address passes to
            // another workload.
            let name = format!("w{slot}-g{generation}");
            let platform = Platform {
                instance: name.clone(),
                owner_kind: "Container".into(),
                ..Platform::default()
            };
            held.begin(&ip, &name, platform, Timestamp::now());
            daemon.must(&[
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                NETWORK,
                "--ip",
                &ip,
                image,
                "/bin/sh",
                "-c",
                &script,
            ]);
            if let Some(at) =
                parse_docker_time(&daemon.must(&["inspect", "-f", "{{.State.StartedAt}}", &name]))
            {
                started.insert(name.clone(), at);
            }
            running[slot] = Some(name);
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let exporter = exporter.unwrap();
    let resyncs =
        exporter.metric_value("flowattr_exporter_identity_resyncs_total{runtime=\"docker\"}");
    let corrected =
        exporter.metric_value("flowattr_exporter_identity_corrected_total{runtime=\"docker\"}");
    assert!(
        resyncs >= 2.0,
        "the daemon's restart made the watcher list everything again: {resyncs}"
    );
    assert!(
        corrected >= 1.0,
        "the containers stopped with the daemon were corrected by the listing: {corrected}"
    );
    let (_, health) = exporter.tcp_request("GET", "/healthz");
    assert_eq!(health, "ok\n");
    // With the runtime watcher's series too.
    assert_promtool_clean("the exporter's", &exporter.tcp_request("GET", "/metrics").1);
    for (slot, running) in running.iter_mut().enumerate() {
        if let Some(name) = running.take() {
            let _ = daemon.docker(&["rm", "-f", &name]);
            held.end(&slot_ip(slot), Timestamp::now());
        }
    }
    let containers = held.count();
    assert!(containers >= 30, "{containers} containers");

    // The collector releases after its delay: wait for the output to stop growing.
    let mut count = 0;
    let settled = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = scratch.records().len();
        if now == count && now > 0 || Instant::now() > settled {
            break;
        }
        count = now;
    }

    let in_subnet = |ip: &Value| ip.as_str().is_some_and(|ip| ip.starts_with(SUBNET));
    let judgement = held.judge(&scratch.records(), in_subnet);
    // How soon a container connects after Docker says it started: the window in which the map
    // cannot name it yet (negative: before).
    let mut first_flow: BTreeMap<String, Timestamp> = BTreeMap::new();
    for record in scratch.records() {
        let start = Timestamp::from_nanos(record["start_ns"].as_u64().unwrap());
        if record["direction"] == "outbound"
            && let Some(name) = held.holder_at(&record["local_ip"], start)
        {
            let first = first_flow.entry(name).or_insert(start);
            *first = (*first).min(start);
        }
    }
    let mut windows_ms: Vec<f64> = started
        .iter()
        .filter_map(|(name, started)| {
            Some((first_flow.get(name)?.as_nanos() as f64 - started.as_nanos() as f64) / 1e6)
        })
        .collect();
    windows_ms.sort_by(f64::total_cmp);
    if !windows_ms.is_empty() {
        eprintln!(
            "first connection after Docker's start, ms, of {} containers: min {:.1}, median {:.1}, max {:.1}",
            windows_ms.len(),
            windows_ms[0],
            windows_ms[windows_ms.len() / 2],
            windows_ms[windows_ms.len() - 1]
        );
    }
    // Connections nobody answered, by whether a container held the address they went to.
    let mut unanswered = BTreeMap::<&str, usize>::new();
    for record in scratch.records() {
        if record["direction"] == "outbound"
            && record["segments_received"] == 0
            && record["state"] == "closed"
        {
            let start = Timestamp::from_nanos(record["start_ns"].as_u64().unwrap());
            let held = if held.holder_at(&record["remote_ip"], start).is_some() {
                "to a held address"
            } else {
                "to a free address"
            };
            *unanswered.entry(held).or_default() += 1;
        }
    }
    eprintln!("unanswered connections: {unanswered:?}");
    let (_, metrics) = exporter.tcp_request("GET", "/metrics");
    let unnamed_by_exporter: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("flowattr_exporter_identity_")
                && !line.starts_with("flowattr_exporter_identity_known")
        })
        .collect();
    eprintln!(
        "{containers} containers, {}; the restarted agent's counts: {unnamed_by_exporter:?}",
        judgement.summary()
    );
    judgement.assert_right(FLOWS_WANTED);
    drop(exporter);
    drop(daemon);
}

/// One HTTP exchange with `port` on loopback; the client's port, or None if nothing answered.
fn fetch(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    Some(stream.local_addr().ok()?.port())
}

/// A container on the host's network has no address of its own: the port it listens on names
/// its side of each connection, as a (host IPv4, port) entry of the shared-address map the
/// watcher writes while it listens. Once the container is gone the entry is too: a listener of
/// the host's own that takes the port at once is not named after it.
#[test]
fn a_host_network_container_is_named_by_the_port_it_listens_on() {
    require_root();
    let scratch = Scratch::new("docker-host-network");
    let daemon = DockerDaemon::start(&scratch.dir.path().join("docker"));
    let image = import_busybox(&daemon, scratch.dir.path());
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let socket = daemon.socket().display().to_string();
    let exporter = scratch.start_exporter_with(
        collector.ingest_addr,
        &["--runtime", "docker", "--runtime-socket", socket.as_str()],
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port_text = port.to_string();
    daemon.must(&[
        "run",
        "-d",
        "--name",
        "edge",
        "--network",
        "host",
        image,
        "httpd",
        "-f",
        "-p",
        &port_text,
        "-h",
        "/www",
    ]);
    // Connections from when it listens until a few seconds after the watcher's first scan.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut to_container = Vec::new();
    while to_container.len() < 40 {
        assert!(
            Instant::now() < deadline,
            "the container's httpd never answered on {port}"
        );
        to_container.extend(fetch(port));
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon.must(&["rm", "-f", "edge"]);
    // The host's own listener takes the port at once, before the watcher's next scan has
    // unregistered it: flows of that moment are in the scan's doubt, never named after the
    // container.
    let host_listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let to_host = support::talk(&host_listener, 20);

    let served = scratch.flows_with_port(port, 2 * (to_container.len() + to_host.len()));
    let inbound = |clients: &[u16]| -> Vec<Value> {
        served
            .iter()
            .filter(|flow| flow["direction"] == "inbound" && flow["local_port"] == port)
            .filter(|flow| {
                flow["remote_port"]
                    .as_u64()
                    .is_some_and(|client| clients.contains(&(client as u16)))
            })
            .cloned()
            .collect()
    };
    let (container_side, host_side) = (inbound(&to_container), inbound(&to_host));
    assert_eq!(
        (container_side.len(), host_side.len()),
        (to_container.len(), to_host.len()),
        "one closed record per connection; clients {to_container:?} then {to_host:?}; records \
         {container_side:?} then {host_side:?}"
    );
    let named = container_side
        .iter()
        .filter(|flow| flow["local_workload"] == "edge")
        .count();
    assert!(
        container_side
            .iter()
            .all(|flow| flow["local_workload"] == "edge" || flow["local_workload"].is_null()),
        "the container's side is named after it or nobody: {container_side:?}"
    );
    assert!(
        named >= container_side.len() / 2,
        "{named} of {} named after the container",
        container_side.len()
    );
    assert!(
        container_side
            .iter()
            .filter(|flow| flow["local_workload"] == "edge")
            .all(|flow| flow["local_owner_kind"] == "Container")
    );
    assert!(
        host_side
            .iter()
            .all(|flow| flow["local_workload"] != "edge"),
        "the host's listener named after the gone container: {host_side:?}"
    );
    let unconfirmed = exporter.metric_value("flowattr_exporter_identity_flows_unnamed_total{runtime=\"docker\",reason=\"port_unconfirmed\"}");
    eprintln!(
        "{named} of {} connections to the container named after it; {} to the host's listener after it, none named after it; {unconfirmed} flows left unnamed as port_unconfirmed",
        container_side.len(),
        host_side.len()
    );
    drop(exporter);
}
