//! The `protobuf-columns` format: each message one `FlowColumns` (docs/schema/flows.proto),
//! the flows of a `FlowBatch` stored column by column with each workload, host and local
//! endpoint named once. A row repeats its workload, namespace, instance, owner kind, host and
//! region names in every flow (three quarters of a `FlowBatch`'s bytes); here a flow holds
//! their positions, and a column of like numbers is what a general compressor does best with.
//! What repeats within a message (local endpoints, exporter batches) is a table, not a
//! column: Kafka's zstd takes CPU for every byte it is given, however well that byte
//! compresses.

use flowattr_common::Direction;

use crate::sink::record::{EmittedBatch, EmittedFlow, RemoteName, ip_bytes};

use super::MessageLimits;
use super::wire::{Key, Output};
use super::{direction_value, provenance_value, state_value, unattributed_value};

mod tables;
#[cfg(test)]
mod tests;

pub use tables::MessageTables;

/// A column's key: integer columns are packed (one length-delimited field each), strings and
/// addresses one field per element.
const fn key(number: u32) -> Key {
    Key::length_delimited(number)
}

/// Encodes `batch` as `FlowColumns` messages within `limits`, into the batch's buffer as
/// [`super::encode_messages`] does (read back with [`super::messages`]).
pub fn encode_messages(batch: &mut EmittedBatch, limits: MessageLimits) {
    let mut out = Output::reuse(std::mem::take(&mut batch.protobuf));
    let mut ends = std::mem::take(&mut batch.protobuf_ends);
    let (mut tables, mut columns) = std::mem::take(&mut batch.protobuf_columns);
    ends.clear();
    let mut encode = |out: &mut Output, flows: &[EmittedFlow]| {
        tables.reset(batch);
        columns.fill(flows, &mut tables);
        write_tables(out, batch, &tables);
        columns.write(out);
    };
    super::limits::write_messages(&mut out, &mut ends, batch.flows(), limits, &mut encode);
    batch.protobuf = out.into_buffer();
    batch.protobuf_ends = ends;
    batch.protobuf_columns = (tables, columns);
}

fn write_tables(out: &mut Output, batch: &EmittedBatch, tables: &MessageTables) {
    let identities = || {
        tables
            .workloads
            .order
            .iter()
            .map(|&workload| batch.identity(workload))
    };
    strings(out, key(1), identities().map(|identity| identity.name));
    strings(out, key(2), identities().map(|identity| identity.namespace));
    strings(out, key(3), identities().map(|identity| identity.instance));
    strings(
        out,
        key(4),
        identities().map(|identity| identity.owner_kind),
    );
    let hosts = tables
        .hosts
        .order
        .iter()
        .map(|&host| &*batch.host_names()[host as usize]);
    strings(out, key(5), hosts);
    let region = batch.region().unwrap_or_default();
    out.reserve(Output::FIELD_MAX + region.len());
    out.put_bytes(key(6), region.as_bytes());
    out.reserve(tables.endpoints.len() * Output::ADDRESS_MAX);
    for &(ip, _) in &tables.endpoints {
        out.put_address(key(7), &ip_bytes(ip));
    }
    packed(
        out,
        key(8),
        tables
            .endpoints
            .iter()
            .map(|&(_, workload)| workload.into()),
    );
    packed(
        out,
        key(9),
        tables.batches.iter().map(|&(exporter, ..)| exporter),
    );
    packed(
        out,
        key(10),
        tables.batches.iter().map(|&(_, sequence, _)| sequence),
    );
    packed(
        out,
        key(11),
        tables.batches.iter().map(|&(.., host)| host.into()),
    );
}

/// A packed column of numbers, written in place.
fn packed(out: &mut Output, key: Key, values: impl ExactSizeIterator<Item = u64>) {
    out.reserve(Output::FIELD_MAX + values.len() * Output::VARINT_MAX);
    let column = out.start_message(key);
    for value in values {
        out.put_varint(value);
    }
    out.finish_message(column);
}

/// The per-flow columns in field-number order: packed integer columns, but for the remote
/// addresses (17) and the client ports (19), bytes fields stored byte by byte.
const COLUMNS: std::ops::RangeInclusive<u32> = 12..=32;
const REMOTE_IPS: u32 = 17;
const CLIENT_PORTS: u32 = 19;

/// The length of the IPv4-mapped prefix ::ffff:0:0/96, which the 4-byte width leaves out.
const IPV4_MAPPED_PREFIX: usize = 12;

/// One buffer per column, filled in a single pass over the flows, then copied behind each
/// column's key and length: a pass per column would read the whole batch 21 times.
#[derive(Debug, Default)]
pub struct ColumnBuffers {
    /// The packed columns, in field-number order.
    packed: Vec<Output>,
    /// Each flow's remote address, 16 bytes (IPv4-mapped for IPv4).
    remote_ips: Vec<[u8; 16]>,
    /// Whether every remote address is IPv4, so that 4 bytes each are written.
    remote_all_v4: bool,
    /// Each flow's client port, big-endian.
    client_ports: Vec<[u8; 2]>,
}

impl ColumnBuffers {
    /// Fills the columns with `flows`, numbering what they name in `tables` on the way.
    fn fill(&mut self, flows: &[EmittedFlow], tables: &mut MessageTables) {
        self.packed
            .resize_with(COLUMNS.clone().count() - 2, Output::default);
        for column in &mut self.packed {
            column.clear();
            column.reserve(flows.len() * Output::VARINT_MAX);
        }
        self.remote_ips.clear();
        self.remote_ips.reserve(flows.len());
        self.client_ports.clear();
        self.client_ports.reserve(flows.len());
        let mut remote_all_v4 = true;
        let [
            batch,
            index_step,
            end_delta,
            duration,
            local_endpoint,
            server_port,
            direction,
            state,
            bytes_sent,
            bytes_received,
            segments_sent,
            segments_received,
            retransmits,
            remote_workload,
            unattributed,
            provenance,
            retries,
            rtt,
            rtt_deviation,
        ] = &mut self.packed[..]
        else {
            unreachable!("one buffer per packed column")
        };
        let mut previous_index = -1i64;
        let mut previous_end = 0u64;
        for emitted in flows {
            let positions = tables.number(emitted);
            let flow = &emitted.flow;
            batch.put_varint(u64::from(positions.exporter_batch));
            let index = i64::from(flow.index);
            index_step.put_varint(zigzag(index - previous_index - 1));
            previous_index = index;
            let end_us = flow.end.as_nanos() / 1000;
            end_delta.put_varint(zigzag(end_us.wrapping_sub(previous_end) as i64));
            previous_end = end_us;
            duration.put_varint(end_us.saturating_sub(flow.start.as_nanos() / 1000));
            local_endpoint.put_varint(u64::from(positions.local_endpoint));
            remote_all_v4 &= flow.remote_ip.to_v4().is_some();
            self.remote_ips.push(flow.remote_ip.octets());
            let (server, client) = match flow.direction {
                Direction::Inbound => (flow.local_port, flow.remote_port),
                Direction::Outbound => (flow.remote_port, flow.local_port),
            };
            server_port.put_varint(u64::from(server));
            self.client_ports.push(client.to_be_bytes());
            direction.put_varint(direction_value(flow.direction) as u64);
            state.put_varint(state_value(flow.state) as u64);
            bytes_sent.put_varint(flow.bytes_sent);
            bytes_received.put_varint(flow.bytes_received);
            segments_sent.put_varint(u64::from(flow.segments_sent));
            segments_received.put_varint(u64::from(flow.segments_received));
            retransmits.put_varint(u64::from(flow.retransmits));
            remote_workload.put_varint(u64::from(positions.remote_workload));
            let (reason, source) = match emitted.remote {
                RemoteName::Unattributed(reason) => (unattributed_value(reason) as u64, 0),
                RemoteName::Workload { provenance, .. } => (0, provenance_value(provenance) as u64),
            };
            unattributed.put_varint(reason);
            provenance.put_varint(source);
            retries.put_varint(u64::from(flow.retries));
            let (smoothed, deviation) = flow
                .round_trip
                .map_or((0, 0), |trip| (trip.smoothed_us, trip.deviation_us));
            rtt.put_varint(u64::from(smoothed));
            rtt_deviation.put_varint(u64::from(deviation));
        }
        self.remote_all_v4 = remote_all_v4;
    }

    /// Each column behind its key and length.
    fn write(&self, out: &mut Output) {
        let mut packed = self.packed.iter();
        for number in COLUMNS {
            if number == CLIENT_PORTS {
                out.reserve(Output::FIELD_MAX + self.client_ports.len() * 2);
                out.put_byte_planes(key(number), &self.client_ports, 0);
            } else if number == REMOTE_IPS {
                let skip = if self.remote_all_v4 {
                    IPV4_MAPPED_PREFIX
                } else {
                    0
                };
                out.reserve(Output::FIELD_MAX + self.remote_ips.len() * 16);
                out.put_byte_planes(key(number), &self.remote_ips, skip);
            } else {
                let column = packed.next().expect("one buffer per packed column");
                out.reserve(Output::FIELD_MAX + column.len());
                out.put_element(key(number), column.written());
            }
        }
    }
}

/// A column of strings, one field each, empty ones included (they hold their place).
fn strings<'a>(out: &mut Output, key: Key, values: impl Iterator<Item = &'a str>) {
    for value in values {
        out.reserve(Output::FIELD_MAX + value.len());
        out.put_element(key, value.as_bytes());
    }
}

/// sint64's zigzag: a small step back is a small number too.
fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}
