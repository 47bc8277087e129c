//! Protocol Buffers: the Kafka sink's default format. The schema is docs/schema/flows.proto,
//! compiled by the build script into [`schema`]; a message is a `FlowBatch` of many flows, with
//! no length prefix (ClickHouse reads it as `ProtobufSingle`: docs/schema/clickhouse.sql), or
//! with `protobuf-columns` a `FlowColumns` ([`columns`]).

use flowattr_common::{Direction, FlowState};

use super::record::{EmittedBatch, EmittedFlow, Provenance, RemoteName, ip_bytes};
use crate::ownership::Reason;

/// The messages generated from docs/schema/flows.proto.
pub mod schema {
    include!(concat!(env!("OUT_DIR"), "/flowattr.v1.rs"));
}

pub mod columns;
mod limits;
mod wire;

pub use limits::{LIBRDKAFKA_MESSAGE_MAX_BYTES, MessageLimits};
use wire::{Key, Output};

/// `FlowBatch.flows`, and the fields of a `Flow` by their numbers in the schema.
mod field {
    use super::Key;

    pub const FLOWS: Key = Key::length_delimited(1);
    pub const EXPORTER: Key = Key::varint(1);
    pub const SEQUENCE: Key = Key::varint(2);
    pub const INDEX: Key = Key::varint(3);
    pub const START_NS: Key = Key::varint(4);
    pub const END_NS: Key = Key::varint(5);
    pub const LOCAL_IP: Key = Key::length_delimited(6);
    pub const LOCAL_PORT: Key = Key::varint(7);
    pub const REMOTE_IP: Key = Key::length_delimited(8);
    pub const REMOTE_PORT: Key = Key::varint(9);
    pub const DIRECTION: Key = Key::varint(10);
    pub const STATE: Key = Key::varint(11);
    pub const BYTES_SENT: Key = Key::varint(12);
    pub const BYTES_RECEIVED: Key = Key::varint(13);
    pub const SEGMENTS_SENT: Key = Key::varint(14);
    pub const SEGMENTS_RECEIVED: Key = Key::varint(15);
    pub const RETRANSMITS: Key = Key::varint(16);
    pub const LOCAL_WORKLOAD: Key = Key::length_delimited(17);
    pub const REMOTE_WORKLOAD: Key = Key::length_delimited(18);
    pub const UNATTRIBUTED: Key = Key::varint(19);
    pub const PROVENANCE: Key = Key::varint(20);
    pub const RETRIES: Key = Key::varint(21);
    pub const LOCAL_NAMESPACE: Key = Key::length_delimited(22);
    pub const LOCAL_INSTANCE: Key = Key::length_delimited(23);
    pub const LOCAL_OWNER_KIND: Key = Key::length_delimited(24);
    pub const REMOTE_NAMESPACE: Key = Key::length_delimited(25);
    pub const REMOTE_OWNER_KIND: Key = Key::length_delimited(26);
    pub const HOST_NAME: Key = Key::length_delimited(27);
    pub const REGION: Key = Key::length_delimited(28);
    pub const RTT_US: Key = Key::varint(29);
    pub const RTT_DEVIATION_US: Key = Key::varint(30);
}

/// The name fields of a batch's identities, host names and region, encoded once per batch and
/// copied whole into each flow that names them: most of a flow's bytes, written without
/// looking at a string again. Fields may come in any order in a message (readers take them as
/// they come), so each side's names sit together, and the host's name sits with the region:
/// each copy is a call to libc's `memmove`, whose cost per call outweighs its bytes here.
#[derive(Debug, Default)]
pub(super) struct EncodedNames {
    bytes: Output,
    /// Per identity of the batch: its fields as the local side, then as the remote side
    /// (which has no instance: the map keeps workloads, not replicas).
    local: Vec<(u32, u32)>,
    remote: Vec<(u32, u32)>,
    /// Per host name of the batch: it and the region.
    host_and_region: Vec<(u32, u32)>,
    /// The region alone, for flows with no host name.
    region: (u32, u32),
}

impl EncodedNames {
    fn encode(&mut self, batch: &EmittedBatch) {
        self.bytes.clear();
        self.local.clear();
        self.remote.clear();
        self.host_and_region.clear();
        for index in 0..batch.identity_count() {
            let identity = batch.identity(index);
            let local = self.span(&[
                (field::LOCAL_WORKLOAD, identity.name),
                (field::LOCAL_NAMESPACE, identity.namespace),
                (field::LOCAL_INSTANCE, identity.instance),
                (field::LOCAL_OWNER_KIND, identity.owner_kind),
            ]);
            let remote = self.span(&[
                (field::REMOTE_WORKLOAD, identity.name),
                (field::REMOTE_NAMESPACE, identity.namespace),
                (field::REMOTE_OWNER_KIND, identity.owner_kind),
            ]);
            self.local.push(local);
            self.remote.push(remote);
        }
        let region = batch.region().unwrap_or_default();
        for host in batch.host_names() {
            let host = self.span(&[(field::HOST_NAME, host), (field::REGION, region)]);
            self.host_and_region.push(host);
        }
        self.region = self.span(&[(field::REGION, region)]);
    }

    /// Writes string fields; returns where they lie.
    fn span(&mut self, fields: &[(Key, &str)]) -> (u32, u32) {
        let start = self.bytes.len();
        for &(key, value) in fields {
            self.bytes.reserve(Output::FIELD_MAX + value.len());
            self.bytes.put_bytes(key, value.as_bytes());
        }
        let end = u32::try_from(self.bytes.len()).expect("a batch's names fit in 4 GiB");
        (start as u32, end)
    }

    fn get(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.bytes.written()[start as usize..end as usize]
    }
}

/// Encodes `batch` as `FlowBatch` messages within `limits`, into the batch's own buffer
/// (`batch.protobuf`, with each message's end in `protobuf_ends`). Written straight from the
/// batch, as prost would write it, with no row in between: a flow's names are copied from
/// [`EncodedNames`] and its numbers written where they lie.
pub fn encode_messages(batch: &mut EmittedBatch, limits: MessageLimits) {
    let mut out = Output::reuse(std::mem::take(&mut batch.protobuf));
    let mut ends = std::mem::take(&mut batch.protobuf_ends);
    let mut names = std::mem::take(&mut batch.protobuf_names);
    ends.clear();
    names.encode(batch);
    let mut encode = |out: &mut Output, flows: &[EmittedFlow]| {
        for emitted in flows {
            encode_flow(out, emitted, &names);
        }
    };
    limits::write_messages(&mut out, &mut ends, batch.flows(), limits, &mut encode);
    batch.protobuf = out.into_buffer();
    batch.protobuf_ends = ends;
    batch.protobuf_names = names;
}

/// The most bytes a flow's own fields (its numbers and addresses, not its names) take, and
/// the message's key and length, with the slack [`Output`] writes with.
const FLOW_FIXED_MAX: usize = 24 * Output::FIELD_MAX + 2 * 16;

/// Always inlined into the flow loop (which [`limits::write_messages`] keeps inlined): as a
/// call per flow, it stores and reloads the output's length around every flow.
#[inline(always)]
fn encode_flow(out: &mut Output, emitted: &EmittedFlow, names: &EncodedNames) {
    let flow = &emitted.flow;
    let local = flow
        .local_workload
        .map_or(&[][..], |local| names.get(names.local[local as usize]));
    let remote = match emitted.remote {
        RemoteName::Workload { name, .. } => names.get(names.remote[name as usize]),
        RemoteName::Unattributed(_) => &[],
    };
    let host_and_region = names.get(
        emitted
            .host_name
            .map_or(names.region, |host| names.host_and_region[host as usize]),
    );
    out.reserve(FLOW_FIXED_MAX + local.len() + remote.len() + host_and_region.len());
    let message = out.start_message(field::FLOWS);
    out.put_uint(field::EXPORTER, emitted.exporter);
    out.put_uint(field::SEQUENCE, emitted.sequence);
    out.put_uint(field::INDEX, u64::from(flow.index));
    out.put_uint(field::START_NS, flow.start.as_nanos());
    out.put_uint(field::END_NS, flow.end.as_nanos());
    out.put_address(field::LOCAL_IP, &ip_bytes(flow.local_ip));
    out.put_uint(field::LOCAL_PORT, u64::from(flow.local_port));
    out.put_address(field::REMOTE_IP, &ip_bytes(flow.remote_ip));
    out.put_uint(field::REMOTE_PORT, u64::from(flow.remote_port));
    out.put_uint(field::DIRECTION, direction_value(flow.direction) as u64);
    out.put_uint(field::STATE, state_value(flow.state) as u64);
    out.put_uint(field::BYTES_SENT, flow.bytes_sent);
    out.put_uint(field::BYTES_RECEIVED, flow.bytes_received);
    out.put_uint(field::SEGMENTS_SENT, u64::from(flow.segments_sent));
    out.put_uint(field::SEGMENTS_RECEIVED, u64::from(flow.segments_received));
    out.put_uint(field::RETRANSMITS, u64::from(flow.retransmits));
    out.put_raw(local);
    out.put_raw(remote);
    match emitted.remote {
        RemoteName::Workload { provenance, .. } => {
            out.put_uint(field::PROVENANCE, provenance_value(provenance) as u64);
        }
        RemoteName::Unattributed(reason) => {
            out.put_uint(field::UNATTRIBUTED, unattributed_value(reason) as u64);
        }
    }
    out.put_uint(field::RETRIES, u64::from(flow.retries));
    out.put_raw(host_and_region);
    // No sample writes nothing, which reads as 0: a measured round trip is at least 1 µs
    // (RoundTrip::from_kernel).
    if let Some(trip) = flow.round_trip {
        out.put_uint(field::RTT_US, u64::from(trip.smoothed_us));
        out.put_uint(field::RTT_DEVIATION_US, u64::from(trip.deviation_us));
    }
    out.finish_message(message);
}

/// The messages [`encode_messages`] made, in order.
pub fn messages(batch: &EmittedBatch) -> impl Iterator<Item = &[u8]> {
    let starts = std::iter::once(0).chain(batch.protobuf_ends.iter().copied());
    starts
        .zip(batch.protobuf_ends.iter().copied())
        .map(|(start, end)| &batch.protobuf[start..end])
}

fn direction_value(direction: Direction) -> schema::Direction {
    match direction {
        Direction::Outbound => schema::Direction::Outbound,
        Direction::Inbound => schema::Direction::Inbound,
    }
}

fn state_value(state: FlowState) -> schema::State {
    match state {
        FlowState::Open => schema::State::Open,
        FlowState::Closed => schema::State::Closed,
    }
}

fn provenance_value(provenance: Provenance) -> schema::Provenance {
    match provenance {
        Provenance::Heartbeat => schema::Provenance::Heartbeat,
        Provenance::Event => schema::Provenance::Event,
        Provenance::Forwarded => schema::Provenance::Forwarded,
    }
}

fn unattributed_value(reason: Reason) -> schema::Unattributed {
    match reason {
        Reason::NoEvidence => schema::Unattributed::NoEvidence,
        Reason::Conflict => schema::Unattributed::Conflict,
        Reason::Ambiguous => schema::Unattributed::Ambiguous,
        Reason::Expired => schema::Unattributed::Expired,
        Reason::HostLocal => schema::Unattributed::HostLocal,
        Reason::Incomplete => schema::Unattributed::Incomplete,
        Reason::Unanswered => schema::Unattributed::Unanswered,
        Reason::Unnamed => schema::Unattributed::Unnamed,
    }
}

#[cfg(test)]
mod tests;
