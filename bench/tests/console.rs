//! The console in a real browser (Debian's headless Chromium, over its DevTools protocol):
//! against a node fed by the simulator (`flowattr-bench demo --serve`), the map against
//! `/v1/deps`, an ownership lookup against `/v1/owner` and `/v1/history`, the health view
//! against `/metrics`, and a region peer killed with SIGKILL shown as missing; against a node
//! holding 500 services, how long the map takes to load and whether `/healthz` keeps
//! answering meanwhile. With `FLOWATTR_SCREENSHOTS=DIR` the first test also writes the
//! screenshots in docs/.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowattr_bench::process::{Process, http_get};
use flowattr_collector::config::{Config, SinkConfig, StorageKind};
use flowattr_collector::deps::Edge;
use flowattr_collector::node::Node;
use flowattr_common::client::CollectorConnection;
use flowattr_common::wire::{AckStatus, ExporterId, FlowBatch, FlowRecord, WorkloadIndex};
use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use serde_json::Value;
use support::chromium::Chromium;

/// `flowattr-bench demo --serve`, its console's address read from its output.
struct Demo {
    child: Child,
    console: SocketAddr,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(args: &[&str]) -> Demo {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowattr-bench"))
        .args([
            "demo",
            "--serve",
            "--duration",
            "2m",
            "--connections-per-second",
            "30",
        ])
        .args(["--show", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let console = loop {
        let line = lines
            .next()
            .expect("the demo printed its console before it ended")
            .unwrap();
        println!("demo: {line}");
        if let Some(address) = line.strip_prefix("console of node 1: http://") {
            break address.trim_end_matches('/').parse().unwrap();
        }
    };
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .for_each(|line| println!("demo: {line}"))
    });
    Demo { child, console }
}

/// A bare collector process: the region's other node.
fn start_peer() -> Process {
    // The workspace's binaries sit beside the tests' directory (target/debug/deps).
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("flowattr-collector");
    assert!(
        binary.exists(),
        "{} (cargo build -p flowattr-collector)",
        binary.display()
    );
    Process::start(
        Command::new(binary).args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--storage",
            "memory",
            "--sink",
            "discard",
        ]),
        "peer",
        "flowattr-collector ready",
    )
    .expect("the peer starts")
}

fn edges_of(json: &str) -> Vec<Edge> {
    serde_json::from_str(json).unwrap_or_else(|error| panic!("{error}: {json}"))
}

fn screenshots() -> Option<PathBuf> {
    std::env::var_os("FLOWATTR_SCREENSHOTS").map(PathBuf::from)
}

#[test]
fn the_console_shows_the_nodes_answers_and_a_killed_peer_as_missing() {
    let mut peer = start_peer();
    let peer_http = peer.address("http").unwrap();
    let demo = start_demo(&["--region-node", &peer_http.to_string()]);
    let api = |path: &str| http_get(demo.console, path).unwrap();
    let mut browser = Chromium::launch();
    browser.navigate(&format!("http://{}/#map", demo.console));
    browser.wait_for("document.body.dataset.mapRendered", Duration::from_secs(30));

    // The map: every edge of the last 15 minutes (the page's default window), with its count,
    // and a node for every end. The demo's fleet is all within the last few minutes.
    let expected = edges_of(&api("/v1/deps?window=15m"));
    assert!(expected.iter().any(|edge| edge.attributed), "{expected:?}");
    assert!(
        expected
            .iter()
            .any(|edge| edge.server.starts_with("unattributed:")),
        "flows to the load balancers, which run no exporter, are unattributed: {expected:?}"
    );
    let on_page: BTreeSet<(String, String, u64)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#map-svg path.edge')].map(e => [e.dataset.client, e.dataset.server, Number(e.dataset.connections)])",
    ))
    .unwrap();
    let from_api: BTreeSet<(String, String, u64)> = expected
        .iter()
        .map(|edge| {
            (
                edge.client.clone(),
                edge.server.clone(),
                edge.count.connections,
            )
        })
        .collect();
    assert_eq!(on_page, from_api);
    let nodes: BTreeSet<String> = serde_json::from_value(
        browser.eval("[...document.querySelectorAll('#map-svg g.node')].map(e => e.dataset.name)"),
    )
    .unwrap();
    let ends: BTreeSet<String> = expected
        .iter()
        .flat_map(|edge| [edge.client.clone(), edge.server.clone()])
        .collect();
    assert_eq!(nodes, ends);
    let region: Vec<(String, String)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('.region-node')].map(e => [e.dataset.node, e.dataset.status])",
    ))
    .unwrap();
    assert_eq!(
        region,
        [
            ("this".into(), "ok".into()),
            (peer_http.to_string(), "ok".into())
        ]
    );

    // Click the middle of an attributed edge, as a user would: the panel lists its sample
    // connections, the same as the API's.
    let middle = browser.eval(
        "(() => { const e = [...document.querySelectorAll('#map-svg path.edge:not(.unattributed)')].pop(); \
         e.scrollIntoView({block: 'center', inline: 'center'}); \
         const p = e.getPointAtLength(e.getTotalLength() / 2); const m = e.getScreenCTM(); \
         return [p.x * m.a + p.y * m.c + m.e, p.x * m.b + p.y * m.d + m.f]; })()",
    );
    browser.click_at(middle[0].as_f64().unwrap(), middle[1].as_f64().unwrap());
    browser.wait_for(
        "document.querySelector('#edge-samples tr:nth-child(2)')",
        Duration::from_secs(10),
    );
    let (client, server): (String, String) = serde_json::from_value(browser.eval(
        "(() => { const e = document.querySelector('path.edge.selected'); return [e.dataset.client, e.dataset.server]; })()",
    ))
    .unwrap();
    let edge = expected
        .iter()
        .find(|edge| edge.client == client && edge.server == server)
        .expect("the clicked edge is in the API's graph");
    let listed: Vec<(String, String)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#edge-samples tr')].slice(1).map(r => [r.cells[0].textContent, r.cells[1].textContent])",
    ))
    .unwrap();
    let sampled: Vec<(String, String)> = edge
        .samples
        .iter()
        .map(|sample| (sample.client.to_string(), sample.server.to_string()))
        .collect();
    assert!(!sampled.is_empty());
    assert_eq!(listed, sampled);
    if let Some(dir) = screenshots() {
        browser.eval("document.getElementById('map').scrollTo(0, 0)");
        browser.screenshot(&dir.join("console-map.png"));
    }

    // Who owned the clicked edge's server address when its sampled connection started.
    let sample = &edge.samples[0];
    let (ip, at) = (sample.server.ip(), sample.start_ns);
    browser.click("nav button[data-view=lookup]");
    browser.fill("#lookup-ip", &ip.to_string());
    browser.fill("#lookup-at", &at.to_string());
    browser.click("#lookup-form button[type=submit]");
    browser.wait_for(
        "document.querySelectorAll('#lookup-segments tr.segment').length",
        Duration::from_secs(10),
    );
    let owner: Value = serde_json::from_str(&api(&format!("/v1/owner?ip={ip}&at={at}"))).unwrap();
    let history: Value = serde_json::from_str(&api(&format!("/v1/history?ip={ip}"))).unwrap();
    assert_eq!(owner["owner"].as_str(), Some(server.as_str()));
    assert_eq!(
        browser.eval("document.getElementById('lookup-answer').dataset.owner"),
        owner["owner"]
    );
    let rows: Vec<(String, String, String)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#lookup-segments tr.segment')].map(r => [r.dataset.start, r.dataset.end, r.cells[3].textContent])",
    ))
    .unwrap();
    // Each segment names the exporter whose report last shaped it, as the API does.
    let reporters: Vec<String> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#lookup-segments tr.segment')].map(r => r.cells[5].textContent)",
    ))
    .unwrap();
    let expected_reporters: Vec<String> = history["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|segment| {
            let evidence = &segment["evidence"];
            assert_eq!(evidence["kind"], "exporter", "{segment}");
            format!("exporter {} ", evidence["exporter"].as_str().unwrap())
        })
        .collect();
    for (shown, expected) in reporters.iter().zip(&expected_reporters) {
        assert!(shown.starts_with(expected), "{shown} / {expected}");
    }
    assert_eq!(reporters.len(), expected_reporters.len());
    let segments: Vec<(String, String, String)> = history["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|segment| {
            (
                segment["start_ns"].to_string(),
                segment["end_ns"].to_string(),
                segment["holder"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(rows, segments);
    // The segment holding the instant is the one marked.
    let marked: Vec<String> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#lookup-segments tr.segment.at')].map(r => r.cells[3].textContent)",
    ))
    .unwrap();
    assert_eq!(marked, std::slice::from_ref(&server));
    if let Some(dir) = screenshots() {
        browser.screenshot(&dir.join("console-lookup.png"));
    }

    // Health: every reason the node left flows unattributed for, with its total.
    browser.click("nav button[data-view=health]");
    browser.wait_for(
        "document.querySelectorAll('#health-unattributed tr[data-reason]').length",
        Duration::from_secs(10),
    );
    let metrics = api("/metrics");
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .map(|rest| rest.split('"').next().unwrap().to_owned())
    };
    let mut counted = std::collections::BTreeMap::<String, u64>::new();
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("flowattr_flows_emitted_total{"))
    {
        let result = label(line, "result").unwrap();
        let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if result != "attributed" {
            *counted.entry(result).or_default() += value;
        }
    }
    assert!(
        counted.get("no_evidence").is_some_and(|&count| count > 0),
        "{counted:?}"
    );
    let shown: std::collections::BTreeMap<String, u64> = serde_json::from_value(browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#health-unattributed tr[data-reason]')].map(r => [r.dataset.reason, Number(r.cells[1].textContent)]))",
    ))
    .unwrap();
    assert_eq!(shown, counted);
    // Every exporter with its last clock reading, as /metrics has it (the demo's hosts send
    // theirs, as agents do), and when its latest batch came.
    let mut readings = std::collections::BTreeMap::<String, String>::new();
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("flowattr_exporter_clock_offset_seconds{"))
    {
        let seconds: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        readings.insert(
            label(line, "exporter").unwrap(),
            format!("{:.2} ms", seconds * 1000.0),
        );
    }
    assert!(
        readings.len() > 1,
        "the demo's exporters sent clock readings: {readings:?}"
    );
    let rows: Vec<(String, String, String)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#health-exporters tr[data-exporter]')].map(r => [r.dataset.exporter, r.cells[1].textContent, r.cells[4].textContent])",
    ))
    .unwrap();
    let shown: std::collections::BTreeMap<String, String> = rows
        .iter()
        .map(|(exporter, offset, _)| (exporter.clone(), offset.clone()))
        .collect();
    assert_eq!(shown, readings);
    assert!(
        rows.iter().all(|(_, _, last)| last.ends_with(" s ago")),
        "{rows:?}"
    );
    // The trend starts with the node's own samples, taken before the page was opened.
    let history: Value = serde_json::from_str(&api("/v1/health/history")).unwrap();
    let first_sample = history["samples"][0]["at_ns"].as_u64().unwrap();
    let page_first = browser.eval("window.flowattrConsole.metricsHistory[0].at");
    assert_eq!(page_first.as_u64(), Some(first_sample / 1_000_000));
    if let Some(dir) = screenshots() {
        // A second sample, so the rates have a line.
        std::thread::sleep(Duration::from_secs(6));
        browser.screenshot(&dir.join("console-health.png"));
    }

    // The peer dies: the map says so instead of drawing its part as nothing.
    peer.child.kill().unwrap();
    peer.child.wait().unwrap();
    browser.click("nav button[data-view=map]");
    browser.click("#refresh");
    browser.wait_for(
        "document.querySelector('.region-node[data-status=missing]')",
        Duration::from_secs(20),
    );
    let missing =
        browser.eval("document.querySelector('.region-node[data-status=missing]').dataset.node");
    assert_eq!(missing, Value::String(peer_http.to_string()));
    let status = browser.eval("document.getElementById('map-status').textContent");
    assert!(
        status.as_str().unwrap().contains("1 node(s) missing"),
        "{status}"
    );
    // This node's own part is still drawn.
    let drawn = browser.eval("document.querySelectorAll('#map-svg path.edge').length");
    assert_eq!(drawn.as_u64(), Some(expected.len() as u64));
}

#[test]
fn a_cluster_nodes_console_shows_the_whole_region_and_its_peer() {
    let broker = flowattr_bench::process::Broker::start(
        &flowattr_bench::process::Broker::binary_from_env().unwrap(),
    )
    .unwrap();
    let demo = start_demo(&["--nodes", "2", "--brokers", &broker.address]);
    let mut browser = Chromium::launch();
    browser.navigate(&format!("http://{}/#map", demo.console));
    browser.wait_for("document.body.dataset.mapRendered", Duration::from_secs(30));
    // Node 1 lists node 2 (the demo gives each node the other's control plane), both answer,
    // and the map is the region's: each connection counted by the node its client's report
    // reached, the two graphs merged.
    let region: Value =
        serde_json::from_str(&http_get(demo.console, "/v1/region/deps?window=15m").unwrap())
            .unwrap();
    let nodes = region["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{region}");
    assert!(nodes.iter().all(|node| node["status"] == "ok"), "{region}");
    let other: SocketAddr = nodes[1]["node"].as_str().unwrap().parse().unwrap();
    let own = edges_of(&http_get(demo.console, "/v1/deps?window=15m").unwrap());
    let theirs = edges_of(&http_get(other, "/v1/deps?window=15m").unwrap());
    assert!(!own.is_empty() && !theirs.is_empty());
    let merged: BTreeSet<(String, String, u64)> = flowattr_collector::deps::merge([own, theirs])
        .into_iter()
        .map(|edge| (edge.client, edge.server, edge.count.connections))
        .collect();
    let on_page: BTreeSet<(String, String, u64)> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#map-svg path.edge')].map(e => [e.dataset.client, e.dataset.server, Number(e.dataset.connections)])",
    ))
    .unwrap();
    assert_eq!(on_page, merged);
    // Health: the peer, heard from over the broadcast.
    browser.click("nav button[data-view=health]");
    browser.wait_for(
        "document.querySelectorAll('#health-peers tr').length > 1",
        Duration::from_secs(10),
    );
    let peers = browser.eval(
        "[...document.querySelectorAll('#health-peers tr')].slice(1).map(r => r.cells[0].textContent).filter(t => /^[0-9]+$/.test(t))",
    );
    let table = browser.eval("document.getElementById('health-peers').innerText");
    println!("peers table: {table}");
    assert_eq!(
        peers,
        serde_json::json!(["2"]),
        "node 1's peer is node 2: {table}"
    );
    // A lookup of an address only node 2's exporters reported is answered on node 1 from the
    // broadcast, and says so, naming the exporter node 2 itself names for it.
    let sample = region["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|edge| edge["attributed"] == true)
        .flat_map(|edge| edge["samples"].as_array().unwrap().iter())
        .find_map(|sample| {
            let server: SocketAddr = sample["server"].as_str()?.parse().ok()?;
            let history: Value = serde_json::from_str(
                &http_get(demo.console, &format!("/v1/history?ip={}", server.ip())).unwrap(),
            )
            .ok()?;
            history["segments"]
                .as_array()?
                .iter()
                .any(|segment| segment["evidence"]["kind"] == "peer")
                .then_some(server.ip())
        })
        .expect("an address node 1 knows from node 2's broadcast");
    let history: Value =
        serde_json::from_str(&http_get(other, &format!("/v1/history?ip={sample}")).unwrap())
            .unwrap();
    let exporters: BTreeSet<String> = history["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|segment| segment["evidence"]["kind"] == "exporter")
        .map(|segment| segment["evidence"]["exporter"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !exporters.is_empty(),
        "node 2 names its exporter: {history}"
    );
    browser.click("nav button[data-view=lookup]");
    browser.fill("#lookup-ip", &sample.to_string());
    browser.click("#lookup-form button[type=submit]");
    browser.wait_for(
        "document.querySelectorAll('#lookup-segments tr.segment').length",
        Duration::from_secs(10),
    );
    let reporters: Vec<String> = serde_json::from_value(browser.eval(
        "[...document.querySelectorAll('#lookup-segments tr.segment')].map(r => r.cells[5].textContent)",
    ))
    .unwrap();
    assert!(
        reporters.iter().any(
            |text| exporters.iter().any(|exporter| text.starts_with(&format!(
                "exporter {exporter}, over the broadcast from node 2"
            )))
        ),
        "{reporters:?}, node 2's exporters {exporters:?}"
    );
}

/// 500 services in 10 tiers of 50, each calling 3 services of the next tier, both ends
/// reporting each call, sent to `node`.
fn feed_500_services(node: &Node) -> usize {
    let services = 500u32;
    let ip = |service: u32| CanonicalIp::from(std::net::Ipv4Addr::from(0x0AC8_0000 + service + 1));
    let name = |service: u32| format!("service-{service:03}");
    let now = Timestamp::now().saturating_sub(Duration::from_secs(5));
    let mut batches = Vec::new();
    let mut calls = 0;
    for service in 0..services {
        let mut flows = Vec::new();
        let record = |remote: u32, direction: Direction, port: u16| FlowRecord {
            local_ip: ip(service),
            remote_ip: ip(remote),
            local_port: port,
            remote_port: if direction == Direction::Outbound {
                443
            } else {
                40_000 + service as u16
            },
            local_workload: Some(WorkloadIndex(0)),
            local_shared: false,
            start: now,
            end: now.saturating_add(Duration::from_millis(20)),
            bytes_sent: 1_000,
            bytes_received: 2_000,
            segments_sent: 4,
            segments_received: 4,
            retransmits: 0,
            direction,
            state: FlowState::Closed,
        };
        let tier = service / 50;
        // Outbound calls to three services of the next tier.
        if tier < 9 {
            for k in 0..3 {
                let callee = (tier + 1) * 50 + (service * 7 + k * 13) % 50;
                flows.push(record(callee, Direction::Outbound, 40_000 + service as u16));
                calls += 1;
            }
        }
        // Inbound: the calls of the previous tier that reach this service.
        if tier > 0 {
            for caller in (tier - 1) * 50..tier * 50 {
                for k in 0..3 {
                    if tier * 50 + (caller * 7 + k * 13) % 50 == service {
                        flows.push(FlowRecord {
                            remote_port: 40_000 + caller as u16,
                            ..record(caller, Direction::Inbound, 443)
                        });
                    }
                }
            }
        }
        batches.push(FlowBatch {
            exporter: ExporterId(u64::from(service) + 1),
            sequence: 1,
            region: "console-test".into(),
            workloads: vec![name(service)],
            flows,
        });
    }
    let mut connection =
        CollectorConnection::connect(node.ingest_addr, Duration::from_secs(10)).unwrap();
    let acks = connection.send_all(&batches, 8).unwrap();
    for ack in &acks {
        assert!(
            ack.status == AckStatus::Accepted && ack.refused.is_empty(),
            "{ack:?}"
        );
    }
    calls
}

/// A node in this process, one shard, flows held a second in memory.
fn start_node(dir: &tempfile::TempDir) -> Node {
    let mut config = Config::default();
    config.node.cpus = 1;
    config.ingest.listen = "127.0.0.1:0".parse().unwrap();
    config.http.listen = Some("127.0.0.1:0".parse().unwrap());
    config.delay.storage = StorageKind::Memory;
    config.delay.dir = dir.path().to_owned();
    config.delay.delay = Duration::from_secs(1);
    config.delay.segment_span = Duration::from_millis(250);
    config.sinks = vec![SinkConfig::Discard];
    Node::start(config).unwrap()
}

#[test]
fn a_contested_address_shows_every_claimant_and_who_reported_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let http = node.http_addr.unwrap();
    // Two hosts' exporters each say their workload held 10.9.9.9 over overlapping seconds.
    let contested = CanonicalIp::from(std::net::Ipv4Addr::new(10, 9, 9, 9));
    let now = Timestamp::now().saturating_sub(Duration::from_secs(30));
    let claim = |exporter: u64, workload: &str, from_s: u64| FlowBatch {
        exporter: ExporterId(exporter),
        sequence: 1,
        region: "console-test".into(),
        workloads: vec![workload.into()],
        flows: vec![FlowRecord {
            local_ip: contested,
            remote_ip: CanonicalIp::from(std::net::Ipv4Addr::new(10, 9, 9, 1)),
            local_port: 40_000,
            remote_port: 443,
            local_workload: Some(WorkloadIndex(0)),
            local_shared: false,
            start: now.saturating_add(Duration::from_secs(from_s)),
            end: now.saturating_add(Duration::from_secs(from_s + 10)),
            bytes_sent: 100,
            bytes_received: 100,
            segments_sent: 2,
            segments_received: 2,
            retransmits: 0,
            direction: Direction::Outbound,
            state: FlowState::Closed,
        }],
    };
    let mut connection =
        CollectorConnection::connect(node.ingest_addr, Duration::from_secs(10)).unwrap();
    let acks = connection
        .send_all(&[claim(71, "alpha", 0), claim(72, "beta", 5)], 2)
        .unwrap();
    assert!(acks.iter().all(|ack| ack.status == AckStatus::Accepted));
    // Acked once held; the shard applies the heartbeats right after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let segment = loop {
        let history: Value =
            serde_json::from_str(&http_get(http, &format!("/v1/history?ip={contested}")).unwrap())
                .unwrap();
        let contested = history["segments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|segment| segment["state"] == "contested");
        if let Some(segment) = contested {
            break segment.clone();
        }
        assert!(Instant::now() < deadline, "no contested segment: {history}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let claimants: Vec<(String, String)> = segment["claimants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|claimant| {
            (
                claimant["workload"].as_str().unwrap().to_owned(),
                claimant["evidence"]["exporter"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        claimants,
        [("alpha".into(), "71".into()), ("beta".into(), "72".into())],
        "{segment}"
    );
    assert_eq!(segment["claimants_complete"], true);

    let mut browser = Chromium::launch();
    browser.navigate(&format!("http://{http}/#lookup"));
    browser.fill("#lookup-ip", &contested.to_string());
    browser.click("#lookup-form button[type=submit]");
    browser.wait_for(
        "document.querySelector('#lookup-segments tr.segment.contested')",
        Duration::from_secs(10),
    );
    let (holder, reported): (String, String) = serde_json::from_value(browser.eval(
        "(() => { const r = document.querySelector('#lookup-segments tr.segment.contested'); return [r.cells[3].textContent, r.cells[5].textContent]; })()",
    ))
    .unwrap();
    assert_eq!(holder, "alpha and beta");
    let lines: Vec<&str> = reported.lines().collect();
    assert_eq!(lines.len(), 2, "{reported}");
    assert!(lines[0].starts_with("alpha: exporter 71 ("), "{reported}");
    assert!(lines[1].starts_with("beta: exporter 72 ("), "{reported}");
    if let Some(dir) = screenshots() {
        browser.screenshot(&dir.join("console-conflict.png"));
    }
}

#[test]
fn a_map_of_500_services_loads_within_a_second_and_healthz_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&dir);
    let http = node.http_addr.unwrap();
    let calls = feed_500_services(&node);
    // Both ends report each call: twice as many flows.
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.flows_emitted() < 2 * calls as u64 {
        assert!(Instant::now() < deadline, "the flows were not emitted");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Shards publish their graph about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let graph = edges_of(&http_get(http, "/v1/deps?window=15m").unwrap());
    assert_eq!(graph.len(), calls, "{} edges", graph.len());
    assert!(graph.iter().all(|edge| edge.attributed));

    // /healthz asked every 50 ms while the browser loads the map again and again.
    let loading = Arc::new(AtomicBool::new(true));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let prober = {
        let (loading, slowest) = (loading.clone(), slowest.clone());
        std::thread::spawn(move || {
            let mut probes = 0;
            while loading.load(Ordering::Relaxed) {
                let started = Instant::now();
                let body = http_get(http, "/healthz").expect("/healthz answers");
                assert!(body.starts_with("ok"), "{body}");
                let took = started.elapsed();
                let mut slowest = slowest.lock().unwrap();
                *slowest = (*slowest).max(took);
                probes += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            probes
        })
    };
    let mut browser = Chromium::launch();
    let mut loads = Vec::new();
    for load in 0..5 {
        // A new document each time (a URL differing only in its fragment would not reload).
        browser.navigate(&format!("http://{http}/?load={load}#map"));
        // Milliseconds from the navigation's start to the map drawn, by the page's clock.
        let rendered = browser.wait_for(
            "Number(document.body.dataset.mapRendered || 0)",
            Duration::from_secs(30),
        );
        let drawn = browser.eval("document.querySelectorAll('#map-svg g.node').length");
        assert_eq!(drawn.as_u64(), Some(u64::from(500u32)));
        loads.push(rendered.as_f64().unwrap());
    }
    loading.store(false, Ordering::Relaxed);
    let probes = prober.join().unwrap();
    if let Some(dir) = screenshots() {
        browser.screenshot(&dir.join("console-map-500.png"));
    }
    loads.sort_by(f64::total_cmp);
    let median = loads[loads.len() / 2];
    println!(
        "500 services, {calls} edges: map loaded in {loads:?} ms (median {median:.0} ms); /healthz answered {probes} probes meanwhile, the slowest in {:?}",
        slowest.lock().unwrap()
    );
    assert!(
        median < 1000.0,
        "the map took {median:.0} ms (median of {loads:?})"
    );
    assert!(probes > 0);
    assert!(*slowest.lock().unwrap() < Duration::from_secs(1));
}
