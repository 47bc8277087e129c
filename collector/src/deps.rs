//! The live service dependency graph: flow and byte counters per (local workload, remote
//! workload or unattributed reason, direction). Each shard counts the flows it emits with
//! interned ids (no allocation per flow); the control plane merges the shards' named
//! snapshots and renders JSON or Graphviz DOT.

use std::collections::BTreeMap;

use flowattr_common::{Direction, WorkloadId};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::ownership::{Reason, WorkloadInterner};
use crate::sink::direction_name;

/// The remote end of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteEnd {
    Workload(WorkloadId),
    Unattributed(Reason),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EdgeCount {
    pub flows: u64,
    pub bytes: u64,
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct DependencyCounter {
    edges: FxHashMap<(Option<WorkloadId>, RemoteEnd, Direction), EdgeCount>,
}

impl DependencyCounter {
    pub fn record(
        &mut self,
        local: Option<WorkloadId>,
        remote: RemoteEnd,
        direction: Direction,
        bytes: u64,
    ) {
        let count = self.edges.entry((local, remote, direction)).or_default();
        count.flows += 1;
        count.bytes += bytes;
    }

    /// The counters with names, for the control plane.
    pub fn snapshot(&self, names: &WorkloadInterner) -> Vec<Edge> {
        let name = |id: WorkloadId| names.name(id).unwrap_or("?").to_owned();
        self.edges
            .iter()
            .map(|(&(local, remote, direction), &count)| Edge {
                local: local.map(name),
                remote: match remote {
                    RemoteEnd::Workload(id) => name(id),
                    RemoteEnd::Unattributed(reason) => format!("unattributed:{}", reason.as_str()),
                },
                attributed: matches!(remote, RemoteEnd::Workload(_)),
                direction: direction_name(direction),
                count,
            })
            .collect()
    }
}

/// A named edge. `remote` is a workload name, or `unattributed:<reason>` when `attributed` is
/// false.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub local: Option<String>,
    pub remote: String,
    pub attributed: bool,
    pub direction: &'static str,
    #[serde(flatten)]
    pub count: EdgeCount,
}

/// Sums the shards' edges into one graph, heaviest edges first.
pub fn merge(shards: impl IntoIterator<Item = Vec<Edge>>) -> Vec<Edge> {
    let mut merged: BTreeMap<(Option<String>, String, bool, &'static str), EdgeCount> =
        BTreeMap::new();
    for edge in shards.into_iter().flatten() {
        let count = merged
            .entry((edge.local, edge.remote, edge.attributed, edge.direction))
            .or_default();
        count.flows += edge.count.flows;
        count.bytes += edge.count.bytes;
    }
    let mut edges: Vec<Edge> = merged
        .into_iter()
        .map(|((local, remote, attributed, direction), count)| Edge {
            local,
            remote,
            attributed,
            direction,
            count,
        })
        .collect();
    edges.sort_by_key(|edge| std::cmp::Reverse(edge.count.flows));
    edges
}

/// Graphviz DOT: one node per workload, one edge per (local, remote, direction), labelled
/// with its flow count. Outbound edges point from the local workload to the remote one.
pub fn to_dot(edges: &[Edge]) -> String {
    let mut dot = String::from("digraph dependencies {\n  rankdir=LR;\n");
    for edge in edges {
        let local = edge.local.as_deref().unwrap_or("unknown");
        let (from, to) = match edge.direction {
            "inbound" => (edge.remote.as_str(), local),
            _ => (local, edge.remote.as_str()),
        };
        let style = if edge.attributed { "" } else { ", style=dashed" };
        dot.push_str(&format!(
            "  {} -> {} [label=\"{}\"{style}];\n",
            dot_id(from),
            dot_id(to),
            edge.count.flows
        ));
    }
    dot.push_str("}\n");
    dot
}

/// A quoted DOT identifier: workload names may hold any character.
fn dot_id(name: &str) -> String {
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        if c != '\n' {
            quoted.push(c);
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_and_render() {
        let mut names = WorkloadInterner::default();
        let api = names.intern("api");
        let db = names.intern("d\"b");
        let mut one = DependencyCounter::default();
        let mut two = DependencyCounter::default();
        one.record(Some(api), RemoteEnd::Workload(db), Direction::Outbound, 10);
        two.record(Some(api), RemoteEnd::Workload(db), Direction::Outbound, 5);
        two.record(None, RemoteEnd::Unattributed(Reason::Conflict), Direction::Inbound, 1);
        let edges = merge([one.snapshot(&names), two.snapshot(&names)]);
        assert_eq!(edges.len(), 2);
        assert_eq!(edges[0].count, EdgeCount { flows: 2, bytes: 15 });
        assert_eq!(edges[1].remote, "unattributed:conflict");
        let dot = to_dot(&edges);
        assert!(dot.contains(r#""api" -> "d\"b" [label="2"];"#), "{dot}");
        assert!(dot.contains(r#""unattributed:conflict" -> "unknown" [label="1", style=dashed];"#), "{dot}");
    }
}
