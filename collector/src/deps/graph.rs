//! The graph as the control plane serves it: edges with names, merged across shards and
//! nodes, as JSON or Graphviz DOT.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use flowattr_common::FlowState;
use serde::{Deserialize, Serialize};

use super::{EdgeCount, SampleFlow};

/// Samples an edge lists, newest first.
pub const SAMPLES_LISTED: usize = 5;

/// A named edge: `client` called `server`. An end is a workload name, `unknown` (a reporting
/// host's side with no workload) or `unattributed:<reason>`; `attributed` is true when both
/// are workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub client: String,
    pub server: String,
    pub attributed: bool,
    #[serde(flatten)]
    pub count: EdgeCount,
    /// Connections counted for the edge, newest first (at most [`SAMPLES_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<NamedSample>,
}

/// One connection of an edge, as the console lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedSample {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub start_ns: u64,
    pub end_ns: u64,
    pub bytes: u64,
    /// `open` or `closed` when the report that counted it was made.
    pub state: String,
}

impl From<&SampleFlow> for NamedSample {
    fn from(flow: &SampleFlow) -> NamedSample {
        let address = |(ip, port): (flowattr_common::CanonicalIp, u16)| {
            SocketAddr::new(ip.to_ip_addr(), port)
        };
        NamedSample {
            client: address(flow.client),
            server: address(flow.server),
            start_ns: flow.start.as_nanos(),
            end_ns: flow.end.as_nanos(),
            bytes: flow.bytes,
            state: match flow.state {
                FlowState::Open => "open",
                FlowState::Closed => "closed",
            }
            .to_owned(),
        }
    }
}

/// Sums the shards' edges into one graph, busiest edges first.
pub fn merge(shards: impl IntoIterator<Item = Vec<Edge>>) -> Vec<Edge> {
    let mut merged: BTreeMap<(String, String, bool), (EdgeCount, Vec<NamedSample>)> =
        BTreeMap::new();
    for edge in shards.into_iter().flatten() {
        let (count, samples) = merged
            .entry((edge.client, edge.server, edge.attributed))
            .or_default();
        count.add(edge.count);
        samples.extend(edge.samples);
    }
    let mut edges: Vec<Edge> = merged
        .into_iter()
        .map(|((client, server, attributed), (count, mut samples))| {
            samples.sort_by_key(|sample| std::cmp::Reverse(sample.end_ns));
            samples.dedup();
            samples.truncate(SAMPLES_LISTED);
            Edge {
                client,
                server,
                attributed,
                count,
                samples,
            }
        })
        .collect();
    edges.sort_by_key(|edge| std::cmp::Reverse(edge.count.connections));
    edges
}

/// Graphviz DOT: one node per workload, one edge client -> server labelled with its
/// connections; edges with an unattributed end are dashed.
pub fn to_dot(edges: &[Edge]) -> String {
    let mut dot = String::from("digraph dependencies {\n  rankdir=LR;\n");
    for edge in edges {
        let style = if edge.attributed {
            ""
        } else {
            ", style=dashed"
        };
        dot.push_str(&format!(
            "  {} -> {} [label=\"{}\"{style}];\n",
            dot_id(&edge.client),
            dot_id(&edge.server),
            edge.count.connections
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
