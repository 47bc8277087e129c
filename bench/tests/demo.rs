//! The README's main job, `flowattr-bench demo`, as a user runs it: one node, and a cluster
//! of two sharing over a real broker. The demo checks every flow against the fleet's ground
//! truth and exits non-zero on a misattribution; these tests also read its report.

use std::process::Command;

use flowattr_bench::process::Broker;

fn run_demo(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_flowattr-bench"))
        .args([
            "demo",
            "--duration",
            "2m",
            "--connections-per-second",
            "30",
            "--show",
            "0",
        ])
        .args(args)
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The figure after `label` in the demo's closing lines, e.g. `attributed correctly`.
fn count_before(report: &str, label: &str) -> usize {
    let at = report
        .rfind(label)
        .unwrap_or_else(|| panic!("no `{label}` in:\n{report}"));
    let number = report[..at]
        .trim_end()
        .rsplit(|c: char| c.is_whitespace() || c == ',' || c == ':')
        .next()
        .unwrap();
    number
        .parse()
        .unwrap_or_else(|_| panic!("`{number}` before `{label}`"))
}

#[test]
fn the_demo_attributes_a_fleet_on_one_node_and_misattributes_nothing() {
    let report = run_demo(&[]);
    assert_eq!(count_before(&report, "misattributed"), 0, "{report}");
    let correct = count_before(&report, "attributed correctly");
    let emitted = count_before(&report, "flows emitted").max(1);
    // Without brokers the node has no events about the load balancers: flows to them are
    // unattributed, the rest are named.
    assert!(
        correct * 100 / emitted >= 85,
        "{correct} of {emitted} correct:\n{report}"
    );
}

#[test]
fn the_demo_runs_a_two_node_cluster_where_nodes_name_what_only_their_peer_learned() {
    let broker = Broker::start(&Broker::binary_from_env().unwrap()).unwrap();
    let report = run_demo(&["--nodes", "2", "--brokers", &broker.address]);
    assert_eq!(count_before(&report, "misattributed"), 0, "{report}");
    let correct = count_before(&report, "attributed correctly");
    let from_peers = count_before(&report, "of the correct ones named from heartbeats");
    // Hosts are split evenly between the nodes, so about half of each node's remote sides
    // were learned by the other one.
    assert!(
        from_peers * 3 >= correct,
        "{from_peers} of {correct} from peers:\n{report}"
    );
    // With the load balancers' events, nearly every delivered flow is named.
    let emitted = count_before(&report, "flows emitted");
    assert!(
        correct * 1000 >= emitted * 995,
        "{correct} of {emitted} correct:\n{report}"
    );
}

#[test]
fn a_demo_cluster_without_brokers_is_a_one_line_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_flowattr-bench"))
        .args(["demo", "--nodes", "2"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("give --brokers"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
