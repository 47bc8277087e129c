//! JSON lines: one object per flow, the format of the stdout and file sinks and the Kafka
//! sink's `format = "json"` (docs/operations.md lists the fields).

use std::net::IpAddr;

use serde::Serialize;

use super::record::{EmittedBatch, EmittedFlow, Provenance, direction_name, state_name};

/// One attributed flow as a JSON object: the flow, both workloads (or why the remote has
/// none), and where the answer came from.
#[derive(Debug, Serialize)]
pub struct AttributedFlow<'a> {
    pub exporter: u64,
    pub sequence: u64,
    pub index: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub direction: &'static str,
    pub state: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u32,
    pub segments_received: u32,
    pub retransmits: u32,
    /// The smoothed round trip and its mean deviation, in µs; `null` without a sample.
    pub rtt_us: Option<u32>,
    pub rtt_deviation_us: Option<u32>,
    pub local_workload: Option<&'a str>,
    /// The platform's fields of the local workload (namespace, pod or container, owner kind);
    /// each absent where not known. The remote side has no instance: the collector keeps who
    /// owned an address by workload, not by replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_instance: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_owner_kind: Option<&'a str>,
    pub remote_workload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_owner_kind: Option<&'a str>,
    /// Set exactly when `remote_workload` is not.
    pub unattributed: Option<&'static str>,
    pub provenance: Option<Provenance>,
    /// Attribution attempts that found no evidence before this answer.
    pub retries: u8,
    /// The host whose exporter reported the flow.
    pub host_name: Option<&'a str>,
    /// The region of the node that attributed it.
    pub region: Option<&'a str>,
}

impl<'a> AttributedFlow<'a> {
    pub fn new(batch: &'a EmittedBatch, emitted: &EmittedFlow) -> Self {
        let flow = &emitted.flow;
        // Each side's identity looked up once; a missing field is left out of the line.
        let local = batch.local_identity(emitted);
        let remote = batch.remote_identity(emitted);
        let local_fields = local.unwrap_or_default();
        let remote_fields = remote.map(|(identity, _)| identity).unwrap_or_default();
        let field = |value: &'a str| (!value.is_empty()).then_some(value);
        AttributedFlow {
            exporter: emitted.exporter,
            sequence: emitted.sequence,
            index: flow.index,
            start_ns: flow.start.as_nanos(),
            end_ns: flow.end.as_nanos(),
            local_ip: flow.local_ip.to_ip_addr(),
            local_port: flow.local_port,
            remote_ip: flow.remote_ip.to_ip_addr(),
            remote_port: flow.remote_port,
            direction: direction_name(flow.direction),
            state: state_name(flow.state),
            bytes_sent: flow.bytes_sent,
            bytes_received: flow.bytes_received,
            segments_sent: flow.segments_sent,
            segments_received: flow.segments_received,
            retransmits: flow.retransmits,
            rtt_us: flow.round_trip.map(|trip| trip.smoothed_us),
            rtt_deviation_us: flow.round_trip.map(|trip| trip.deviation_us),
            local_workload: local.map(|identity| identity.name),
            local_namespace: field(local_fields.namespace),
            local_instance: field(local_fields.instance),
            local_owner_kind: field(local_fields.owner_kind),
            remote_workload: remote.ok().map(|(identity, _)| identity.name),
            remote_namespace: field(remote_fields.namespace),
            remote_owner_kind: field(remote_fields.owner_kind),
            unattributed: remote.err().map(|reason| reason.as_str()),
            provenance: remote.ok().map(|(_, provenance)| provenance),
            retries: flow.retries,
            host_name: batch.host_name(emitted),
            region: batch.region(),
        }
    }
}

/// Fills `batch.json` with one line per flow, unless a sink already did for this batch.
pub fn encode_once(batch: &mut EmittedBatch) {
    if !batch.json.is_empty() || batch.is_empty() {
        return;
    }
    let mut out = std::mem::take(&mut batch.json);
    for emitted in batch.flows() {
        serde_json::to_writer(&mut out, &AttributedFlow::new(batch, emitted))
            .expect("writing JSON to a Vec cannot fail");
        out.push(b'\n');
    }
    batch.json = out;
}
