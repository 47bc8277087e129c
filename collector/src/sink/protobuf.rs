//! Protocol Buffers: the Kafka sink's default format. The schema is docs/schema/flows.proto,
//! compiled by the build script into [`schema`]; a message is a `FlowBatch` of many flows, with
//! no length prefix (ClickHouse reads it as `ProtobufSingle`: docs/schema/clickhouse.sql).

use flowattr_common::{CanonicalIp, Direction, FlowState, RoundTrip};

use super::record::{EmittedBatch, Provenance, ip_bytes};
use crate::ownership::Reason;

/// The messages generated from docs/schema/flows.proto.
pub mod schema {
    include!(concat!(env!("OUT_DIR"), "/flowattr.v1.rs"));
}

/// The field number of `FlowBatch.flows`.
const FLOWS_FIELD: u32 = 1;

/// Encodes `batch` as `FlowBatch` messages of at most `flows_per_message` flows each, into
/// the batch's own buffer (`batch.protobuf`, with each message's end in `protobuf_ends`).
pub fn encode_messages(batch: &mut EmittedBatch, flows_per_message: usize) {
    let mut out = std::mem::take(&mut batch.protobuf);
    let mut ends = std::mem::take(&mut batch.protobuf_ends);
    out.clear();
    ends.clear();
    // One row reused for every flow: its strings and byte vectors keep their capacity, so
    // encoding allocates nothing per flow.
    let mut row = schema::Flow::default();
    for message in batch.flows().chunks(flows_per_message.max(1)) {
        for emitted in message {
            let flow = &emitted.flow;
            row.exporter = emitted.exporter;
            row.sequence = emitted.sequence;
            row.index = flow.index;
            row.start_ns = flow.start.as_nanos();
            row.end_ns = flow.end.as_nanos();
            set_ip(&mut row.local_ip, flow.local_ip);
            row.local_port = u32::from(flow.local_port);
            set_ip(&mut row.remote_ip, flow.remote_ip);
            row.remote_port = u32::from(flow.remote_port);
            row.direction = match flow.direction {
                Direction::Outbound => schema::Direction::Outbound,
                Direction::Inbound => schema::Direction::Inbound,
            } as i32;
            row.state = match flow.state {
                FlowState::Open => schema::State::Open,
                FlowState::Closed => schema::State::Closed,
            } as i32;
            row.bytes_sent = flow.bytes_sent;
            row.bytes_received = flow.bytes_received;
            row.segments_sent = flow.segments_sent;
            row.segments_received = flow.segments_received;
            row.retransmits = flow.retransmits;
            // 0 is "no sample": a measured round trip is at least 1 µs (RoundTrip::from_kernel).
            let trip = flow.round_trip.unwrap_or(RoundTrip {
                smoothed_us: 0,
                deviation_us: 0,
            });
            row.rtt_us = trip.smoothed_us;
            row.rtt_deviation_us = trip.deviation_us;
            row.retries = u32::from(flow.retries);
            let local = batch.local_identity(emitted).unwrap_or_default();
            let remote = batch.remote_identity(emitted);
            let remote_identity = remote.map(|(identity, _)| identity).unwrap_or_default();
            for (field, value) in [
                (&mut row.local_workload, local.name),
                (&mut row.local_namespace, local.namespace),
                (&mut row.local_instance, local.instance),
                (&mut row.local_owner_kind, local.owner_kind),
                (&mut row.remote_workload, remote_identity.name),
                (&mut row.remote_namespace, remote_identity.namespace),
                (&mut row.remote_owner_kind, remote_identity.owner_kind),
            ] {
                set_text(field, Some(value));
            }
            set_text(&mut row.host_name, batch.host_name(emitted));
            set_text(&mut row.region, batch.region());
            match remote {
                Ok((_, provenance)) => {
                    row.unattributed = schema::Unattributed::None as i32;
                    row.provenance = provenance_value(provenance) as i32;
                }
                Err(reason) => {
                    row.unattributed = unattributed_value(reason) as i32;
                    row.provenance = schema::Provenance::None as i32;
                }
            }
            prost::encoding::message::encode(FLOWS_FIELD, &row, &mut out);
        }
        ends.push(out.len());
    }
    batch.protobuf = out;
    batch.protobuf_ends = ends;
}

/// The messages [`encode_messages`] made, in order.
pub fn messages(batch: &EmittedBatch) -> impl Iterator<Item = &[u8]> {
    let starts = std::iter::once(0).chain(batch.protobuf_ends.iter().copied());
    starts
        .zip(batch.protobuf_ends.iter().copied())
        .map(|(start, end)| &batch.protobuf[start..end])
}

fn set_text(field: &mut String, value: Option<&str>) {
    field.clear();
    field.push_str(value.unwrap_or_default());
}

fn set_ip(out: &mut Vec<u8>, ip: CanonicalIp) {
    out.clear();
    out.extend_from_slice(ip_bytes(ip).as_ref());
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
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use flowattr_common::{Timestamp, WorkloadIdentity};
    use prost::Message;

    use super::*;
    use crate::delay::codec::{BlockHeader, BufferedFlow};
    use crate::ownership::WorkloadInterner;

    #[test]
    fn messages_decode_as_flow_batches_with_every_field() {
        let mut names = WorkloadInterner::default();
        let (api, db) = (names.intern("api"), names.intern("db"));
        let header = BlockHeader::of_exporter(9, 4, Timestamp::from_nanos(50));
        let flow = |index: u32| BufferedFlow {
            local_ip: CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 1)),
            remote_ip: if index == 1 {
                CanonicalIp::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))
            } else {
                CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 2))
            },
            local_port: 40_000,
            remote_port: 443,
            local_workload: None,
            local_shared: false,
            start: Timestamp::from_nanos(1_000 + u64::from(index)),
            end: Timestamp::from_nanos(2_000),
            bytes_sent: 10,
            bytes_received: 20,
            segments_sent: 3,
            segments_received: 4,
            retransmits: 1,
            round_trip: (index == 0).then_some(RoundTrip {
                smoothed_us: 250,
                deviation_us: 60,
            }),
            direction: Direction::Outbound,
            state: FlowState::Open,
            index,
            retries: 2,
        };
        let header = BlockHeader {
            host_name: Some("node-1".into()),
            ..header
        };
        let mut batch = EmittedBatch::default();
        let pod = WorkloadIdentity {
            name: "api",
            namespace: "shop",
            instance: "api-1",
            owner_kind: "Deployment",
        };
        let local = batch.add_identity(&pod.key());
        batch.push(
            &header,
            &flow(0),
            Some(local),
            Ok((db, Provenance::Event)),
            &names,
        );
        batch.push(&header, &flow(1), None, Err(Reason::Ambiguous), &names);
        batch.push(
            &header,
            &flow(2),
            Some(local),
            Ok((api, Provenance::Heartbeat)),
            &names,
        );
        batch.set_region(Some(&"eu-1".into()));
        encode_messages(&mut batch, 2);
        let decoded: Vec<schema::FlowBatch> = messages(&batch)
            .map(|message| schema::FlowBatch::decode(message).unwrap())
            .collect();
        assert_eq!(
            decoded
                .iter()
                .map(|message| message.flows.len())
                .collect::<Vec<_>>(),
            [2, 1]
        );
        let rows: Vec<&schema::Flow> = decoded.iter().flat_map(|message| &message.flows).collect();
        let first = rows[0];
        assert_eq!((first.exporter, first.sequence, first.index), (9, 4, 0));
        assert_eq!((first.start_ns, first.end_ns), (1_000, 2_000));
        assert_eq!(first.local_ip, [10, 0, 0, 1]);
        assert_eq!((first.local_port, first.remote_port), (40_000, 443));
        assert_eq!(first.direction(), schema::Direction::Outbound);
        assert_eq!(first.state(), schema::State::Open);
        assert_eq!(
            (
                first.bytes_sent,
                first.bytes_received,
                first.segments_sent,
                first.segments_received
            ),
            (10, 20, 3, 4)
        );
        assert_eq!((first.retransmits, first.retries), (1, 2));
        assert_eq!(
            (
                first.local_workload.as_str(),
                first.remote_workload.as_str()
            ),
            ("api", "db")
        );
        assert_eq!(
            (
                first.local_namespace.as_str(),
                first.local_instance.as_str(),
                first.local_owner_kind.as_str()
            ),
            ("shop", "api-1", "Deployment")
        );
        assert_eq!(
            (first.host_name.as_str(), first.region.as_str()),
            ("node-1", "eu-1")
        );
        assert_eq!(first.unattributed(), schema::Unattributed::None);
        assert_eq!(first.provenance(), schema::Provenance::Event);
        // A reused row must not carry the previous flow's values.
        let second = rows[1];
        assert_eq!(
            second.remote_ip,
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).octets()
        );
        assert_eq!(
            (
                second.local_workload.as_str(),
                second.remote_workload.as_str()
            ),
            ("", "")
        );
        assert_eq!(
            (
                second.local_namespace.as_str(),
                second.local_instance.as_str()
            ),
            ("", "")
        );
        assert_eq!(second.unattributed(), schema::Unattributed::Ambiguous);
        assert_eq!(second.provenance(), schema::Provenance::None);
        assert_eq!(rows[2].provenance(), schema::Provenance::Heartbeat);
        assert_eq!(rows[2].remote_ip, [10, 0, 0, 2]);
    }
}
