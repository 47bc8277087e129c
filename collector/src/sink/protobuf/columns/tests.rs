//! The `protobuf-columns` encoder against prost: every message holds, once its tables are
//! looked up, the rows a `FlowBatch` of the same flows would.

use std::net::Ipv4Addr;

use flowattr_common::{CanonicalIp, Direction, FlowState, Timestamp};
use proptest::prelude::*;
use prost::Message;

use super::super::MessageLimits;
use super::super::messages;
use super::super::schema;
use super::super::tests::{
    arbitrary_flows, arbitrary_identity, arbitrary_limits, batch_of, expected_rows,
};
use super::encode_messages;
use crate::delay::codec::BufferedFlow;

/// The rows a `FlowColumns` holds, as `FlowBatch` rows: what a reader of the format rebuilds.
fn rows_of_columns(columns: schema::FlowColumns) -> Vec<schema::Flow> {
    let at = |column: &[String], position: u32| {
        position
            .checked_sub(1)
            .map_or_else(String::new, |at| column[at as usize].clone())
    };
    let flows = columns.batch.len();
    let width = columns.remote_ips.len() / flows.max(1);
    assert!(
        flows == 0 || (width == 4 || width == 16) && columns.remote_ips.len() == width * flows,
        "{} bytes of addresses for {flows} flows",
        columns.remote_ips.len()
    );
    assert_eq!(
        columns.client_ports.len(),
        2 * flows,
        "2 bytes a client port"
    );
    // Byte k of flow i at k * flows + i; an IPv4-mapped address is IPv4 (4 bytes in a row).
    let remote_ip = |i: usize| {
        let address: Vec<u8> = (0..width)
            .map(|k| columns.remote_ips[k * flows + i])
            .collect();
        let mapped = <[u8; 16]>::try_from(address.as_slice())
            .ok()
            .and_then(|v6| std::net::Ipv6Addr::from(v6).to_ipv4_mapped());
        mapped.map_or(address, |v4| v4.octets().to_vec())
    };
    let (mut index, mut end_us) = (-1i64, 0u64);
    (0..flows)
        .map(|i| {
            let batch = columns.batch[i] as usize - 1;
            index += columns.index_step[i] + 1;
            end_us = end_us.wrapping_add(columns.end_us_delta[i] as u64);
            let endpoint = columns.local_endpoint[i] as usize - 1;
            let local = columns.endpoint_workload[endpoint];
            let remote = columns.remote_workload[i];
            let inbound = columns.direction[i] == schema::Direction::Inbound as i32;
            let client = u32::from(columns.client_ports[i]) << 8
                | u32::from(columns.client_ports[flows + i]);
            let (server, client) = (columns.server_port[i], client);
            let (local_port, remote_port) = if inbound {
                (server, client)
            } else {
                (client, server)
            };
            schema::Flow {
                exporter: columns.batch_exporter[batch],
                sequence: columns.batch_sequence[batch],
                index: u32::try_from(index).unwrap(),
                start_ns: (end_us - columns.duration_us[i]) * 1000,
                end_ns: end_us * 1000,
                local_ip: columns.endpoint_ip[endpoint].clone(),
                local_port,
                remote_ip: remote_ip(i),
                remote_port,
                direction: columns.direction[i],
                state: columns.state[i],
                bytes_sent: columns.bytes_sent[i],
                bytes_received: columns.bytes_received[i],
                segments_sent: columns.segments_sent[i],
                segments_received: columns.segments_received[i],
                retransmits: columns.retransmits[i],
                local_workload: at(&columns.workload, local),
                remote_workload: at(&columns.workload, remote),
                unattributed: columns.unattributed[i],
                provenance: columns.provenance[i],
                retries: columns.retries[i],
                local_namespace: at(&columns.workload_namespace, local),
                local_instance: at(&columns.workload_instance, local),
                local_owner_kind: at(&columns.workload_owner_kind, local),
                remote_namespace: at(&columns.workload_namespace, remote),
                remote_owner_kind: at(&columns.workload_owner_kind, remote),
                host_name: at(&columns.host_names, columns.batch_host_name[batch]),
                region: columns.region.clone(),
                rtt_us: columns.rtt_us[i],
                rtt_deviation_us: columns.rtt_deviation_us[i],
            }
        })
        .collect()
}

/// A host's flows: few local endpoints (one address under two workloads, one with none) over
/// two exporter batches interleaved.
#[test]
fn a_host_s_message_names_each_endpoint_and_exporter_batch_once() {
    let flow = |i: u32| BufferedFlow {
        local_ip: CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 1 + (i % 2) as u8)),
        remote_ip: CanonicalIp::from(Ipv4Addr::new(10, 9, (i >> 8) as u8, i as u8)),
        local_port: 8080,
        remote_port: 30_000 + i as u16,
        local_workload: None,
        local_shared: false,
        start: Timestamp::from_nanos(1_000_000 * u64::from(i)),
        end: Timestamp::from_nanos(1_000_000 * u64::from(i) + 5_000),
        bytes_sent: 1,
        bytes_received: 2,
        segments_sent: 1,
        segments_received: 1,
        retransmits: 0,
        round_trip: None,
        direction: Direction::Inbound,
        state: FlowState::Closed,
        index: i / 2,
        retries: 0,
    };
    let flows: Vec<_> = (0..1000u32)
        .map(|i| {
            // 10.0.0.1 as workload 0 or 1 by turns, 10.0.0.2 as none.
            let local = (i % 2 == 0).then_some((i / 2 % 2) as usize);
            let exporter_batch = (7, u64::from(i % 2));
            (flow(i), local, Ok((0, 0)), Some(0), exporter_batch)
        })
        .collect();
    let identities = ["shop/api".to_owned(), "shop/worker".to_owned()];
    let mut batch = batch_of(&identities, &flows, None);
    encode_messages(&mut batch, MessageLimits::new(1000, 1_000_000));
    let [message] = messages(&batch)
        .map(|message| schema::FlowColumns::decode(message).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .expect("one message");
    assert_eq!(message.endpoint_ip.len(), 3, "{message:?}");
    assert_eq!(message.batch_exporter, [7, 7]);
    assert_eq!(message.batch_sequence, [0, 1]);
    assert!(
        message
            .index_step
            .iter()
            .skip(1)
            .all(|&step| step.abs() <= 1)
    );
    assert_eq!(rows_of_columns(message), expected_rows(&batch));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn column_messages_hold_the_rows_a_flow_batch_would(
        identities in proptest::collection::vec(arbitrary_identity(), 1..6),
        mut flows in arbitrary_flows(),
        region in proptest::option::of("[a-z0-9-]{0,12}"),
        limits in arbitrary_limits(),
    ) {
        // Emitted flows are kept to the microsecond, which the columns count in.
        for (flow, ..) in &mut flows {
            flow.start = Timestamp::from_nanos(flow.start.as_nanos() / 1000 * 1000);
            flow.end = Timestamp::from_nanos(flow.end.as_nanos() / 1000 * 1000);
        }
        let mut batch = batch_of(&identities, &flows, region);
        encode_messages(&mut batch, limits);
        let messages: Vec<schema::FlowColumns> = messages(&batch)
            .map(|message| {
                let decoded = schema::FlowColumns::decode(message).unwrap();
                let flows = decoded.batch.len();
                assert!((1..=limits.flows).contains(&flows), "{flows} flows");
                assert!(message.len() <= limits.bytes || flows == 1, "{} bytes", message.len());
                decoded
            })
            .collect();
        // Each message names only what its own flows use; each workload, host and batch once.
        for message in &messages {
            let endpoints: std::collections::BTreeSet<u32> =
                message.local_endpoint.iter().copied().collect();
            prop_assert_eq!(endpoints, (1..=message.endpoint_ip.len() as u32).collect());
            prop_assert_eq!(message.endpoint_workload.len(), message.endpoint_ip.len());
            let workloads: std::collections::BTreeSet<u32> = message
                .endpoint_workload
                .iter()
                .chain(&message.remote_workload)
                .copied()
                .filter(|&position| position != 0)
                .collect();
            prop_assert_eq!(workloads, (1..=message.workload.len() as u32).collect());
            let hosts: std::collections::BTreeSet<u32> = message
                .batch_host_name
                .iter()
                .copied()
                .filter(|&position| position != 0)
                .collect();
            prop_assert_eq!(hosts, (1..=message.host_names.len() as u32).collect());
            let batches: std::collections::BTreeSet<u32> = message.batch.iter().copied().collect();
            prop_assert_eq!(batches, (1..=message.batch_exporter.len() as u32).collect());
            let triples: std::collections::BTreeSet<(u64, u64, u32)> = message
                .batch_exporter
                .iter()
                .zip(&message.batch_sequence)
                .zip(&message.batch_host_name)
                .map(|((&exporter, &sequence), &host)| (exporter, sequence, host))
                .collect();
            prop_assert_eq!(triples.len(), message.batch_exporter.len());
            let lengths = [
                message.workload_namespace.len(),
                message.workload_instance.len(),
                message.workload_owner_kind.len(),
            ];
            prop_assert_eq!(lengths, [message.workload.len(); 3]);
        }
        // Addresses take 4 bytes each exactly where every one of the message's is IPv4.
        let mut rows = expected_rows(&batch).into_iter();
        for message in &messages {
            let message_rows: Vec<schema::Flow> = rows.by_ref().take(message.batch.len()).collect();
            let all_v4 = message_rows.iter().all(|row| row.remote_ip.len() == 4);
            prop_assert_eq!(message.remote_ips.len(), message.batch.len() * if all_v4 { 4 } else { 16 });
        }
        let decoded: Vec<schema::Flow> = messages.into_iter().flat_map(rows_of_columns).collect();
        prop_assert_eq!(decoded, expected_rows(&batch));
    }
}
