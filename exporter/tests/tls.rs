//! The agent over mutual TLS, for real: its eBPF program captures connections, it ships them to
//! a collector node that takes only TLS clients with a certificate from the fleet's CA, and the
//! collector keeps only what the agent's certificate lets it claim.

mod support;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::process::Command;
use std::time::Duration;

use flowattr_bench::pki::TestPki;
use flowattr_collector::config::TlsSection;
use support::*;

#[test]
fn the_agent_ships_over_mtls_and_claims_only_its_certificates_addresses() {
    require_root();
    let scratch = Scratch::new("tls");
    let pki = TestPki::new(scratch.dir.path(), "fleet").unwrap();
    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let node = pki.issue("collector", &[], &[loopback]).unwrap();
    let host = pki.issue("host", &["host.fleet"], &[loopback]).unwrap();
    let collector = scratch.start_collector_with("127.0.0.1:0".parse().unwrap(), |config| {
        config.tls = Some(TlsSection {
            ca: node.ca.clone(),
            cert: node.cert.clone(),
            key: node.key.clone(),
            handshake_timeout: Duration::from_secs(5),
            clients: Vec::new(),
        });
    });
    scratch.register("127.0.0.1", "tls-svc");
    let path = |p: &std::path::Path| p.display().to_string();
    let exporter = scratch.start_exporter_with(
        collector.ingest_addr,
        &[
            "--tls-ca",
            &path(&host.ca),
            "--tls-cert",
            &path(&host.cert),
            "--tls-key",
            &path(&host.key),
        ],
    );

    // 127.0.0.1 is the host's: both reports of a loopback connection are kept and named.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    talk(&listener, 1);
    for flow in scratch.flows_with_port(port, 2) {
        assert_eq!(flow["local_workload"], "tls-svc", "{flow}");
        // Under mTLS the agent ships under the id its certificate gives it, the only one the
        // collector takes from it.
        assert_eq!(
            flow["exporter"],
            flowattr_common::wire::ExporterId::for_certificate("host.fleet").0,
            "{flow}"
        );
    }
    // From 127.0.0.2, which its certificate does not name: the client's report is refused
    // (counted by the agent), the server's (local 127.0.0.1) is kept.
    let refused_before = exporter.metric("flowattr_exporter_flows_refused_total");
    let port = talk_from(Ipv4Addr::new(127, 0, 0, 2));
    let kept = scratch.flows_with_port(port, 1);
    assert_eq!(kept[0]["direction"], "inbound", "{kept:?}");
    exporter.wait_for_metric(
        "flowattr_exporter_flows_refused_total",
        (refused_before + 1) as f64,
    );
    std::thread::sleep(Duration::from_secs(2));
    let reports = scratch
        .records()
        .into_iter()
        .filter(|flow| flow["remote_port"] == port || flow["local_port"] == port)
        .count();
    assert_eq!(reports, 1, "the claim on 127.0.0.2 was stored");
}

#[test]
fn tls_flags_come_three_together_or_the_agent_does_not_start() {
    let scratch = Scratch::new("tls-flags");
    let output = Command::new(EXPORTER)
        .arg("run")
        .args(scratch.common_args())
        .args([
            "--collector",
            "127.0.0.1:1",
            "--tls-ca",
            "/nonexistent/ca.pem",
            "--api-socket",
            "none",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("--tls-ca, --tls-cert and --tls-key go together"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
