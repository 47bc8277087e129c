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

mod graph;
mod minutes;

use std::time::Duration;

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp, WorkloadId};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::ownership::{Reason, WorkloadInterner};

pub use graph::{Edge, NamedSample, merge, to_dot};
use minutes::EdgeMinutes;
pub use minutes::{RETAINED_MINUTES, SampleFlow, Window};

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EdgeCount {
    /// Connections, each once, whichever end and however many reports.
    pub connections: u64,
    /// Reports of them by the end that speaks (an open connection is reported every interval).
    pub flows: u64,
    /// Sent plus received, as the speaking end counted them.
    pub bytes: u64,
}

impl EdgeCount {
    pub(crate) fn add(&mut self, other: EdgeCount) {
        self.connections += other.connections;
        self.flows += other.flows;
        self.bytes += other.bytes;
    }
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
    edges: EdgeMinutes,
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
        let entry = self.edges.entry((client, server), report.end);
        entry.count.connections += u64::from(new);
        entry.count.flows += 1;
        entry.count.bytes += bytes;
        if new {
            entry.sample(SampleFlow::of(report));
        }
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

    /// The counters of `window` with names, for the control plane.
    pub fn snapshot(&self, names: &WorkloadInterner, window: Window) -> Vec<Edge> {
        let name = |end: End| match end {
            End::Workload(id) => names
                .identity(id)
                .map_or("?", |identity| identity.name)
                .to_owned(),
            End::Unknown => "unknown".to_owned(),
            End::Unattributed(reason) => format!("unattributed:{}", reason.as_str()),
        };
        self.edges
            .sum(window)
            .into_iter()
            .map(|((client, server), (count, samples))| Edge {
                client: name(client),
                server: name(server),
                attributed: matches!(client, End::Workload(_))
                    && matches!(server, End::Workload(_)),
                count,
                samples: samples.iter().map(NamedSample::from).collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
