//! A region under broker and node faults: three nodes and a broker, exporter-like senders
//! feeding every node, and IPs that pass from workload to workload. The broker is paused,
//! killed and restarted empty, its topic is made again with other partitions under the
//! nodes, and nodes are killed meanwhile. Throughout: no flow is named wrongly on any node,
//! every acked flow comes out, and no node dies but those the test kills; `/healthz` says a
//! topic of the wrong shape until it is put right. After each fault, the time until a claim
//! made at one node is answered by all three (from complete evidence) is measured.
//!
//! CI runs one round; at length (docs/reliability.md):
//! `FLOWATTR_REGION_FAULT_ROUNDS=10 cargo test --release -p flowattr-collector --test region_faults -- --nocapture`.

mod support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowattr_bench::process::Broker;
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, FlowBatch};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, FlowKey, batch_of, closed_flow, read_output, start_node, wait_ready};

const NODES: usize = 3;
const TOPIC: &str = "flowattr-ownership";
/// Servers 10.7.2.0..SERVERS: each held for OWNED, then free for FREE, then held by the next
/// workload.
const SERVERS: u64 = 12;
const OWNED: Duration = Duration::from_secs(10);
const FREE: Duration = Duration::from_secs(6);
const CLIENT_FLOWS_PER_SECOND: u64 = 20;

fn rounds() -> usize {
    std::env::var("FLOWATTR_REGION_FAULT_ROUNDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1)
}

fn server_ip(server: u64) -> CanonicalIp {
    CanonicalIp::from(Ipv4Addr::new(10, 7, 2, server as u8))
}

/// Who holds `server` at `at` (the ground truth): its generation, and when it took the IP.
fn holder(epoch: Timestamp, server: u64, at: Timestamp) -> Option<(u64, Timestamp)> {
    // Servers change hands at different moments.
    let start = epoch.saturating_add(Duration::from_millis(1_300 * server));
    if at < start {
        return None;
    }
    let cycle = (OWNED + FREE).as_nanos() as u64;
    let since = at.nanos_since(start);
    let generation = since / cycle;
    let from = start.saturating_add(Duration::from_nanos(generation * cycle));
    (since % cycle < OWNED.as_nanos() as u64).then_some((generation, from))
}

fn workload(server: u64, generation: u64) -> String {
    format!("svc-{server}-{generation}")
}

/// What the senders had acked, by the node that acked it, and the true owner of each client
/// flow's remote end.
#[derive(Default)]
struct Ledger {
    acked: [HashSet<FlowKey>; NODES],
    truth: HashMap<FlowKey, String>,
}

/// One exporter's batches not yet acked, oldest first, as an exporter spools them.
struct Exporter {
    sequence: u64,
    spool: VecDeque<(FlowBatch, Vec<Option<String>>)>,
}

/// The hosts that report to node `node`: the servers `server % NODES == node` (a new exporter
/// for each generation), and client host 10.7.1.`node` (exporter `node + 1`), which opens
/// connections to every server while it is held. Every second, one batch each; each is sent
/// until acked, across the node's deaths.
fn send_to_node(
    node: usize,
    addr: SocketAddr,
    epoch: Timestamp,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut exporters: HashMap<u64, Exporter> = HashMap::new();
    let mut connection: Option<CollectorConnection> = None;
    let mut next_port = 0u16;
    let spool = |exporters: &mut HashMap<u64, Exporter>,
                 exporter: u64,
                 workload: String,
                 flows: Vec<(flowattr_common::wire::FlowRecord, Option<String>)>| {
        let host = exporters.entry(exporter).or_insert(Exporter {
            sequence: 0,
            spool: VecDeque::new(),
        });
        let (flows, truth): (Vec<_>, Vec<_>) = flows.into_iter().unzip();
        host.spool
            .push_back((batch_of(exporter, host.sequence, &workload, flows), truth));
        host.sequence += 1;
    };
    let mut draining_since: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            let now = Timestamp::now();
            for server in (0..SERVERS).filter(|server| *server as usize % NODES == node) {
                if let Some((generation, from)) = holder(epoch, server, now) {
                    let start = from.max(now.saturating_sub(Duration::from_secs(1)));
                    if now.nanos_since(start) < 100_000_000 {
                        continue;
                    }
                    let heartbeat = closed_flow(
                        (server_ip(server), 443),
                        (support::host_ip(9), 50_000),
                        Some(0),
                        start,
                        now,
                    );
                    spool(
                        &mut exporters,
                        10_000 + server * 1_000 + generation,
                        workload(server, generation),
                        vec![(heartbeat, None)],
                    );
                }
            }
            let client = CanonicalIp::from(Ipv4Addr::new(10, 7, 1, node as u8));
            let flows = (0..CLIENT_FLOWS_PER_SECOND)
                .filter_map(|_| {
                    let server = fastrand::u64(..SERVERS);
                    let start =
                        now.saturating_sub(Duration::from_millis(1_000 + fastrand::u64(..1_000)));
                    let end = start.saturating_add(Duration::from_millis(100));
                    // Connections only to a held IP (nobody answers on a free one), well inside
                    // its holding.
                    let (generation, _) = holder(
                        epoch,
                        server,
                        start.saturating_sub(Duration::from_millis(300)),
                    )?;
                    (holder(
                        epoch,
                        server,
                        end.saturating_add(Duration::from_millis(300)),
                    )?
                    .0 == generation)
                        .then(|| {
                            next_port = next_port.wrapping_add(1);
                            let flow = closed_flow(
                                (client, 20_000 + next_port % 40_000),
                                (server_ip(server), 443),
                                Some(0),
                                start,
                                end,
                            );
                            (flow, Some(workload(server, generation)))
                        })
                })
                .collect();
            spool(
                &mut exporters,
                node as u64 + 1,
                format!("client-{node}"),
                flows,
            );
        } else if exporters.values().all(|host| host.spool.is_empty()) {
            return;
        } else {
            let since = *draining_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(120),
                "node {} never acked the last batches",
                node + 1
            );
        }
        let tick = Instant::now() + Duration::from_secs(1);
        'send: for (&exporter, host) in exporters.iter_mut() {
            while let Some((batch, truth)) = host.spool.front() {
                let Some(link) = connection.as_mut() else {
                    match CollectorConnection::connect(addr, Duration::from_secs(2)) {
                        Ok(link) => connection = Some(link),
                        Err(_) => break 'send,
                    }
                    continue;
                };
                match link.send_and_wait(batch) {
                    Ok(ack) if matches!(ack.status, AckStatus::Accepted | AckStatus::Duplicate) => {
                        assert!(
                            ack.refused.is_empty(),
                            "exporter {exporter}: {:?}",
                            ack.refused
                        );
                        let mut ledger = ledger.lock().unwrap();
                        for (index, truth) in truth.iter().enumerate() {
                            let key = (exporter, batch.sequence, index as u64);
                            ledger.acked[node].insert(key);
                            if let Some(owner) = truth {
                                ledger.truth.insert(key, owner.clone());
                            }
                        }
                        drop(ledger);
                        host.spool.pop_front();
                    }
                    Ok(ack) => panic!(
                        "exporter {exporter}: batch {} refused: {:?}",
                        batch.sequence, ack.status
                    ),
                    Err(_) => {
                        connection = None;
                        break 'send;
                    }
                }
            }
        }
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
}

/// Deletes the broadcast topic and makes it again with `partitions`, as an operator would
/// under running nodes: a node may make it again first (with its own count), or the broker
/// refuse while it is busy; then again.
fn remake_topic(broker: &Broker, partitions: u32) {
    for _ in 0..20 {
        let _ = broker.delete_topic(TOPIC);
        if broker.create_topic(TOPIC, partitions).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("topic {TOPIC} could not be made with {partitions} partitions");
}

/// The region: its nodes (None while killed), each on an ingest address of its own across
/// restarts.
struct Region {
    dir: PathBuf,
    brokers: String,
    config: PathBuf,
    addresses: Vec<SocketAddr>,
    nodes: Vec<Option<Collector>>,
    probes: u8,
}

impl Region {
    fn start_node(&mut self, index: usize) {
        let listen = self.addresses[index].to_string();
        // A flow waits for its remote's evidence: the exporters' lateness (2 s), a publish
        // interval or two, and the slack and gap its lookup spans (6 s).
        let args = [
            "--listen",
            &listen,
            "--config",
            self.config.to_str().unwrap(),
            "--delay",
            "12s",
        ];
        self.nodes[index] = Some(start_node(
            &self.dir,
            &self.brokers,
            index as u64 + 1,
            &args,
        ));
    }

    fn kill_node(&mut self, index: usize) {
        self.assert_alive();
        self.nodes[index].take().unwrap().kill();
    }

    /// No node has died but those the test killed.
    fn assert_alive(&mut self) {
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if let Some(node) = node {
                assert_eq!(node.exited(), None, "node {} died", index + 1);
            }
        }
    }

    /// Waits `seconds`, checking the nodes every 100 ms.
    fn run_for(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.assert_alive();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node's `/healthz` says `line` (or, `said` false, until none does).
    fn wait_for_health(&mut self, line: &str, said: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for index in 0..NODES {
            loop {
                self.assert_alive();
                let (status, body) = self.nodes[index].as_ref().unwrap().get("/healthz");
                if status == 200 && body.contains(line) == said {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {}: {line:?} {} said: {status} {body}",
                    index + 1,
                    if said { "never" } else { "still" }
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// How long until a claim made at one node is answered by every node. A claim about an
    /// instant a node's stream may have lost (a node restarted after an outage) is answered
    /// `incomplete` for good, so a fresh claim is made every 20 s until one is answered.
    fn broadcast_resumes(&mut self) -> Duration {
        let began = Instant::now();
        loop {
            if self.claim_answered_everywhere(Duration::from_secs(20)) {
                return began.elapsed();
            }
            if began.elapsed() > Duration::from_secs(180) {
                let health: Vec<String> = self
                    .nodes
                    .iter()
                    .flatten()
                    .map(|node| node.get("/healthz").1)
                    .collect();
                panic!("no claim reached every node in 3 minutes; /healthz of each: {health:?}");
            }
        }
    }

    /// Makes a claim at one node, and waits up to `wait` for every node to answer it.
    fn claim_answered_everywhere(&mut self, wait: Duration) -> bool {
        let began = Instant::now();
        self.probes += 1;
        let probe = self.probes;
        let at = Timestamp::now().saturating_sub(Duration::from_millis(500));
        let ip = CanonicalIp::from(Ipv4Addr::new(10, 7, 3, probe));
        let name = format!("probe-{probe}");
        let flow = closed_flow(
            (ip, 443),
            (support::host_ip(9), 50_000),
            Some(0),
            at.saturating_sub(Duration::from_secs(1)),
            at,
        );
        let from = usize::from(probe) % NODES;
        let ack = self.nodes[from]
            .as_ref()
            .unwrap()
            .connect()
            .send_and_wait(&batch_of(20_000 + u64::from(probe), 0, &name, vec![flow]))
            .unwrap();
        assert_eq!(ack.status, AckStatus::Accepted);
        let query = format!(
            "/v1/owner?ip=10.7.3.{probe}&at={}",
            at.saturating_sub(Duration::from_millis(500)).as_nanos()
        );
        for index in 0..NODES {
            loop {
                self.assert_alive();
                let (_, answer) = self.nodes[index].as_ref().unwrap().get(&query);
                if answer.contains(&format!("\"owner\":\"{name}\"")) {
                    break;
                }
                // Unattributed or right, never another owner.
                assert!(
                    answer.contains("\"owner\":null"),
                    "node {}: {answer}",
                    index + 1
                );
                if began.elapsed() > wait {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        true
    }
}

#[test]
fn a_region_under_broker_and_node_faults_never_misattributes_loses_or_crashes() {
    let binary = Broker::binary_from_env().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A broker that keeps its topics on disk (by hand, with a Tansu built with SQLite) is also
    // restarted with them; the prebuilt one keeps them in memory, and comes back empty only.
    let keeps = Broker::keeps_storage();
    let kept_in = dir.path().join("broker");
    std::fs::create_dir_all(&kept_in).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start_broker = |empty: bool| {
        if !keeps {
            return Broker::start_on(&binary, port).unwrap();
        }
        if empty {
            for file in std::fs::read_dir(&kept_in).unwrap() {
                std::fs::remove_file(file.unwrap().path()).unwrap();
            }
        }
        Broker::start_keeping(&binary, port, &kept_in).unwrap()
    };
    let mut broker = start_broker(true);
    let config = dir.path().join("node.toml");
    // The test's exporters send each second's flows at once.
    std::fs::write(&config, "[ingest]\nexporter_send_time = \"1s\"\n").unwrap();
    let mut region = Region {
        dir: dir.path().to_owned(),
        brokers: broker.address.clone(),
        config,
        addresses: (0..NODES)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect(),
        nodes: (0..NODES).map(|_| None).collect(),
        probes: 0,
    };
    for index in 0..NODES {
        region.start_node(index);
    }
    for node in region.nodes.iter().flatten() {
        wait_ready(node);
    }
    let epoch = Timestamp::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let senders: Vec<_> = (0..NODES)
        .map(|node| {
            let (addr, stop, ledger) = (region.addresses[node], stop.clone(), ledger.clone());
            std::thread::spawn(move || send_to_node(node, addr, epoch, stop, ledger))
        })
        .collect();

    let mut resumes: Vec<(&str, Duration)> = Vec::new();
    let steady = Duration::from_secs(4);
    region.run_for(Duration::from_secs(6));
    resumes.push(("no fault", region.broadcast_resumes()));
    for round in 0..rounds() {
        let kill_first = round % NODES;
        if keeps {
            // The broker dies and comes back on its storage 6 s later; a node dies in between.
            broker.kill();
            region.run_for(Duration::from_secs(3));
            region.kill_node((kill_first + 2) % NODES);
            region.run_for(Duration::from_secs(3));
            broker = start_broker(false);
            region.start_node((kill_first + 2) % NODES);
            resumes.push((
                "broker restarted on its storage",
                region.broadcast_resumes(),
            ));
            region.run_for(steady);
        }
        // The broker stops answering for 8 s; a node is killed and restarted meanwhile.
        // SAFETY: signalling our own child process.
        assert_eq!(
            unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGSTOP) },
            0
        );
        region.run_for(Duration::from_secs(2));
        region.kill_node(kill_first);
        region.run_for(Duration::from_secs(2));
        region.start_node(kill_first);
        region.run_for(Duration::from_secs(4));
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::kill(broker.pid() as libc::pid_t, libc::SIGCONT) },
            0
        );
        resumes.push(("broker paused 8 s", region.broadcast_resumes()));
        region.run_for(steady);

        // The broker dies and comes back empty 6 s later; a node dies in between.
        broker.kill();
        region.run_for(Duration::from_secs(3));
        region.kill_node((kill_first + 1) % NODES);
        region.run_for(Duration::from_secs(3));
        broker = start_broker(true);
        region.start_node((kill_first + 1) % NODES);
        resumes.push(("broker restarted empty", region.broadcast_resumes()));
        region.run_for(steady);

        if keeps {
            // Tansu's SQLite engine drops the connection when a topic is made again while
            // clients produce to it (UnexpectedEof, every try of a run): the prebuilt broker's
            // rounds cover the topic made again.
            eprintln!("round {}: resumes {resumes:?}", round + 1);
            continue;
        }
        // The topic is made again with 4 partitions under the nodes; a node dies and comes
        // straight back.
        remake_topic(&broker, 4);
        region.kill_node((kill_first + 2) % NODES);
        region.start_node((kill_first + 2) % NODES);
        resumes.push((
            "topic made again with 4 partitions",
            region.broadcast_resumes(),
        ));
        let mismatch =
            format!("degraded: topic {TOPIC} has 4 partitions, not cluster.partitions (16)");
        region.wait_for_health(&mismatch, true);
        region.run_for(steady);
        region.wait_for_health(&mismatch, true);

        // And put right.
        remake_topic(&broker, 16);
        resumes.push((
            "topic made again with 16 partitions",
            region.broadcast_resumes(),
        ));
        region.wait_for_health(&mismatch, false);
        region.run_for(steady);
        eprintln!("round {}: resumes {resumes:?}", round + 1);
    }

    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().unwrap();
    }
    region.assert_alive();

    // Every acked flow comes out of the node that acked it.
    let ledger = ledger.lock().unwrap();
    let outputs: Vec<PathBuf> = (1..=NODES)
        .map(|id| dir.path().join(format!("node-{id}.jsonl")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    for (node, output) in outputs.iter().enumerate() {
        loop {
            let found: HashSet<FlowKey> = read_output(output).1.into_keys().collect();
            let missing = ledger.acked[node].difference(&found).count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: {missing} of {} acked flows never came out",
                node + 1,
                ledger.acked[node].len()
            );
            region.assert_alive();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // No client flow is named wrongly, on any node, in any of its lines.
    let (mut right, mut unattributed) = (0usize, HashMap::<String, usize>::new());
    for output in &outputs {
        for line in std::fs::read_to_string(output)
            .unwrap()
            .lines()
            .filter(|line| !line.is_empty())
        {
            let (key, record) = support::parse_line(line);
            let Some(truth) = ledger.truth.get(&key) else {
                continue;
            };
            match record["remote_workload"].as_str() {
                Some(named) => {
                    assert_eq!(named, truth, "{key:?} misattributed: {record}");
                    right += 1;
                }
                None => {
                    *unattributed
                        .entry(record["unattributed"].as_str().unwrap_or("?").to_owned())
                        .or_default() += 1
                }
            }
        }
    }
    let total = right + unattributed.values().sum::<usize>();
    eprintln!(
        "{} rounds (broker restarted on its storage: {}): {total} client flow records, {right} named right, 0 wrongly, unattributed {unattributed:?}; {} flows acked; time for a claim to reach every node: {resumes:?}",
        rounds(),
        if keeps {
            "yes"
        } else {
            "no, it keeps topics in memory"
        },
        ledger.acked.iter().map(HashSet::len).sum::<usize>()
    );
    // Nothing dropped unsaid: a node that lost updates says so.
    for (index, node) in region.nodes.iter().enumerate() {
        let node = node.as_ref().unwrap();
        let dropped = node.metric("flowattr_broadcast_dropped_updates_total", None);
        let health = node.get("/healthz").1;
        assert!(
            dropped == 0 || health.contains("may never reach the brokers"),
            "node {}: {dropped} updates dropped, unsaid: {health}",
            index + 1
        );
    }
    // The test tests: outside the faults, flows are named.
    assert!(right * 4 >= total, "only {right} of {total} named");
}
