//! Runs the real `flowattr-collector` binary for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowattr_bench::process::Broker;
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{
    AckStatus, ExporterId, FlowBatch, FlowRecord, HostFlowBatch, WorkloadIndex,
};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp, WorkloadIdentity};
use serde_json::Value;

pub struct Collector {
    child: Child,
    pub ingest: SocketAddr,
    pub http: SocketAddr,
    pub output: PathBuf,
    /// Its stderr lines but the ready line.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Collector {
    /// The command that runs the collector with `args` after `run`, on loopback ports of its
    /// own choosing (unless `args` give `--listen`), writing flows to `output`, its stderr piped.
    pub fn command(output: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flowattr-collector"));
        command.arg("run");
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--sink")
            .arg(format!("file:{}", output.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Starts the collector with `args` after `run`, writing flows to `output`, and waits for
    /// its ready line.
    pub fn start(output: &Path, args: &[&str]) -> Collector {
        Collector::start_command(Collector::command(output, args), output)
    }

    /// Starts the collector with a config file's sinks (and no `--sink` flag, which would
    /// replace them); flows are expected in `output`, which the file should name if anything does.
    pub fn start_with_config(config: &Path, output: &Path, args: &[&str]) -> Collector {
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
            .arg(config)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Collector::start_command(command, output)
    }

    /// Runs `command` (stderr piped) and waits for the collector's ready line.
    pub fn start_command(mut command: Command, output: &Path) -> Collector {
        let mut child = command.spawn().expect("the collector binary starts");
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut before = Vec::new();
        let ready = loop {
            let line = lines
                .next()
                .expect("the collector printed its ready line before exiting")
                .expect("stderr is text");
            if line.starts_with("flowattr-collector ready:") {
                break line;
            }
            eprintln!("collector: {line}");
            before.push(line);
        };
        // Keep draining stderr so the collector never blocks on it; echo for failing tests.
        let log = std::sync::Arc::new(std::sync::Mutex::new(before));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("collector: {line}");
                kept.lock().unwrap().push(line);
            }
        });
        let field = |name: &str| -> SocketAddr {
            let words: Vec<&str> = ready.split_whitespace().collect();
            let at = words
                .iter()
                .position(|word| *word == name)
                .expect("field present");
            words[at + 1].parse().expect("an address")
        };
        Collector {
            ingest: field("ingest"),
            http: field("http"),
            output: output.to_owned(),
            child,
            log,
        }
    }

    pub fn connect(&self) -> CollectorConnection {
        CollectorConnection::connect(self.ingest, Duration::from_secs(10)).expect("connects")
    }

    /// The collector's stdout, when its command piped it.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        self.child.stdout.take().expect("stdout was piped")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit code, once the process has exited by itself (None if it is still running after
    /// `timeout`).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("waits") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Every line it has written to stderr so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to a minute) for a line of its log holding `needle`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self
                .log
                .lock()
                .unwrap()
                .iter()
                .find(|line| line.contains(needle))
            {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "never logged {needle:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the process ended, if it has (a crash shows as a signal).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("waits")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }

    /// `GET path` on the control plane: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// The value of an unlabelled-by-shard metric, summed over shards and matching labels.
    pub fn metric(&self, name: &str, label: Option<&str>) -> u64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
            .filter(|line| label.is_none_or(|label| line.contains(label)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The value of one series, given whole (`name{labels}`): gauges that are not whole numbers.
    pub fn gauge(&self, series: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until every flow taken is released and its segment deleted: a node killed after
    /// this has nothing to replay. (Records in the output come before the deletion.)
    pub fn wait_until_released(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sealed = self.metric("flowattr_delay_segments_sealed_total", None);
            let released = self.metric("flowattr_delay_segments_released_total", None);
            if sealed > 0
                && released >= sealed
                && self.metric("flowattr_delay_buffered_flows", None) == 0
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{released} of {sealed} segments released"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_metric(&self, name: &str, label: Option<&str>, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.metric(name, label) < at_least {
            assert!(
                Instant::now() < deadline,
                "{name} {label:?} never reached {at_least}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("control plane reachable");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().expect("a status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// (exporter, sequence, index): names a flow.
pub type FlowKey = (u64, u64, u64);

/// One line of JSON output: the flow it names, and the record. Every complete line a reader
/// finds must parse.
pub fn parse_line(line: &str) -> (FlowKey, Value) {
    let record: Value = serde_json::from_str(line)
        .unwrap_or_else(|error| panic!("a line a reader cannot parse ({error}): {line:.200}"));
    let key = (
        record["exporter"].as_u64().unwrap(),
        record["sequence"].as_u64().unwrap(),
        record["index"].as_u64().unwrap(),
    );
    (key, record)
}

/// The output file's records, keyed by flow, with how often each appeared: the complete
/// lines only, as the collector may be writing the next one while this reads.
pub fn read_output(path: &Path) -> (HashMap<FlowKey, Value>, HashMap<FlowKey, usize>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    let mut records = HashMap::new();
    let mut counts = HashMap::new();
    for line in complete.lines() {
        let (key, record) = parse_line(line);
        *counts.entry(key).or_default() += 1;
        records.insert(key, record);
    }
    (records, counts)
}

/// Waits until the output holds at least `n` records.
pub fn wait_for_records(path: &Path, n: usize) -> HashMap<FlowKey, Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (records, counts) = read_output(path);
        let lines: usize = counts.values().sum();
        if lines >= n {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "only {lines} of {n} records arrived"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the output holds a record of every flow of `keys` (a replay may write earlier
/// ones again meanwhile: counting lines would not tell).
#[allow(dead_code)]
pub fn wait_for_flows(path: &Path, keys: &[FlowKey]) -> HashMap<FlowKey, Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (records, _) = read_output(path);
        if keys.iter().all(|key| records.contains_key(key)) {
            return records;
        }
        let missing: Vec<&FlowKey> = keys
            .iter()
            .filter(|key| !records.contains_key(key))
            .collect();
        assert!(Instant::now() < deadline, "flows {missing:?} never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A batch of `flows` from `exporter`, all of whose local sides are `workload`.
pub fn batch_of(exporter: u64, sequence: u64, workload: &str, flows: Vec<FlowRecord>) -> FlowBatch {
    FlowBatch {
        exporter: flowattr_common::wire::ExporterId(exporter),
        sequence,
        region: "test".into(),
        workloads: vec![workload.into()],
        flows,
    }
}

/// A closed outbound flow record with small fixed counters: what most tests send.
pub fn closed_flow(
    local: (CanonicalIp, u16),
    remote: (CanonicalIp, u16),
    workload: Option<u32>,
    start: Timestamp,
    end: Timestamp,
) -> FlowRecord {
    FlowRecord {
        local_ip: local.0,
        remote_ip: remote.0,
        local_port: local.1,
        remote_port: remote.1,
        local_workload: workload.map(WorkloadIndex),
        local_shared: false,
        start,
        end,
        bytes_sent: 100,
        bytes_received: 200,
        segments_sent: 2,
        segments_received: 2,
        retransmits: 0,
        direction: Direction::Outbound,
        state: FlowState::Closed,
    }
}

/// Starts a broker (Tansu, installed by `scripts/test`; `FLOWATTR_KAFKA_BROKER` names its
/// binary) on a free loopback port with `topics` created, and returns it with its address.
pub fn start_broker(topics: &[&str]) -> (Broker, String) {
    let broker = Broker::start(&Broker::binary_from_env().unwrap()).expect("the broker starts");
    for topic in topics {
        broker.create_topic(topic, 1).unwrap();
    }
    let address = broker.address.clone();
    (broker, address)
}

/// A collector node of a cluster: `--brokers`, `--node-id`, a 4 s delay, no retries and
/// exporters that send every second (unless `extra` says otherwise: peers' streams are then
/// complete to 11 s ago), its own data directory and output file under `dir`.
pub fn start_node(dir: &std::path::Path, brokers: &str, id: u64, extra: &[&str]) -> Collector {
    let output = dir.join(format!("node-{id}.jsonl"));
    let data = dir.join(format!("data-{id}"));
    let id = id.to_string();
    let mut args = vec![
        "--cpus",
        "2",
        "--brokers",
        brokers,
        "--node-id",
        &id,
        "--data-dir",
        data.to_str().unwrap(),
        "--segment-span",
        "200ms",
    ];
    for (flag, default) in [
        ("--delay", "4s"),
        ("--max-retries", "0"),
        ("--exporter-interval", "1s"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    Collector::start(&output, &args)
}

/// Waits until `node` knows how far `peer`'s stream is complete.
pub fn wait_for_watermark(node: &Collector, peer: u64) {
    let series = format!("flowattr_broadcast_peer_complete_through_seconds{{peer=\"{peer}\"}}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.gauge(&series).unwrap_or(0.0) <= 0.0 {
        assert!(
            Instant::now() < deadline,
            "never heard how far peer {peer} is complete"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `node`'s `/v1/owner` for 10.7.0.`last` at `at` says `expected` (a piece of
/// its JSON answer, e.g. `"owner":"billing"`), within a minute.
pub fn wait_for_answer(node: &Collector, last: u8, at: Timestamp, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, answer) = node.get(&format!("/v1/owner?ip=10.7.0.{last}&at={}", at.as_nanos()));
        if answer.contains(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "10.7.0.{last} never answered {expected}: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 10.7.0.`last`: the hosts of the cluster tests.
pub fn host_ip(last: u8) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 7, 0, last))
}

/// A batch from host 10.7.0.`local` (workload `workload`), one flow to port 443 of
/// 10.7.0.`remote` per (remote, start s, end s), the seconds counted from `t0`.
pub fn host_batch(
    exporter: u64,
    sequence: u64,
    local: u8,
    workload: &str,
    t0: Timestamp,
    flows: &[(u8, u64, u64)],
) -> FlowBatch {
    let at = |s: u64| t0.saturating_add(Duration::from_secs(s));
    let flows = flows
        .iter()
        .map(|&(remote, start, end)| {
            closed_flow(
                (host_ip(local), 40_000),
                (host_ip(remote), 443),
                Some(0),
                at(start),
                at(end),
            )
        })
        .collect();
    batch_of(exporter, sequence, workload, flows)
}

/// Waits until the node has caught up with the broadcast topic (`/healthz` says ok).
pub fn wait_ready(node: &Collector) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = node.get("/healthz");
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one batch and expects it accepted whole.
pub fn send(node: &Collector, batch: &FlowBatch) {
    let ack = node.connect().send_and_wait(batch).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
}

/// Produces `payload` as one message on `topic`, as a peer (or a stranger) would.
pub fn produce_raw(brokers: &str, topic: &str, payload: &[u8]) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "100000000")
        .create()
        .unwrap();
    producer
        .send(
            BaseRecord::<(), [u8]>::to(topic)
                .partition(0)
                .payload(payload),
        )
        .map_err(|(error, _)| error)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
}

/// `count` connections from `client` (at 10.8.0.`client_ip`, exporter `client_ip`) to port
/// 5432 of `server_ip`, reported by the client's exporter in one batch, and by the server's
/// (`server` at 10.8.0.`server_ip`) in another unless it is None (a server with no exporter).
pub fn connections(
    client: (&str, u8),
    server: (Option<&str>, u8),
    count: u16,
    sequence: u64,
) -> Vec<FlowBatch> {
    let t0 = Timestamp::now().saturating_sub(Duration::from_secs(20));
    let ip = |last| CanonicalIp::from(Ipv4Addr::new(10, 8, 0, last));
    let record = |local: u8, remote: u8, direction, port: u16| FlowRecord {
        local_ip: ip(local),
        remote_ip: ip(remote),
        local_port: if direction == Direction::Outbound {
            port
        } else {
            5432
        },
        remote_port: if direction == Direction::Outbound {
            5432
        } else {
            port
        },
        local_workload: Some(WorkloadIndex(0)),
        local_shared: false,
        start: t0,
        end: t0.saturating_add(Duration::from_secs(1)),
        bytes_sent: 100,
        bytes_received: 200,
        segments_sent: 2,
        segments_received: 3,
        retransmits: 0,
        direction,
        state: FlowState::Closed,
    };
    let ports = 30_000..30_000 + count;
    let mut batches = vec![FlowBatch {
        exporter: ExporterId(u64::from(client.1)),
        sequence,
        region: "test".into(),
        workloads: vec![client.0.into()],
        flows: ports
            .clone()
            .map(|port| record(client.1, server.1, Direction::Outbound, port))
            .collect(),
    }];
    if let (Some(name), server_ip) = server {
        batches.push(FlowBatch {
            exporter: ExporterId(u64::from(server_ip)),
            sequence,
            region: "test".into(),
            workloads: vec![name.into()],
            flows: ports
                .map(|port| record(server_ip, client.1, Direction::Inbound, port))
                .collect(),
        });
    }
    batches
}

/// `batches` as a Kubernetes node's exporter sends them: from host `host-<exporter>`, each
/// workload `name` the pod `name-1` of Deployment `name` in namespace `shop`.
#[allow(dead_code)]
pub fn from_kubernetes_hosts(batches: Vec<FlowBatch>) -> Vec<HostFlowBatch> {
    batches
        .into_iter()
        .map(|mut batch| {
            for name in &mut batch.workloads {
                let pod = format!("{name}-1");
                *name = WorkloadIdentity {
                    name,
                    namespace: "shop",
                    instance: &pod,
                    owner_kind: "Deployment",
                }
                .key();
            }
            HostFlowBatch {
                host: format!("host-{}", batch.exporter.0),
                clock: None,
                batch,
            }
        })
        .collect()
}

/// A small ext4 filesystem of its own on a loop device (root only), unmounted on drop.
pub struct SmallDisk {
    _dir: tempfile::TempDir,
    pub mount: std::path::PathBuf,
}

impl SmallDisk {
    pub fn new(megabytes: u64) -> SmallDisk {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the full-disk test mounts a filesystem: it needs root (CI runs as root)"
        );
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(megabytes << 20)
            .unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // No blocks reserved for root: the collector runs as root, and full must mean full.
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                image.as_os_str(),
            ],
        );
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        );
        SmallDisk { _dir: dir, mount }
    }

    /// Writes a file until the filesystem refuses more; returns its path.
    pub fn fill(&self) -> std::path::PathBuf {
        let path = self.mount.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        // Down to single bytes: a write needing more blocks than are left fails whole, and
        // the collector's writes may be as small as one block.
        for chunk in [1 << 20, 4096, 1] {
            let bytes = vec![0xAA; chunk];
            loop {
                match file.write_all(&bytes) {
                    Ok(()) => {}
                    Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(error) => panic!("filling the disk: {error}"),
                }
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
    }
}
