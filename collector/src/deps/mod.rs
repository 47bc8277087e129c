//! The live service dependency graph: one edge per (client -> server), counting connections
//! and their bytes. Each shard counts the flows it emits with interned ids (no allocation per
//! flow); the control plane merges the shards' named snapshots and renders JSON or Graphviz
//! DOT.
//!
//! A connection reaches the collector as several reports, and counting reports would count a
//! day-long connection ~1,440 times. Two rules make each connection count once:
//!
//! - **One end speaks for it.** Both ends' exporters report a connection between two
//!   monitored hosts. The client's report speaks for it when the client is named; the
//!   server's report speaks only when its remote side (the client) has no evidence at all,
//!   i.e. no exporter reported the client's IP, so no client report of it exists either.
//!   Bytes are the speaking end's.
//! - **A long connection is one connection.** An exporter reports an open connection at every
//!   interval (`state: open`) and once more when it closes, always with the same 4-tuple and
//!   start. The first report counts the connection; later reports of the same 4-tuple and
//!   start (within [`SAME_START`]) add only bytes not counted yet. One end's reports all name
//!   the same remote IP, so they all reach the same shard, and this table needs no message
//!   between shards. Only connections seen open are remembered, so its size follows the
//!   long-lived connections, not the flow rate.

use std::collections::BTreeMap;
use std::time::Duration;

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp, WorkloadId};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::ownership::{Reason, WorkloadInterner};

/// The remote end of a report, as attribution found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemoteEnd {
    Workload(WorkloadId),
    Unattributed(Reason),
}

/// One end of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    Workload(WorkloadId),
    /// The reporting host's own side, with no workload registered and no host identity.
    Unknown,
    Unattributed(Reason),
}

impl From<RemoteEnd> for End {
    fn from(remote: RemoteEnd) -> End {
        match remote {
            RemoteEnd::Workload(id) => End::Workload(id),
            RemoteEnd::Unattributed(reason) => End::Unattributed(reason),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EdgeCount {
    /// Connections, each once, whichever end and however many reports.
    pub connections: u64,
    /// Reports of them by the end that speaks (an open connection is reported every interval).
    pub flows: u64,
    /// Sent plus received, as the speaking end counted them.
    pub bytes: u64,
}

/// One report of a connection by one of its ends, after attribution.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionReport {
    pub local_ip: CanonicalIp,
    pub local_port: u16,
    pub remote_ip: CanonicalIp,
    pub remote_port: u16,
    pub start: Timestamp,
    pub end: Timestamp,
    pub state: FlowState,
    pub direction: Direction,
    /// Sent plus received, as this report counts them.
    pub bytes: u64,
    pub local: Option<WorkloadId>,
    pub remote: RemoteEnd,
}

/// Reports of one connection by one end carry the same start, up to the exporter's clock
/// offset being measured again between them (microseconds to milliseconds).
pub const SAME_START: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FourTuple {
    local_ip: CanonicalIp,
    remote_ip: CanonicalIp,
    local_port: u16,
    remote_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct OpenConnection {
    start: Timestamp,
    /// Bytes counted for it so far.
    bytes: u64,
    /// The end of its latest report.
    seen: Timestamp,
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct DependencyCounter {
    edges: FxHashMap<(End, End), EdgeCount>,
    open: FxHashMap<FourTuple, OpenConnection>,
}

impl DependencyCounter {
    pub fn record(&mut self, report: &ConnectionReport) {
        let local = report.local.map_or(End::Unknown, End::Workload);
        let remote = End::from(report.remote);
        let (client, server) = match report.direction {
            Direction::Outbound => (local, remote),
            Direction::Inbound => (remote, local),
        };
        let speaks = match report.direction {
            Direction::Outbound => local != End::Unknown || matches!(remote, End::Unattributed(_)),
            // The client's own report speaks unless it has none (no exporter) or names no
            // local side (its exporter could not name it: its evidence is unnamed).
            Direction::Inbound => matches!(
                remote,
                End::Unattributed(Reason::NoEvidence | Reason::Unnamed)
            ),
        };
        if !speaks {
            return;
        }
        let (new, bytes) = self.account(report);
        let count = self.edges.entry((client, server)).or_default();
        count.connections += u64::from(new);
        count.flows += 1;
        count.bytes += bytes;
    }

    /// Whether the report is the first of its connection, and the bytes it adds. One hash
    /// probe per report, and none while no connection is open (short connections, the bulk
    /// of the flows, are closed at their first report).
    fn account(&mut self, report: &ConnectionReport) -> (bool, u64) {
        use std::collections::hash_map::Entry;
        if report.state == FlowState::Closed && self.open.is_empty() {
            return (true, report.bytes);
        }
        let key = FourTuple {
            local_ip: report.local_ip,
            remote_ip: report.remote_ip,
            local_port: report.local_port,
            remote_port: report.remote_port,
        };
        let same = |known: &OpenConnection| {
            known
                .start
                .nanos_since(report.start)
                .max(report.start.nanos_since(known.start))
                <= SAME_START.as_nanos() as u64
        };
        let fresh = OpenConnection {
            start: report.start,
            bytes: report.bytes,
            seen: report.end,
        };
        match (self.open.entry(key), report.state) {
            (Entry::Occupied(mut entry), state) if same(entry.get()) => {
                let known = *entry.get();
                let added = report.bytes.saturating_sub(known.bytes);
                if state == FlowState::Closed {
                    entry.remove();
                } else {
                    *entry.get_mut() = OpenConnection {
                        bytes: known.bytes + added,
                        seen: report.end,
                        ..known
                    };
                }
                (false, added)
            }
            // New, or another connection on a reused 4-tuple, which this one replaces.
            (entry, FlowState::Open) => {
                entry.insert_entry(fresh);
                (true, report.bytes)
            }
            (_, FlowState::Closed) => (true, report.bytes),
        }
    }

    /// Forgets open connections with no report since `horizon`: their close report was lost
    /// with its batch, or their exporter is gone.
    pub fn forget_idle(&mut self, horizon: Timestamp) {
        self.open.retain(|_, connection| connection.seen >= horizon);
    }

    /// Open connections remembered.
    pub fn open_connections(&self) -> usize {
        self.open.len()
    }

    /// The counters with names, for the control plane.
    pub fn snapshot(&self, names: &WorkloadInterner) -> Vec<Edge> {
        let name = |end: End| match end {
            End::Workload(id) => names
                .identity(id)
                .map_or("?", |identity| identity.name)
                .to_owned(),
            End::Unknown => "unknown".to_owned(),
            End::Unattributed(reason) => format!("unattributed:{}", reason.as_str()),
        };
        self.edges
            .iter()
            .map(|(&(client, server), &count)| Edge {
                client: name(client),
                server: name(server),
                attributed: matches!(client, End::Workload(_))
                    && matches!(server, End::Workload(_)),
                count,
            })
            .collect()
    }
}

/// A named edge: `client` called `server`. An end is a workload name, `unknown` (a reporting
/// host's side with no workload) or `unattributed:<reason>`; `attributed` is true when both
/// are workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub client: String,
    pub server: String,
    pub attributed: bool,
    #[serde(flatten)]
    pub count: EdgeCount,
}

/// Sums the shards' edges into one graph, busiest edges first.
pub fn merge(shards: impl IntoIterator<Item = Vec<Edge>>) -> Vec<Edge> {
    let mut merged: BTreeMap<(String, String, bool), EdgeCount> = BTreeMap::new();
    for edge in shards.into_iter().flatten() {
        let count = merged
            .entry((edge.client, edge.server, edge.attributed))
            .or_default();
        count.connections += edge.count.connections;
        count.flows += edge.count.flows;
        count.bytes += edge.count.bytes;
    }
    let mut edges: Vec<Edge> = merged
        .into_iter()
        .map(|((client, server, attributed), count)| Edge {
            client,
            server,
            attributed,
            count,
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(last: u8) -> CanonicalIp {
        CanonicalIp::from(Ipv4Addr::new(10, 0, 0, last))
    }

    /// The report of a connection client 10.0.0.1:40000 -> server 10.0.0.2:443 by one end.
    fn report(
        direction: Direction,
        state: FlowState,
        start_s: u64,
        end_s: u64,
        bytes: u64,
    ) -> ConnectionReport {
        let (client, server) = ((ip(1), 40_000), (ip(2), 443));
        let ((local_ip, local_port), (remote_ip, remote_port)) = match direction {
            Direction::Outbound => (client, server),
            Direction::Inbound => (server, client),
        };
        ConnectionReport {
            local_ip,
            local_port,
            remote_ip,
            remote_port,
            start: Timestamp::from_nanos(start_s * 1_000_000_000),
            end: Timestamp::from_nanos(end_s * 1_000_000_000),
            state,
            direction,
            bytes,
            local: None,
            remote: RemoteEnd::Unattributed(Reason::NoEvidence),
        }
    }

    #[test]
    fn a_long_connection_reported_by_both_ends_is_one_edge_counted_once() {
        let mut names = WorkloadInterner::default();
        let (api, db) = (names.intern("api"), names.intern("db"));
        let mut client_shard = DependencyCounter::default();
        let mut server_shard = DependencyCounter::default();
        let both = |mut report: ConnectionReport| {
            let (local, remote) = match report.direction {
                Direction::Outbound => (api, db),
                Direction::Inbound => (db, api),
            };
            report.local = Some(local);
            report.remote = RemoteEnd::Workload(remote);
            report
        };
        // Open reports every minute for a day, then the close with all the bytes, from each
        // end.
        for minute in 1..=1440 {
            client_shard.record(&both(report(
                Direction::Outbound,
                FlowState::Open,
                100,
                100 + minute * 60,
                0,
            )));
            server_shard.record(&both(report(
                Direction::Inbound,
                FlowState::Open,
                100,
                100 + minute * 60,
                0,
            )));
        }
        assert_eq!(client_shard.open_connections(), 1);
        client_shard.record(&both(report(
            Direction::Outbound,
            FlowState::Closed,
            100,
            90_000,
            5_000,
        )));
        server_shard.record(&both(report(
            Direction::Inbound,
            FlowState::Closed,
            100,
            90_000,
            5_000,
        )));
        assert_eq!(client_shard.open_connections(), 0);
        let edges = merge([client_shard.snapshot(&names), server_shard.snapshot(&names)]);
        assert_eq!(
            edges,
            vec![Edge {
                client: "api".into(),
                server: "db".into(),
                attributed: true,
                count: EdgeCount {
                    connections: 1,
                    flows: 1441,
                    bytes: 5_000
                }
            }]
        );
        assert!(to_dot(&edges).contains(r#""api" -> "db" [label="1"];"#));
    }

    #[test]
    fn the_server_speaks_only_for_clients_no_exporter_reported() {
        let mut names = WorkloadInterner::default();
        let web = names.intern("w\"eb");
        let mut counter = DependencyCounter::default();
        // A client with no agent (a load balancer): only the server reports the connection.
        let mut inbound = report(Direction::Inbound, FlowState::Closed, 10, 11, 700);
        inbound.local = Some(web);
        counter.record(&inbound);
        // A client whose evidence conflicts has an exporter: its own report speaks.
        inbound.remote = RemoteEnd::Unattributed(Reason::Conflict);
        counter.record(&inbound);
        // An unnamed client host calling a named server: the server's report speaks for it,
        // the client's own report does not.
        let mut outbound = report(Direction::Outbound, FlowState::Closed, 20, 21, 50);
        outbound.remote = RemoteEnd::Workload(web);
        counter.record(&outbound);
        // The same connection as the server reported it: the client's evidence is unnamed.
        let mut unnamed_client = report(Direction::Inbound, FlowState::Closed, 20, 21, 50);
        unnamed_client.local = Some(web);
        unnamed_client.remote = RemoteEnd::Unattributed(Reason::Unnamed);
        counter.record(&unnamed_client);
        let mut edges = merge([counter.snapshot(&names)]);
        assert_eq!(edges.len(), 2, "{edges:?}");
        let unnamed = edges
            .iter()
            .position(|edge| edge.client == "unattributed:unnamed")
            .expect("the unnamed client's edge");
        assert_eq!(
            (
                edges[unnamed].server.as_str(),
                edges[unnamed].count.connections
            ),
            ("w\"eb", 1)
        );
        edges.remove(unnamed);
        assert_eq!(edges[0].client, "unattributed:no_evidence");
        assert_eq!(edges[0].server, "w\"eb");
        assert_eq!(
            edges[0].count,
            EdgeCount {
                connections: 1,
                flows: 1,
                bytes: 700
            }
        );
        assert!(
            to_dot(&edges)
                .contains(r#""unattributed:no_evidence" -> "w\"eb" [label="1", style=dashed];"#)
        );
    }

    #[test]
    fn a_reused_four_tuple_is_a_new_connection_and_idle_ones_are_forgotten() {
        let names = WorkloadInterner::default();
        let mut counter = DependencyCounter::default();
        counter.record(&report(Direction::Outbound, FlowState::Open, 100, 160, 0));
        // The same 4-tuple starting minutes later is another connection (its close was lost).
        counter.record(&report(Direction::Outbound, FlowState::Open, 400, 460, 0));
        counter.record(&report(
            Direction::Outbound,
            FlowState::Closed,
            400,
            500,
            10,
        ));
        assert_eq!(merge([counter.snapshot(&names)])[0].count.connections, 2);
        counter.record(&report(Direction::Outbound, FlowState::Open, 600, 660, 0));
        counter.forget_idle(Timestamp::from_nanos(661_000_000_000));
        assert_eq!(counter.open_connections(), 0);
    }
}
