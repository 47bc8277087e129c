//! The demo's check: every flow the nodes emitted, scored against the fleet's ground truth,
//! and the dependency graph the nodes built.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use flowattr_collector::deps;
use flowattr_collector::node::Node;
use flowattr_collector::ownership::Reason;
use flowattr_common::CanonicalIp;
use flowattr_common::wire::MeasuredFlowBatch;

use crate::simulate::fleet::{Fleet, ServiceId};
use crate::simulate::observe::{Arrival, Observations};
use crate::simulate::score::{Score, score};
use crate::simulate::strategy::{Answers, Verdict};

/// What the nodes emitted, judged.
#[derive(Debug)]
pub struct Outcome {
    pub score: Score,
    /// Lines in the nodes' outputs.
    pub emitted: usize,
    /// Correct answers naming a remote side that only another node's exporters reported.
    pub from_peers: usize,
}

/// Reads every node's output once `expected` flows are there (or at `deadline`), printing the
/// first `show`. `node_of` says which node each exporter sent to.
#[allow(clippy::too_many_arguments)]
pub fn judge(
    fleet: &Fleet,
    observations: &Observations,
    batches: &[MeasuredFlowBatch],
    node_of: &HashMap<u64, usize>,
    outputs: &[PathBuf],
    expected: usize,
    deadline: Instant,
    show: usize,
) -> anyhow::Result<Outcome> {
    // The emitted counters move before the sink's write returns.
    let texts = loop {
        let texts = outputs
            .iter()
            .map(|path| {
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let lines: usize = texts.iter().map(|text| text.lines().count()).sum();
        if lines >= expected || Instant::now() > deadline {
            break texts;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each batch's report ids, from its first delivery.
    let mut ids: HashMap<(u64, u64), &[crate::simulate::observe::Report]> = HashMap::new();
    for (_, arrival) in &observations.arrivals {
        if let Arrival::Batch(batch) = arrival {
            ids.entry((batch.exporter, batch.sequence))
                .or_insert(&batch.reports);
        }
    }
    // Which exporters reported each IP as their own.
    let mut reporters: HashMap<CanonicalIp, HashSet<u64>> = HashMap::new();
    for MeasuredFlowBatch { batch, .. } in batches {
        for flow in &batch.flows {
            reporters
                .entry(flow.local_ip)
                .or_default()
                .insert(batch.exporter.0);
        }
    }
    let by_name: HashMap<&str, ServiceId> = fleet
        .services
        .iter()
        .enumerate()
        .map(|(id, service)| (service.name.as_str(), id as ServiceId))
        .collect();
    let files: Vec<String> = outputs
        .iter()
        .map(|path| path.display().to_string())
        .collect();
    println!("\nattributed flows (JSON lines in {}):", files.join(", "));
    let mut answers: Answers = Vec::new();
    let (mut emitted, mut from_peers) = (0, 0);
    for (node, text) in texts.iter().enumerate() {
        for line in text.lines() {
            emitted += 1;
            if emitted <= show {
                println!("  {line}");
            }
            let flow: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("an output line is not JSON: {line}"))?;
            let key = (
                flow["exporter"].as_u64().unwrap_or_default(),
                flow["sequence"].as_u64().unwrap_or_default(),
            );
            let index = flow["index"].as_u64().unwrap_or_default() as usize;
            let report = ids
                .get(&key)
                .and_then(|reports| reports.get(index))
                .with_context(|| format!("a flow no batch sent: {line}"))?;
            let verdict = match flow["remote_workload"].as_str() {
                Some(name) => Verdict::Owner(
                    *by_name
                        .get(name)
                        .with_context(|| format!("a workload no fleet has: {name}"))?,
                ),
                None => {
                    let reason = flow["unattributed"].as_str().unwrap_or_default();
                    Verdict::Unattributed(
                        Reason::ALL
                            .iter()
                            .map(|reason| reason.as_str())
                            .find(|known| *known == reason)
                            .unwrap_or("other"),
                    )
                }
            };
            if verdict == Verdict::Owner(observations.truth[report.id as usize].remote) {
                let learned_here = reporters.get(&report.remote_ip).is_some_and(|exporters| {
                    exporters
                        .iter()
                        .any(|exporter| node_of.get(exporter) == Some(&node))
                });
                from_peers += usize::from(!learned_here);
            }
            answers.push((report.id, verdict));
        }
    }
    let name = format!(
        "flowattr, {} node{} over loopback",
        outputs.len(),
        if outputs.len() == 1 { "" } else { "s" }
    );
    Ok(Outcome {
        score: score(name, fleet, observations, &answers),
        emitted,
        from_peers,
    })
}

impl Outcome {
    pub fn print(&self, nodes: usize, events: bool) {
        let score = &self.score;
        let reasons: Vec<String> = score
            .unattributed_by_reason
            .iter()
            .map(|(reason, count)| format!("{reason}={count}"))
            .collect();
        println!(
            "the nodes: {} flows emitted, {} attributed correctly, {} unattributed ({}), {} misattributed; {} reports lost on the way (batch loss, exporter restarts)",
            self.emitted,
            score.correct,
            score.unattributed,
            if reasons.is_empty() {
                "none".to_owned()
            } else {
                reasons.join(", ")
            },
            score.misattributed,
            score.undelivered,
        );
        if nodes > 1 {
            println!(
                "{} of the correct ones named from heartbeats that only another node received",
                self.from_peers
            );
        }
        if !events {
            println!(
                "(load balancers run no exporter: without --brokers the nodes get no events about them, and flows to them come out unattributed)"
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
        "\ndependency graph: {} edges between services, client -> server (top 10 by connections; GET /v1/deps?format=dot on a node for its part):",
        attributed.len()
    );
    for edge in attributed.iter().take(10) {
        println!(
            "  {} -> {}: {} connections, {} flow reports, {} bytes",
            edge.client, edge.server, edge.count.connections, edge.count.flows, edge.count.bytes
        );
    }
    let unattributed = edges.iter().filter(|edge| !edge.attributed);
    let (connections, flows) = unattributed.fold((0, 0), |(connections, flows), edge| {
        (
            connections + edge.count.connections,
            flows + edge.count.flows,
        )
    });
    println!(
        "  with an unattributed or unknown end: {connections} connections, {flows} flow reports (edges to `unattributed:<reason>` in /v1/deps)"
    );
}
