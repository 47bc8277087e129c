//! What shards say to each other, and what the control plane asks them.

use std::sync::mpsc;

use flowattr_common::wire::AckStatus;
use flowattr_common::{CanonicalIp, Timestamp, WorkloadIdentity};

use super::BeatRecord;
use crate::delay::codec::{BlockHeader, BufferedFlow};
use crate::ownership::Host;

pub use crate::ownership::Dictionary;

/// The flows of one batch that one shard must buffer.
#[derive(Debug)]
pub struct FlowPart {
    pub origin: usize,
    pub ticket: u64,
    pub header: BlockHeader,
    pub workloads: Dictionary,
    pub flows: Vec<BufferedFlow>,
}

#[derive(Debug)]
pub enum DataMessage {
    Heartbeats {
        /// The host that reported them: host-local addresses are its own.
        host: Host,
        workloads: Dictionary,
        beats: Vec<BeatRecord>,
    },
    Flows(FlowPart),
    /// The sender has sent every heartbeat recovered from its segments.
    ReplayDone,
}

#[derive(Debug)]
pub enum ControlMessage {
    /// These tickets' parts are durable on the sender.
    Durable(Vec<(u64, AckStatus)>),
}

/// A control-plane question to a shard.
pub enum ShardQuery {
    Owner(OwnerQuery),
    Deps(DepsQuery),
}

/// The shard's part of the dependency graph over a window.
pub struct DepsQuery {
    pub window: crate::deps::Window,
    pub reply: mpsc::SyncSender<Vec<crate::deps::Edge>>,
}

/// A control-plane question to the shard that owns an IP.
pub struct OwnerQuery {
    pub ip: CanonicalIp,
    pub port: u16,
    pub at: Option<Timestamp>,
    pub reply: mpsc::SyncSender<OwnerAnswer>,
}

#[derive(Debug, serde::Serialize)]
pub struct OwnerAnswer {
    /// The lookup's answer at `at`, when one was asked for: the workload's name, and what the
    /// container platform said of it.
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_platform: Option<PlatformFields>,
    pub unattributed: Option<&'static str>,
    /// Evidence held for the key: segments, oldest first.
    pub segments: Vec<SegmentView>,
    /// Lookups before this instant answer `expired`.
    pub horizon_ns: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct SegmentView {
    pub start_ns: u64,
    pub end_ns: u64,
    /// `held` (by `holder`), `contested` (by two or more) or `unnamed` (by someone its
    /// exporter could not name).
    pub state: &'static str,
    pub holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_platform: Option<PlatformFields>,
    /// Who reported the evidence that last shaped the segment; absent when not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidenceView>,
    /// For a contested segment: every owner with evidence inside it, and who reported it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub claimants: Vec<ClaimantView>,
    /// False when the node kept too many conflicts to keep all of this one's claimants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claimants_complete: Option<bool>,
}

/// One owner that claimed instants of a contested segment.
#[derive(Debug, serde::Serialize)]
pub struct ClaimantView {
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<EvidenceView>,
}

/// Where a segment's latest evidence came from, and when this node last heard from there.
#[derive(Debug, serde::Serialize)]
pub struct EvidenceView {
    /// `exporter` (a batch this node received) or `peer` (a range a peer node broadcast).
    pub kind: &'static str,
    /// The exporter's id: always for `exporter`, for `peer` when the peer said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exporter: Option<String>,
    /// The connection's identity the batch came over (the exporter, or a forwarding collector).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The node the evidence came in through: `this node` (alone), `node N (this node)`, or
    /// the peer that broadcast it, `node N`.
    pub node: String,
    pub last_heard_ns: u64,
}

impl EvidenceView {
    pub fn of(seen: crate::ownership::SourceSeen, this_node: Option<u64>) -> EvidenceView {
        let node_name = |node: u64| {
            if Some(node) == this_node {
                format!("node {node} (this node)")
            } else {
                format!("node {node}")
            }
        };
        let last_heard_ns = seen.last_heard.as_nanos();
        match seen.source {
            crate::ownership::Source::Exporter { exporter, sender } => EvidenceView {
                kind: "exporter",
                exporter: Some(exporter.to_string()),
                sender: Some(sender.to_string()),
                node: this_node.map_or_else(|| "this node".to_owned(), node_name),
                last_heard_ns,
            },
            crate::ownership::Source::Peer { node, exporter } => EvidenceView {
                kind: "peer",
                exporter: exporter.map(|exporter| exporter.to_string()),
                sender: None,
                node: node_name(node),
                last_heard_ns,
            },
        }
    }
}

/// A workload identity's fields besides its name (see [`WorkloadIdentity`]); each absent
/// where the platform gave none.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlatformFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_kind: Option<String>,
}

impl PlatformFields {
    /// None for an identity that is a name alone.
    pub fn of(identity: WorkloadIdentity<'_>) -> Option<PlatformFields> {
        let field = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        (!identity.is_name_only()).then(|| PlatformFields {
            namespace: field(identity.namespace),
            instance: field(identity.instance),
            owner_kind: field(identity.owner_kind),
        })
    }
}
