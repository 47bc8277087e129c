//! The `protobuf-columns` format: each message one `FlowColumns` (docs/schema/flows.proto),
//! the flows of a `FlowBatch` stored column by column with each workload and host named once.
//! A row repeats its workload, namespace, instance, owner kind, host and region names in every
//! flow (three quarters of a `FlowBatch`'s bytes); here a flow holds their positions, and a
//! column of like numbers is what a general compressor does best with.

use crate::sink::record::{EmittedBatch, EmittedFlow, RemoteName, ip_bytes};

use super::wire::{Key, Output};
use super::{direction_value, provenance_value, state_value, unattributed_value};

/// A column's key: integer columns are packed (one length-delimited field each), strings and
/// addresses one field per element.
const fn key(number: u32) -> Key {
    Key::length_delimited(number)
}

/// Not yet numbered in this message.
const UNSEEN: u32 = u32::MAX;

/// Which of the batch's workloads and hosts a message names, in the order its flows first name
/// them, and the position (plus one) each was given. Kept with the batch for its buffers.
#[derive(Debug, Default)]
pub struct MessageNames {
    workload_positions: Vec<u32>,
    workloads: Vec<u32>,
    host_positions: Vec<u32>,
    hosts: Vec<u32>,
}

impl MessageNames {
    fn number(&mut self, batch: &EmittedBatch, flows: &[EmittedFlow]) {
        self.workload_positions.clear();
        self.workload_positions
            .resize(batch.identity_count() as usize, UNSEEN);
        self.workloads.clear();
        self.host_positions.clear();
        self.host_positions.resize(batch.host_names().len(), UNSEEN);
        self.hosts.clear();
        for emitted in flows {
            let remote = match emitted.remote {
                RemoteName::Workload { name, .. } => Some(name),
                RemoteName::Unattributed(_) => None,
            };
            for workload in [emitted.flow.local_workload, remote].into_iter().flatten() {
                let position = &mut self.workload_positions[workload as usize];
                if *position == UNSEEN {
                    self.workloads.push(workload);
                    *position = self.workloads.len() as u32;
                }
            }
            if let Some(host) = emitted.host_name {
                let position = &mut self.host_positions[host as usize];
                if *position == UNSEEN {
                    self.hosts.push(host);
                    *position = self.hosts.len() as u32;
                }
            }
        }
    }

    fn local(&self, emitted: &EmittedFlow) -> u64 {
        emitted.flow.local_workload.map_or(0, |workload| {
            u64::from(self.workload_positions[workload as usize])
        })
    }

    fn remote(&self, emitted: &EmittedFlow) -> u64 {
        match emitted.remote {
            RemoteName::Workload { name, .. } => u64::from(self.workload_positions[name as usize]),
            RemoteName::Unattributed(_) => 0,
        }
    }

    fn host(&self, emitted: &EmittedFlow) -> u64 {
        emitted
            .host_name
            .map_or(0, |host| u64::from(self.host_positions[host as usize]))
    }
}

/// Encodes `batch` as `FlowColumns` messages of at most `flows_per_message` flows each, into
/// the batch's buffer as [`super::encode_messages`] does (read back with [`super::messages`]).
pub fn encode_messages(batch: &mut EmittedBatch, flows_per_message: usize) {
    let mut out = Output::reuse(std::mem::take(&mut batch.protobuf));
    let mut ends = std::mem::take(&mut batch.protobuf_ends);
    let (mut names, mut columns) = std::mem::take(&mut batch.protobuf_columns);
    ends.clear();
    for flows in batch.flows().chunks(flows_per_message.max(1)) {
        names.number(batch, flows);
        write_names(&mut out, batch, &names);
        columns.fill(flows, &names);
        columns.write(&mut out);
        ends.push(out.len());
    }
    batch.protobuf = out.into_buffer();
    batch.protobuf_ends = ends;
    batch.protobuf_columns = (names, columns);
}

fn write_names(out: &mut Output, batch: &EmittedBatch, names: &MessageNames) {
    let identities = || {
        names
            .workloads
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
    let hosts = names
        .hosts
        .iter()
        .map(|&host| &*batch.host_names()[host as usize]);
    strings(out, key(5), hosts);
    let region = batch.region().unwrap_or_default();
    out.reserve(Output::FIELD_MAX + region.len());
    out.put_bytes(key(6), region.as_bytes());
}

/// The per-flow columns in field-number order: the packed integer columns, and the two
/// address columns (12 and 14), each a field per element.
const COLUMNS: std::ops::RangeInclusive<u32> = 7..=30;
const LOCAL_IP: u32 = 12;
const REMOTE_IP: u32 = 14;

/// One buffer per column, filled in a single pass over the flows, then copied behind each
/// column's key and length: a pass per column would read the whole batch 24 times.
#[derive(Debug, Default)]
pub struct ColumnBuffers {
    columns: Vec<Output>,
}

impl ColumnBuffers {
    fn fill(&mut self, flows: &[EmittedFlow], names: &MessageNames) {
        self.columns
            .resize_with(COLUMNS.clone().count(), Output::default);
        for (column, number) in self.columns.iter_mut().zip(COLUMNS) {
            column.clear();
            let per_flow = if matches!(number, LOCAL_IP | REMOTE_IP) {
                Output::ADDRESS_MAX
            } else {
                Output::VARINT_MAX
            };
            column.reserve(flows.len() * per_flow);
        }
        let [
            exporter,
            sequence,
            index,
            end_delta,
            duration,
            local_ip,
            local_port,
            remote_ip,
            remote_port,
            direction,
            state,
            bytes_sent,
            bytes_received,
            segments_sent,
            segments_received,
            retransmits,
            local_workload,
            remote_workload,
            unattributed,
            provenance,
            retries,
            host_name,
            rtt,
            rtt_deviation,
        ] = &mut self.columns[..]
        else {
            unreachable!("one buffer per column")
        };
        let mut previous_end = 0u64;
        for emitted in flows {
            let flow = &emitted.flow;
            exporter.put_varint(emitted.exporter);
            sequence.put_varint(emitted.sequence);
            index.put_varint(u64::from(flow.index));
            let end_us = flow.end.as_nanos() / 1000;
            let delta = end_us.wrapping_sub(previous_end) as i64;
            previous_end = end_us;
            // sint64: zigzag, so that a small step back is a small number too.
            end_delta.put_varint(((delta << 1) ^ (delta >> 63)) as u64);
            duration.put_varint(end_us.saturating_sub(flow.start.as_nanos() / 1000));
            local_ip.put_address(key(LOCAL_IP), &ip_bytes(flow.local_ip));
            local_port.put_varint(u64::from(flow.local_port));
            remote_ip.put_address(key(REMOTE_IP), &ip_bytes(flow.remote_ip));
            remote_port.put_varint(u64::from(flow.remote_port));
            direction.put_varint(direction_value(flow.direction) as u64);
            state.put_varint(state_value(flow.state) as u64);
            bytes_sent.put_varint(flow.bytes_sent);
            bytes_received.put_varint(flow.bytes_received);
            segments_sent.put_varint(u64::from(flow.segments_sent));
            segments_received.put_varint(u64::from(flow.segments_received));
            retransmits.put_varint(u64::from(flow.retransmits));
            local_workload.put_varint(names.local(emitted));
            remote_workload.put_varint(names.remote(emitted));
            let (reason, source) = match emitted.remote {
                RemoteName::Unattributed(reason) => (unattributed_value(reason) as u64, 0),
                RemoteName::Workload { provenance, .. } => (0, provenance_value(provenance) as u64),
            };
            unattributed.put_varint(reason);
            provenance.put_varint(source);
            retries.put_varint(u64::from(flow.retries));
            host_name.put_varint(names.host(emitted));
            let (smoothed, deviation) = flow
                .round_trip
                .map_or((0, 0), |trip| (trip.smoothed_us, trip.deviation_us));
            rtt.put_varint(u64::from(smoothed));
            rtt_deviation.put_varint(u64::from(deviation));
        }
    }

    /// Each column behind its key and length (the addresses carry their own keys).
    fn write(&self, out: &mut Output) {
        for (column, number) in self.columns.iter().zip(COLUMNS) {
            out.reserve(Output::FIELD_MAX + column.len());
            if matches!(number, LOCAL_IP | REMOTE_IP) {
                out.put_raw(column.written());
            } else {
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
