//! The hand-written encoder against prost: every message decodes as the `FlowBatch` the
//! schema's generated code would have made of the batch.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use flowattr_common::{CanonicalIp, RoundTrip, Timestamp, WorkloadIdentity};
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::delay::codec::{BlockHeader, BufferedFlow};
use crate::ownership::WorkloadInterner;
use crate::sink::record::EmittedFlow;

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
    encode_messages(&mut batch, MessageLimits::new(2, 1_000_000));
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

/// What the schema's generated code makes of a flow: the reference the hand-written encoder
/// is held to.
fn expected_row(batch: &EmittedBatch, emitted: &EmittedFlow) -> schema::Flow {
    let flow = &emitted.flow;
    let local = batch.local_identity(emitted).unwrap_or_default();
    let remote = batch.remote_identity(emitted);
    let remote_identity = remote.map(|(identity, _)| identity).unwrap_or_default();
    let trip = flow.round_trip.unwrap_or(RoundTrip {
        smoothed_us: 0,
        deviation_us: 0,
    });
    let mut row = schema::Flow {
        exporter: emitted.exporter,
        sequence: emitted.sequence,
        index: flow.index,
        start_ns: flow.start.as_nanos(),
        end_ns: flow.end.as_nanos(),
        local_ip: ip_bytes(flow.local_ip).as_ref().to_vec(),
        local_port: u32::from(flow.local_port),
        remote_ip: ip_bytes(flow.remote_ip).as_ref().to_vec(),
        remote_port: u32::from(flow.remote_port),
        bytes_sent: flow.bytes_sent,
        bytes_received: flow.bytes_received,
        segments_sent: flow.segments_sent,
        segments_received: flow.segments_received,
        retransmits: flow.retransmits,
        local_workload: local.name.into(),
        remote_workload: remote_identity.name.into(),
        retries: u32::from(flow.retries),
        local_namespace: local.namespace.into(),
        local_instance: local.instance.into(),
        local_owner_kind: local.owner_kind.into(),
        remote_namespace: remote_identity.namespace.into(),
        remote_owner_kind: remote_identity.owner_kind.into(),
        host_name: batch.host_name(emitted).unwrap_or_default().into(),
        region: batch.region().unwrap_or_default().into(),
        rtt_us: trip.smoothed_us,
        rtt_deviation_us: trip.deviation_us,
        ..Default::default()
    };
    row.set_direction(match flow.direction {
        Direction::Outbound => schema::Direction::Outbound,
        Direction::Inbound => schema::Direction::Inbound,
    });
    row.set_state(match flow.state {
        FlowState::Open => schema::State::Open,
        FlowState::Closed => schema::State::Closed,
    });
    match remote {
        Ok((_, provenance)) => row.set_provenance(provenance_value(provenance)),
        Err(reason) => row.set_unattributed(unattributed_value(reason)),
    }
    row
}

pub(super) fn expected_rows(batch: &EmittedBatch) -> Vec<schema::Flow> {
    batch
        .flows()
        .iter()
        .map(|emitted| expected_row(batch, emitted))
        .collect()
}

pub(super) fn arbitrary_identity() -> impl Strategy<Value = String> {
    // Names long enough that a flow's message takes a 3-byte length now and then.
    let text = prop_oneof![
        "[a-z][a-z0-9-]{0,20}",
        Just(String::new()),
        Just("x".repeat(6_000)),
    ];
    ("[a-z][a-z0-9./-]{0,30}", text.clone(), text.clone(), text).prop_map(
        |(name, namespace, instance, owner_kind)| {
            WorkloadIdentity {
                name: &name,
                namespace: &namespace,
                instance: &instance,
                owner_kind: &owner_kind,
            }
            .key()
        },
    )
}

/// One generated flow: the flow, its local identity, its remote answer (an identity and a
/// provenance, or a reason), its host name and its (exporter, sequence).
pub(super) type ArbitraryFlow = (
    BufferedFlow,
    Option<usize>,
    Result<(usize, u8), u8>,
    Option<u8>,
    (u64, u64),
);

/// Limits of a few flows, and bytes that a message of them fits or not.
pub(super) fn arbitrary_limits() -> impl Strategy<Value = MessageLimits> {
    (1usize..8, prop_oneof![Just(usize::MAX), 100usize..3000])
        .prop_map(|(flows, bytes)| MessageLimits { flows, bytes })
}

pub(super) fn arbitrary_flows() -> impl Strategy<Value = Vec<ArbitraryFlow>> {
    proptest::collection::vec(
        (
            crate::delay::codec::tests::arbitrary_flow(),
            proptest::option::of(0usize..6),
            prop_oneof![(0usize..6, 0u8..4).prop_map(Ok), (0u8..8).prop_map(Err)],
            proptest::option::of(0u8..3),
            any::<(u64, u64)>(),
        ),
        0..40,
    )
}

/// The batch of `flows`, naming `identities`, from a node of `region`.
pub(super) fn batch_of(
    identities: &[String],
    flows: &[ArbitraryFlow],
    region: Option<String>,
) -> EmittedBatch {
    let mut names = WorkloadInterner::default();
    let owners: Vec<_> = identities.iter().map(|key| names.intern(key)).collect();
    let mut batch = EmittedBatch::default();
    let locals: Vec<u32> = identities
        .iter()
        .map(|key| batch.add_identity(key))
        .collect();
    let hosts: Vec<Arc<str>> = ["node-a", "", "ip-10-1-2-3.ec2.internal"]
        .map(Arc::from)
        .into();
    let provenances = [
        Provenance::Heartbeat,
        Provenance::Event,
        Provenance::Forwarded,
    ];
    for (flow, local, remote, host, (exporter, sequence)) in flows {
        let header = BlockHeader {
            host_name: host.map(|host| hosts[usize::from(host)].clone()),
            ..BlockHeader::of_exporter(*exporter, *sequence, Timestamp::from_nanos(1))
        };
        let local = local.map(|local| locals[local % locals.len()]);
        let remote = match remote {
            Ok((owner, provenance)) => Ok((
                owners[owner % owners.len()],
                provenances[usize::from(*provenance) % provenances.len()],
            )),
            Err(reason) => Err(Reason::ALL[usize::from(*reason)]),
        };
        batch.push(&header, flow, local, remote, &names);
    }
    batch.set_region(region.map(Arc::<str>::from).as_ref());
    batch
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn hand_written_messages_decode_as_what_prost_would_have_written(
        identities in proptest::collection::vec(arbitrary_identity(), 1..6),
        flows in arbitrary_flows(),
        region in proptest::option::of("[a-z0-9-]{0,12}"),
        limits in arbitrary_limits(),
    ) {
        let mut batch = batch_of(&identities, &flows, region);
        encode_messages(&mut batch, limits);
        let decoded: Vec<schema::Flow> = messages(&batch)
            .flat_map(|message| schema::FlowBatch::decode(message).unwrap().flows)
            .collect();
        prop_assert_eq!(decoded, expected_rows(&batch));
        for message in messages(&batch) {
            let flows = schema::FlowBatch::decode(message).unwrap().flows.len();
            prop_assert!((1..=limits.flows).contains(&flows));
            prop_assert!(message.len() <= limits.bytes || flows == 1);
        }
        // Written as prost writes it: no byte more than the generated code's encoding.
        let reference = schema::FlowBatch {
            flows: expected_rows(&batch),
        };
        prop_assert_eq!(batch.protobuf_bytes(), reference.encoded_len());
    }
}
