//! Mutual TLS on the ingest port, against the collector binary: a client the fleet's CA did not
//! vouch for never gets a batch in, a stranger cannot hold a connection (or its memory) past
//! the handshake timeout, and an authenticated client's flows count as evidence only for the
//! IPs its certificate (or the node's config) lets it claim. Refusals are counted.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowattr_bench::pki::TestPki;
use flowattr_common::client::CollectorConnection;
use flowattr_common::tls::{ClientTls, TlsFiles};
use flowattr_common::wire::{
    AckStatus, ExporterId, FlowBatch, FlowRecord, RecordRefusal, RefusedRecord,
};
use flowattr_common::{CanonicalIp, Timestamp};
use support::{Collector, batch_of, closed_flow, wait_for_records};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn flow(local: &str, remote: &str, port: u16, at: Timestamp) -> FlowRecord {
    let end = at.saturating_add(Duration::from_millis(100));
    closed_flow(
        (CanonicalIp::from(ip(local)), port),
        (CanonicalIp::from(ip(remote)), 443),
        Some(0),
        at,
        end,
    )
}

struct Fleet {
    _dir: tempfile::TempDir,
    collector: Collector,
    /// Host A's certificate: IP SAN 10.0.0.1.
    host_a: ClientTls,
    /// Host B's: IP SAN 10.0.0.3.
    host_b: ClientTls,
    /// A peer collector's: no IP SAN, granted 10.9.0.0/16 by name in the node's config.
    peer: ClientTls,
    /// Signed by a CA the node does not trust, for host A's very address.
    rogue: ClientTls,
}

fn client(files: &TlsFiles, ca: &Path) -> ClientTls {
    let files = TlsFiles {
        ca: ca.to_owned(),
        ..files.clone()
    };
    ClientTls::from_files(&files, None).unwrap()
}

/// A node with `[tls]` from `node`'s files and `extra` config after it, writing to
/// `<dir>/<name>.jsonl`.
fn start_node(dir: &Path, name: &str, node: &TlsFiles, extra: &str, args: &[&str]) -> Collector {
    let output = dir.join(format!("{name}.jsonl"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nkind = \"file\"\npath = \"{}\"\n\n{extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"1s\"\n\n[[tls.clients]]\nname = \"collector-eu.fleet\"\nclaims = [\"10.9.0.0/16\", \"10.50.0.0/16\"]\nrelay = true\n",
            output.display(),
            node.ca.display(),
            node.cert.display(),
            node.key.display()
        ),
    )
    .unwrap();
    let mut all = vec![
        "--cpus",
        "2",
        "--delay",
        "1s",
        "--segment-span",
        "200ms",
        "--max-retries",
        "0",
    ];
    all.extend_from_slice(args);
    Collector::start_with_config(&config, &output, &all)
}

fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "fleet").unwrap();
    let rogue_pki = TestPki::new(dir.path(), "rogue").unwrap();
    let node = pki
        .issue("collector-1", &["collector-1.fleet"], &[ip("127.0.0.1")])
        .unwrap();
    let collector = start_node(dir.path(), "flows", &node, "", &["--storage", "memory"]);
    let ca = pki.ca();
    let host_a = client(
        &pki.issue("host-a", &["host-a.fleet"], &[ip("10.0.0.1")])
            .unwrap(),
        &ca,
    );
    let host_b = client(
        &pki.issue("host-b", &["host-b.fleet"], &[ip("10.0.0.3")])
            .unwrap(),
        &ca,
    );
    let peer = client(
        &pki.issue("collector-eu", &["collector-eu.fleet"], &[])
            .unwrap(),
        &ca,
    );
    // The rogue trusts the real CA for the server (it can reach the node), but its own
    // certificate is its own CA's.
    let rogue = client(
        &rogue_pki
            .issue("host-a", &["host-a.fleet"], &[ip("10.0.0.1")])
            .unwrap(),
        &ca,
    );
    Fleet {
        _dir: dir,
        collector,
        host_a,
        host_b,
        peer,
        rogue,
    }
}

/// The exporter id a certificate with this identity (first DNS name, else common name) gives.
fn id(identity: &str) -> u64 {
    ExporterId::for_certificate(identity).0
}

fn handshake_refusals(collector: &Collector) -> u64 {
    collector.metric(
        "flowattr_ingest_rejections_total",
        Some("reason=\"tls_handshake\""),
    )
}

fn send_over(
    collector: &Collector,
    tls: &ClientTls,
    batch: &FlowBatch,
) -> Result<flowattr_common::wire::Ack, String> {
    let mut connection =
        CollectorConnection::connect_with(collector.ingest, Duration::from_secs(5), Some(tls))
            .map_err(|e| e.to_string())?;
    connection
        .send_and_wait(batch)
        .map_err(|error| error.to_string())
}

#[test]
fn mtls_refuses_unknown_clients_and_counts_them() {
    let fleet = fleet();
    let collector = &fleet.collector;
    let now = Timestamp::now().saturating_sub(Duration::from_secs(5));
    let batch = batch_of(
        id("host-a.fleet"),
        0,
        "api",
        vec![flow("10.0.0.1", "10.0.0.3", 40_000, now)],
    );

    // A certificate from another CA: the handshake fails, no batch gets in.
    let refused = send_over(collector, &fleet.rogue, &batch);
    assert!(
        refused.is_err(),
        "a rogue certificate was served: {refused:?}"
    );
    collector.wait_for_metric(
        "flowattr_ingest_rejections_total",
        Some("reason=\"tls_handshake\""),
        1,
    );

    // No certificate at all.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in
            flowattr_common::tls::load_certificates(&fleet._dir.path().join("fleet-ca.pem"))
                .unwrap()
        {
            roots.add(certificate).unwrap();
        }
        roots
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(collector.ingest).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(ip("127.0.0.1").into());
    let mut anonymous = rustls::StreamOwned::new(
        rustls::ClientConnection::new(Arc::new(anonymous), name).unwrap(),
        tcp,
    );
    let mut frame = Vec::new();
    flowattr_common::wire::encode_message(&batch, &mut frame).unwrap();
    let answered = anonymous
        .write_all(&frame)
        .and_then(|()| anonymous.flush())
        .and_then(|()| {
            let mut byte = [0u8; 1];
            anonymous.read(&mut byte)
        });
    assert!(
        answered.is_err(),
        "a client without a certificate got an answer: {answered:?}"
    );
    collector.wait_for_metric(
        "flowattr_ingest_rejections_total",
        Some("reason=\"tls_handshake\""),
        2,
    );

    // Plain TCP on a TLS port.
    let plain = CollectorConnection::connect(collector.ingest, Duration::from_secs(5))
        .and_then(|mut c| c.send_and_wait(&batch));
    assert!(plain.is_err(), "a plain-TCP client got an ack: {plain:?}");
    collector.wait_for_metric(
        "flowattr_ingest_rejections_total",
        Some("reason=\"tls_handshake\""),
        3,
    );

    // None of them stored anything; a known client still gets in afterwards.
    assert_eq!(collector.metric("flowattr_batches_accepted_total", None), 0);
    let ack = send_over(collector, &fleet.host_a, &batch).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    assert_eq!(handshake_refusals(collector), 3);
}

#[test]
fn a_stranger_holds_a_connection_only_until_the_handshake_timeout() {
    let fleet = fleet();
    let collector = &fleet.collector;
    // Silent: never says a word.
    let mut silent = TcpStream::connect(collector.ingest).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    let outcome = silent.read(&mut byte);
    assert!(matches!(outcome, Ok(0)) || outcome.is_err(), "{outcome:?}");
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(900) && held < Duration::from_secs(5),
        "held for {held:?}"
    );
    // Talkative: a TLS record header announcing a handshake message, then megabytes. The node
    // reads only what a handshake may hold before it gives up on the connection.
    let mut talkative = TcpStream::connect(collector.ingest).unwrap();
    talkative
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut garbage = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    garbage.resize(8 << 20, 0x41);
    let written = talkative.write_all(&garbage);
    assert!(
        written.is_err(),
        "the node read 8 MiB of an unfinished handshake"
    );
    collector.wait_for_metric(
        "flowattr_ingest_rejections_total",
        Some("reason=\"tls_handshake\""),
        2,
    );
    assert_eq!(
        collector.metric("flowattr_ingest_connections_open", None),
        0
    );
}

#[test]
fn evidence_is_taken_only_for_the_ips_a_client_may_claim() {
    let fleet = fleet();
    let collector = &fleet.collector;
    let t = Timestamp::now().saturating_sub(Duration::from_secs(10));
    // Host A reports its own 10.0.0.1, and (compromised) claims 10.0.0.2 for its workload too.
    let (a, b) = (id("host-a.fleet"), id("host-b.fleet"));
    let from_a = batch_of(
        a,
        0,
        "a-app",
        vec![
            flow("10.0.0.1", "10.0.0.50", 40_001, t),
            flow("10.0.0.2", "10.0.0.50", 40_002, t),
        ],
    );
    let ack = send_over(collector, &fleet.host_a, &from_a).unwrap();
    assert_eq!(ack.status, AckStatus::Accepted);
    assert_eq!(
        ack.refused,
        vec![RefusedRecord {
            record: 1,
            reason: RecordRefusal::ClaimNotAllowed
        }]
    );
    // The peer collector may speak for 10.9.0.0/16 (configured for its name), not beyond.
    let from_peer = batch_of(
        2,
        0,
        "eu-app",
        vec![
            flow("10.9.1.1", "10.0.0.50", 40_003, t),
            flow("10.8.1.1", "10.0.0.50", 40_004, t),
        ],
    );
    let ack = send_over(collector, &fleet.peer, &from_peer).unwrap();
    assert_eq!(
        ack.refused,
        vec![RefusedRecord {
            record: 1,
            reason: RecordRefusal::ClaimNotAllowed
        }]
    );
    let refused = |exporter: &str| {
        collector.metric(
            "flowattr_records_refused_total",
            Some(&format!(
                "exporter=\"{exporter}\",reason=\"claim_not_allowed\""
            )),
        )
    };
    assert_eq!((refused(&a.to_string()), refused("2")), (1, 1));

    // Host B's flows to those addresses: A's own IP is attributed to A's workload, the IP A
    // tried to claim is not (no evidence reached the map), and the peer's is.
    let later = t.saturating_add(Duration::from_millis(50));
    let from_b = batch_of(
        b,
        0,
        "b-app",
        vec![
            flow("10.0.0.3", "10.0.0.1", 50_001, later),
            flow("10.0.0.3", "10.0.0.2", 50_002, later),
            flow("10.0.0.3", "10.9.1.1", 50_003, later),
        ],
    );
    let ack = send_over(collector, &fleet.host_b, &from_b).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    let records = wait_for_records(&collector.output, 5);
    let remote = |index: u64| {
        let record = &records[&(b, 0, index)];
        (
            record["remote_workload"].as_str().map(str::to_owned),
            record["unattributed"].as_str().map(str::to_owned),
        )
    };
    assert_eq!(remote(0).0.as_deref(), Some("a-app"));
    assert_eq!(
        remote(1).0,
        None,
        "the claim A was refused must not attribute anything"
    );
    assert!(remote(1).1.is_some());
    assert_eq!(remote(2).0.as_deref(), Some("eu-app"));
    assert!(
        !records.contains_key(&(a, 0, 1)) && !records.contains_key(&(2, 0, 1)),
        "refused records are not emitted"
    );
}

#[test]
fn a_node_forwards_to_another_regions_node_over_mtls_as_a_client_it_trusts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "fleet").unwrap();
    let us_files = pki
        .issue("collector-us", &["collector-us.fleet"], &[ip("127.0.0.1")])
        .unwrap();
    let eu_files = pki
        .issue("collector-eu", &["collector-eu.fleet"], &[ip("127.0.0.1")])
        .unwrap();
    // us may be reached by eu only as `collector-eu.fleet`, granted 10.50.0.0/16 by name.
    let us = start_node(dir.path(), "us", &us_files, "", &["--storage", "memory"]);
    let regions = format!(
        "[node]\nregion = \"eu\"\n[[regions]]\nname = \"eu\"\ncidrs = [\"10.50.0.0/16\"]\n[[regions]]\nname = \"us\"\ncidrs = [\"10.60.0.0/16\"]\ncollectors = [\"{}\"]\n",
        us.ingest
    );
    let data = dir.path().join("eu-data");
    let eu = start_node(
        dir.path(),
        "eu",
        &eu_files,
        &regions,
        &["--data-dir", data.to_str().unwrap()],
    );
    let host = client(
        &pki.issue("eu-host", &[], &[ip("10.50.0.1")]).unwrap(),
        &pki.ca(),
    );
    let us_host = client(
        &pki.issue("us-host", &[], &[ip("10.60.0.2")]).unwrap(),
        &pki.ca(),
    );
    let t = Timestamp::now().saturating_sub(Duration::from_secs(10));
    let long = FlowRecord {
        end: t.saturating_add(Duration::from_secs(5)),
        ..flow("10.60.0.2", "10.60.0.9", 443, t)
    };
    let ack = send_over(
        &us,
        &us_host,
        &batch_of(id("us-host"), 0, "us-billing", vec![long]),
    )
    .unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    let later = t.saturating_add(Duration::from_secs(1));
    let to_us = batch_of(
        id("eu-host"),
        0,
        "eu-api",
        vec![flow("10.50.0.1", "10.60.0.2", 40_000, later)],
    );
    let ack = send_over(&eu, &host, &to_us).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    let records = wait_for_records(&us.output, 2);
    let forwarded = &records[&(id("eu-host"), 0, 0)];
    assert_eq!(
        (&forwarded["local_workload"], &forwarded["remote_workload"]),
        (&"eu-api".into(), &"us-billing".into()),
        "{forwarded}"
    );
    assert_eq!(handshake_refusals(&us), 0);
}

#[test]
fn a_host_speaks_only_as_itself_and_its_loopback_evidence_never_names_another_hosts_services() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path(), "fleet").unwrap();
    let node = pki
        .issue("collector-1", &["collector-1.fleet"], &[ip("127.0.0.1")])
        .unwrap();
    let collector = start_node(dir.path(), "flows", &node, "", &["--storage", "memory"]);
    // Both hosts may claim their loopback address: their agents report local connections.
    let host_a = client(
        &pki.issue(
            "host-a",
            &["host-a.fleet"],
            &[ip("10.0.0.1"), ip("127.0.0.1")],
        )
        .unwrap(),
        &pki.ca(),
    );
    let host_b = client(
        &pki.issue(
            "host-b",
            &["host-b.fleet"],
            &[ip("10.0.0.3"), ip("127.0.0.1")],
        )
        .unwrap(),
        &pki.ca(),
    );
    let (a, b) = (id("host-a.fleet"), id("host-b.fleet"));
    let t = Timestamp::now().saturating_sub(Duration::from_secs(10));
    let loopback = |local: u16, remote: u16, direction| FlowRecord {
        direction,
        ..closed_flow(
            (CanonicalIp::from(ip("127.0.0.1")), local),
            (CanonicalIp::from(ip("127.0.0.1")), remote),
            Some(0),
            t,
            t.saturating_add(Duration::from_secs(2)),
        )
    };
    let evil_redis = vec![loopback(6379, 50_000, flowattr_common::Direction::Inbound)];

    // B, compromised, files a redis named `evil` on 127.0.0.1:6379 under A's id: refused whole.
    let forged = send_over(
        &collector,
        &host_b,
        &batch_of(a, 0, "evil", evil_redis.clone()),
    )
    .unwrap();
    assert_eq!(
        forged.status,
        AckStatus::Refused(flowattr_common::wire::BatchRefusal::ExporterNotCertified)
    );
    assert_eq!(collector.metric("flowattr_batches_refused_total", None), 1);
    // Under its own id it is evidence about B's loopback, and B's alone.
    let own = send_over(&collector, &host_b, &batch_of(b, 0, "evil", evil_redis)).unwrap();
    assert_eq!((own.status, own.refused.len()), (AckStatus::Accepted, 0));

    // A's own client connects to its own 127.0.0.1:6379 (whose server side A did not report).
    let later = t.saturating_add(Duration::from_millis(500));
    let from_a = batch_of(
        a,
        0,
        "a-app",
        vec![FlowRecord {
            start: later,
            ..loopback(40_000, 6379, flowattr_common::Direction::Outbound)
        }],
    );
    let ack = send_over(&collector, &host_a, &from_a).unwrap();
    assert_eq!((ack.status, ack.refused.len()), (AckStatus::Accepted, 0));
    let records = wait_for_records(&collector.output, 2);
    let record = &records[&(a, 0, 0)];
    assert_eq!(
        record["remote_workload"],
        serde_json::Value::Null,
        "B's evidence named A's service: {record}"
    );
    assert_eq!(record["unattributed"], "host_local", "{record}");
    assert_eq!(records[&(b, 0, 0)]["local_workload"], "evil");
    assert!(!records.contains_key(&(a, 0, 1)));
}
