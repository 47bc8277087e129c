//! The exporter's systemd unit (deploy/systemd/flowattr-exporter.service): it verifies, and the
//! capabilities it keeps are enough. The agent runs as root under `setpriv` with exactly the
//! unit's bounding set, captures a connection this test makes, and ships it to a collector
//! that names it; with one of them taken away it cannot start, so none is there for nothing.

mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};

use support::*;

#[test]
fn the_systemd_unit_verifies() {
    flowattr_bench::systemd::verify(
        "flowattr-exporter.service",
        flowattr_bench::systemd::EXPORTER_UNIT,
        "flowattr-exporter",
        std::path::Path::new(EXPORTER),
    )
    .unwrap_or_else(|said| panic!("systemd-analyze verify: {said}"));
}

fn under_bounding_set(caps: &[String]) -> Command {
    let mut command = Command::new("setpriv");
    let set: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|cap| format!("+{cap}")))
        .collect::<Vec<_>>()
        .join(",");
    command.args(["--bounding-set", &set, "--inh-caps=-all", "--", EXPORTER]);
    command
}

#[test]
fn the_units_capabilities_are_enough_and_each_is_needed_to_capture() {
    require_root();
    let caps = flowattr_bench::systemd::bounding_set(flowattr_bench::systemd::EXPORTER_UNIT);
    let scratch = Scratch::new("unit-caps");
    scratch.register("127.0.0.1", "unit-caps-svc");
    let collector = scratch.start_collector("127.0.0.1:0".parse().unwrap());
    let exporter = scratch.spawn_exporter(under_bounding_set(&caps), collector.ingest_addr, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    talk(&listener, 2);
    let flows = scratch.flows_with_port(port, 4);
    assert_eq!(flows.len(), 4, "{flows:?}");
    assert!(
        flows
            .iter()
            .all(|flow| flow["local_workload"] == "unit-caps-svc"),
        "{flows:?}"
    );
    exporter.stop();

    // The two the capture needs: without either, the agent stops at start with one line.
    for missing in ["bpf", "perfmon"] {
        let fewer: Vec<String> = caps.iter().filter(|cap| *cap != missing).cloned().collect();
        let mut command = under_bounding_set(&fewer);
        let out = scratch
            .exporter_command(&mut command, collector.ingest_addr, &["--once"])
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "started without CAP_{}: {stderr}",
            missing.to_uppercase()
        );
        assert!(!stderr.contains("ready"), "{stderr}");
        let line = format!(
            "flowattr-exporter: the exporter runs without CAP_{}, which",
            missing.to_uppercase()
        );
        assert!(
            stderr
                .trim()
                .lines()
                .last()
                .is_some_and(|last| last.starts_with(&line)),
            "{stderr}"
        );
    }
}
