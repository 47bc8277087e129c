//! The exporter at the trust boundary, for real, as root: what it claims must be what a
//! collector can believe (its names, its clock, the workload of a dual-stack socket), and what
//! a collector refuses must never stop the rest of its flows.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use flowattr_common::wire::{
    COMPRESSION_LEVEL, ExporterId, FlowBatch, FlowRecord, FrameCompressor, FrameKind,
    MeasuredFlowBatch, WorkloadIndex, encode_frame,
};

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use serde_json::Value;
use support::*;

#[test]
fn a_dual_stack_listeners_ipv4_client_gets_the_ports_registered_workload() {
    require_root();
    let scratch = Scratch::new("dualstack");
    let pair = NetnsPair::new("ds", 5);
    let server_ip = pair.ips[1].to_string();
    // The whole address is the host's; port 7101 of it is the shared workload's.
    scratch.register(&server_ip, "host-svc");
    let status = Command::new(EXPORTER)
        .arg("register")
        .args(scratch.common_args())
        .args([
            "--ip",
            &server_ip,
            "--port",
            "7101",
            "--workload",
            "dual-svc",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let _exporter = scratch.start_exporter(collector.ingest_addr);

    // A server on [::]:7101 with IPV6_V6ONLY off, as Go and Java listen on ":7101".
    let listener = pair.run(1, || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        socket.set_only_v6(false).unwrap();
        socket
            .bind(&SocketAddr::from(([0u16; 8], 7101)).into())
            .unwrap();
        socket.listen(16).unwrap();
        TcpListener::from(socket)
    });
    let server = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        let mut got = [0; 4];
        stream.read_exact(&mut got).unwrap();
        stream.write_all(b"pong").unwrap();
        peer
    });
    let server_addr = SocketAddr::from((pair.ips[1], 7101));
    pair.run(0, move || {
        let mut client = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0; 4];
        client.read_exact(&mut got).unwrap();
    });
    let peer = server.join().unwrap();
    assert!(
        peer.is_ipv6(),
        "the server saw its client as v4-mapped IPv6: {peer}"
    );

    let flows = scratch.flows_with_port(7101, 2);
    let server_side = flows
        .iter()
        .find(|flow| flow["direction"] == "inbound")
        .expect("the server's report");
    assert_eq!(server_side["local_ip"], server_ip.as_str(), "{server_side}");
    assert_eq!(server_side["local_workload"], "dual-svc", "{server_side}");
    let client_side = flows
        .iter()
        .find(|flow| flow["direction"] == "outbound")
        .expect("the client's report");
    assert_eq!(client_side["remote_workload"], "dual-svc", "{client_side}");
}

/// A frame as an exporter of an older, laxer version might have left in its spool.
fn plant(scratch: &Scratch, sequence: u64, flows: u64, frame: &[u8]) {
    let spool = scratch.state_dir().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join(format!("{sequence:020}-{flows}.frame")), frame).unwrap();
}

fn planted_flow(remote: [u8; 4], workload: u32, start: Timestamp) -> FlowRecord {
    FlowRecord {
        local_ip: CanonicalIp::from_v4([10, 99, 0, 1].into()),
        remote_ip: CanonicalIp::from_v4(remote.into()),
        local_port: 40_000,
        remote_port: 443,
        local_workload: Some(WorkloadIndex(workload)),
        local_shared: false,
        start,
        end: start.saturating_add(Duration::from_secs(1)),
        bytes_sent: 1,
        bytes_received: 1,
        segments_sent: 1,
        segments_received: 1,
        retransmits: 0,
        direction: Direction::Outbound,
        state: FlowState::Closed,
    }
}

#[test]
fn bad_names_are_refused_at_the_door_and_a_refused_batch_never_blocks_the_queue() {
    require_root();
    let scratch = Scratch::new("refused");
    let register = Command::new(EXPORTER)
        .arg("register")
        .args(scratch.common_args())
        .args(["--ip", "10.99.0.1", "--workload", "bad\tname"])
        .output()
        .unwrap();
    assert!(!register.status.success());
    let stderr = String::from_utf8_lossy(&register.stderr);
    assert!(stderr.contains("control character"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let identity = scratch.dir.path().join("identity");
    std::fs::write(&identity, "h".repeat(300)).unwrap();
    let run = Command::new(EXPORTER)
        .arg("run")
        .args(scratch.common_args())
        .args([
            "--dump",
            "--once",
            "--api-socket",
            "none",
            "--host-identity",
            identity.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("host identity file") && stderr.contains("300 bytes long"),
        "{stderr}"
    );

    // Left in the spool: a batch the collector cannot read at all, then one whose first record
    // carries a name the collector refuses.
    let mut unreadable = Vec::new();
    encode_frame(FrameKind::FlowBatch, &[0xAB; 64], &mut unreadable).unwrap();
    plant(&scratch, 1, 1, &unreadable);
    let start = Timestamp::now().saturating_sub(Duration::from_secs(3));
    // Compressed, as exporters send by default: its refused record is kept expanded.
    let mut mixed = Vec::new();
    let batch = FlowBatch {
        exporter: ExporterId(4242),
        sequence: 2,
        region: "default".into(),
        workloads: vec!["bad\tname".into(), "good".into()],
        flows: vec![
            planted_flow([10, 99, 0, 2], 0, start),
            planted_flow([10, 99, 0, 3], 1, start),
        ],
    };
    let measured = MeasuredFlowBatch {
        host: Some("planted-host".into()),
        clock: None,
        batch,
        round_trips: Vec::new(),
    };
    FrameCompressor::new(COMPRESSION_LEVEL)
        .unwrap()
        .encode_batch(&measured, &mut mixed)
        .unwrap();
    plant(&scratch, 2, 2, &mixed);

    std::fs::write(&identity, "refusal-test-host\n").unwrap();
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let exporter = scratch.start_exporter_with(
        collector.ingest_addr,
        &[
            "--exporter-id",
            "4242",
            "--host-identity",
            identity.to_str().unwrap(),
        ],
    );
    // Flows captured now get through behind the refused ones.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    talk(&listener, 2);
    let fresh = scratch.flows_with_port(listener.local_addr().unwrap().port(), 4);
    assert!(
        fresh
            .iter()
            .all(|flow| flow["local_workload"] == "refusal-test-host"),
        "{fresh:?}"
    );
    // From the mixed batch, the good record only (its remote side has no evidence: it comes
    // out after its retry).
    let planted = || -> Vec<Value> {
        scratch
            .records()
            .into_iter()
            .filter(|flow| flow["local_ip"] == "10.99.0.1")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while planted().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let planted = planted();
    assert_eq!(planted.len(), 1, "{planted:?}");
    assert_eq!(planted[0]["local_workload"], "good");

    assert_eq!(
        exporter.metric("flowattr_exporter_batches_refused_total"),
        1
    );
    assert_eq!(exporter.metric("flowattr_exporter_flows_refused_total"), 2);
    let dead = scratch.state_dir().join("dead-letter");
    assert_eq!(
        std::fs::read(dead.join("batch-1-malformed.frame")).unwrap(),
        unreadable
    );
    let kept = std::fs::read_to_string(dead.join("records.jsonl")).unwrap();
    let kept: Vec<Value> = kept
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["refused"], "bad_workload_name");
    assert_eq!(kept[0]["remote_ip"], "10.99.0.2");
    assert_eq!(kept[0]["sequence"], 2);
    assert!(exporter.metric("flowattr_exporter_dead_letter_bytes") > 0);
}

#[test]
fn a_connection_held_longer_than_retention_is_attributed() {
    require_root();
    let scratch = Scratch::new("long");
    let pair = NetnsPair::new("lc", 6);
    scratch.register(&pair.ips[0].to_string(), "long-client");
    scratch.register(&pair.ips[1].to_string(), "long-server");
    // Retention at its minimum for 1 s exporter intervals: 1 + 1 + 2 + 2 + 1 + 5 = 12 s.
    let collector = scratch.start_collector_with("127.0.0.1:0".parse().unwrap(), |config| {
        config.ingest.exporter_interval = Duration::from_secs(1);
        config.ingest.exporter_send_time = Duration::from_secs(1);
        config.ownership.retention = Duration::from_secs(12);
    });
    let _exporter = scratch.start_exporter(collector.ingest_addr);

    let server_addr = SocketAddr::from((pair.ips[1], 7201));
    let listener = pair.run(1, move || TcpListener::bind(server_addr).unwrap());
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let opened = Instant::now();
    pair.run(0, move || {
        let mut client = TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)).unwrap();
        // Twice the retention, then close.
        std::thread::sleep(Duration::from_secs(24));
        client.write_all(b"bye").unwrap();
    });
    server.join().unwrap();
    assert!(opened.elapsed() > Duration::from_secs(24));

    for flow in scratch.flows_with_port(7201, 2) {
        let expected = if flow["direction"] == "outbound" {
            "long-server"
        } else {
            "long-client"
        };
        assert_eq!(flow["remote_workload"], expected, "{flow}");
        let lived = flow["end_ns"].as_u64().unwrap() - flow["start_ns"].as_u64().unwrap();
        assert!(lived > 20_000_000_000, "{flow}");
    }
    // So was every open report along the way.
    let open: Vec<Value> = scratch
        .records()
        .into_iter()
        .filter(|flow| {
            flow["state"] == "open" && (flow["local_port"] == 7201 || flow["remote_port"] == 7201)
        })
        .collect();
    assert!(open.len() > 20, "{} open reports", open.len());
    let expired: Vec<&Value> = open
        .iter()
        .filter(|flow| !flow["unattributed"].is_null())
        .collect();
    assert!(expired.is_empty(), "{expired:?}");
}

/// A host whose wall clock is ten years fast learns its offset from the collector (the clock
/// probe it opens its connection with, then every ack) and stamps it on each batch: the
/// collector corrects the times, so its flows arrive on the collector's clock and are
/// attributed, while the agent still says its clock needs fixing.
#[test]
fn a_host_ten_years_fast_is_corrected_attributed_and_told() {
    require_root();
    let scratch = Scratch::new("fast");
    scratch.register("127.0.0.1", "fast-host");
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    // libfaketime moves this exporter's wall clock, and only its wall clock: the kernel's
    // monotonic clock, which stamps the events, stays true.
    let mut faketime = Command::new("faketime");
    faketime
        .args(["-f", "+10y", EXPORTER])
        .env("DONT_FAKE_MONOTONIC", "1");
    let exporter = scratch.spawn_exporter(faketime, collector.ingest_addr, &[]);
    let before = Timestamp::now();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    talk(&listener, 3);
    let after = Timestamp::now();

    let flows = scratch.flows_with_port(port, 6);
    for flow in &flows {
        let (start, end) = (
            flow["start_ns"].as_u64().unwrap(),
            flow["end_ns"].as_u64().unwrap(),
        );
        assert!(
            start + 50_000_000 >= before.as_nanos() && end <= after.as_nanos() + 2_000_000_000,
            "on the collector's clock: {flow}"
        );
        assert_eq!(flow["remote_workload"], "fast-host", "{flow}");
    }
    let offset = exporter.metric_value("flowattr_exporter_clock_offset_seconds");
    assert!(offset > 9.9 * 365.0 * 86_400.0, "offset {offset}");
    assert_eq!(
        exporter.metric("flowattr_exporter_clock_healthy"),
        0,
        "the agent still says its time sync is broken"
    );
    assert_eq!(exporter.metric("flowattr_exporter_flows_refused_total"), 0);
}
