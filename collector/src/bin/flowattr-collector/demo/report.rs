//! The demo's check: every emitted flow against the fleet's ground truth, and the dependency
//! graph the nodes built.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use flowattr_collector::deps;
use flowattr_collector::node::Node;
use flowattr_collector::synthetic::exporter_of;
use flowattr_common::CanonicalIp;

/// What the nodes emitted, judged.
#[derive(Debug, Default)]
pub struct Tally {
    pub lines: usize,
    pub correct: usize,
    /// Correct, and named from heartbeats only another node received.
    pub from_peers: usize,
    pub misattributed: usize,
    pub unattributed: BTreeMap<String, usize>,
}

impl Tally {
    /// Reads every node's output once `records` lines are there (or at `deadline`), printing
    /// the first `show` flows. `node_of` says which node each exporter sent to.
    pub fn read(
        outputs: &[PathBuf],
        records: usize,
        deadline: Instant,
        truth: &HashMap<(u64, u64, u32), String>,
        node_of: &HashMap<u64, usize>,
        show: usize,
    ) -> anyhow::Result<Tally> {
        // The emitted counters move before the sink's write returns.
        let texts = loop {
            let texts = outputs
                .iter()
                .map(|path| std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display())))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let lines: usize = texts.iter().map(|text| text.lines().count()).sum();
            if lines >= records || Instant::now() > deadline {
                break texts;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut tally = Tally::default();
        let files: Vec<String> = outputs.iter().map(|path| path.display().to_string()).collect();
        println!("\nattributed flows (JSON lines in {}):", files.join(", "));
        for (node, text) in texts.iter().enumerate() {
            for line in text.lines() {
                tally.lines += 1;
                if tally.lines <= show {
                    println!("  {line}");
                }
                let flow: serde_json::Value = serde_json::from_str(line).with_context(|| format!("an output line is not JSON: {line}"))?;
                tally.judge(&flow, node, truth, node_of);
            }
        }
        Ok(tally)
    }

    fn judge(&mut self, flow: &serde_json::Value, node: usize, truth: &HashMap<(u64, u64, u32), String>, node_of: &HashMap<u64, usize>) {
        let key = (
            flow["exporter"].as_u64().unwrap_or_default(),
            flow["sequence"].as_u64().unwrap_or_default(),
            flow["index"].as_u64().unwrap_or_default() as u32,
        );
        match (flow["remote_workload"].as_str(), truth.get(&key)) {
            (Some(got), Some(truth)) if got == truth => {
                self.correct += 1;
                let remote_host = flow["remote_ip"].as_str().and_then(|ip| ip.parse::<IpAddr>().ok());
                let learned_by = remote_host.and_then(|ip| node_of.get(&exporter_of(CanonicalIp::from(ip)).0));
                if learned_by.is_some_and(|&other| other != node) {
                    self.from_peers += 1;
                }
            }
            (Some(_), _) => self.misattributed += 1,
            (None, _) => {
                let reason = flow["unattributed"].as_str().unwrap_or("?").to_owned();
                *self.unattributed.entry(reason).or_default() += 1;
            }
        }
    }

    pub fn print(&self, records: usize, nodes: usize) {
        let reasons: Vec<String> = self
            .unattributed
            .iter()
            .map(|(reason, count)| format!("{reason}={count}"))
            .collect();
        println!(
            "\n{} records emitted for {records} sent: {} attributed correctly, {} unattributed ({}), {} misattributed",
            self.lines,
            self.correct,
            self.unattributed.values().sum::<usize>(),
            if reasons.is_empty() { "none".to_owned() } else { reasons.join(", ") },
            self.misattributed,
        );
        if nodes > 1 {
            println!(
                "{} of the correct ones named from heartbeats that only another node received",
                self.from_peers
            );
        }
    }
}

/// The dependency graph of every node together: each connection is counted by the node its
/// client's report reached.
pub fn print_graph(nodes: &[Node]) {
    let edges = deps::merge(nodes.iter().flat_map(|node| {
        node.shared.views.iter().map(|view| {
            view.lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .edges
                .clone()
        })
    }));
    let attributed: Vec<_> = edges.iter().filter(|edge| edge.attributed).collect();
    println!(
        "\ndependency graph: {} edges between workloads, client -> server (top 10 by connections; GET /v1/deps?format=dot on a node for its part):",
        attributed.len()
    );
    for edge in attributed.iter().take(10) {
        println!(
            "  {} -> {}: {} connections, {} bytes",
            edge.client, edge.server, edge.count.connections, edge.count.bytes
        );
    }
}
