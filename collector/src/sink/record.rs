//! What a shard hands the sinks: attributed flows as plain data, with a dictionary of the
//! workload names they use. A shard only copies each flow in (no formatting, no allocation per
//! flow); the sink threads turn a batch into JSON or protobuf, off the executor that attributes
//! flows and acks batches.

use flowattr_common::{CanonicalIp, Direction, FlowState, WorkloadId};
use serde::Serialize;

use crate::delay::codec::{BlockHeader, BufferedFlow};
use crate::ownership::{Reason, WorkloadInterner};

/// How the remote side was attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// From heartbeats: flows the remote IP's own exporter reported.
    Heartbeat,
    /// From the assign/unassign event stream (IPs with no agent).
    Event,
    /// Attributed by the collector of another region.
    Forwarded,
}

/// The remote side of an emitted flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteName {
    /// An index into the batch's names.
    Workload { name: u32, provenance: Provenance },
    Unattributed(Reason),
}

/// One attributed flow in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmittedFlow {
    pub exporter: u64,
    pub sequence: u64,
    /// As buffered, except that `local_workload` indexes the batch's names (not the block's).
    pub flow: BufferedFlow,
    pub remote: RemoteName,
}

/// Attributed flows on their way to the sinks, and the encodings the sinks made of them (kept
/// with the batch so their buffers are reused on its next trip).
#[derive(Debug, Default)]
pub struct EmittedBatch {
    flows: Vec<EmittedFlow>,
    names: NameDictionary,
    /// JSON lines of every flow, made by the first sink that wants them.
    pub(super) json: Vec<u8>,
    /// Protobuf messages, back to back; `protobuf_ends` holds where each ends.
    pub(super) protobuf: Vec<u8>,
    pub(super) protobuf_ends: Vec<usize>,
}

impl EmittedBatch {
    /// Adds one flow. `local` and the remote owner are the shard's ids, named from `names`.
    pub fn push(
        &mut self,
        header: &BlockHeader,
        flow: &BufferedFlow,
        local: Option<WorkloadId>,
        remote: Result<(WorkloadId, Provenance), Reason>,
        names: &WorkloadInterner,
    ) {
        let local_workload = local.map(|id| self.names.index(id, names));
        let remote = match remote {
            Ok((owner, provenance)) => RemoteName::Workload {
                name: self.names.index(owner, names),
                provenance,
            },
            Err(reason) => RemoteName::Unattributed(reason),
        };
        self.flows.push(EmittedFlow {
            exporter: header.exporter,
            sequence: header.sequence,
            flow: BufferedFlow { local_workload, ..*flow },
            remote,
        });
    }

    pub fn flows(&self) -> &[EmittedFlow] {
        &self.flows
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Empties the batch, keeping every buffer for the next one.
    pub fn clear(&mut self) {
        self.flows.clear();
        self.names.clear();
        self.clear_encodings();
    }

    /// Forgets the encodings, keeping the flows (a benchmark encodes the same batch again).
    pub fn clear_encodings(&mut self) {
        self.json.clear();
        self.protobuf.clear();
        self.protobuf_ends.clear();
    }

    pub fn json_bytes(&self) -> usize {
        self.json.len()
    }

    pub fn protobuf_bytes(&self) -> usize {
        self.protobuf.len()
    }

    /// Names in the batch's dictionary; [`Self::name`] reads them by index.
    pub fn name_count(&self) -> u32 {
        self.names.ends.len() as u32
    }

    pub fn name(&self, index: u32) -> &str {
        self.names.get(index)
    }

    pub fn local_name(&self, flow: &EmittedFlow) -> Option<&str> {
        flow.flow.local_workload.map(|index| self.names.get(index))
    }

    pub fn remote_name(&self, flow: &EmittedFlow) -> Result<(&str, Provenance), Reason> {
        match flow.remote {
            RemoteName::Workload { name, provenance } => Ok((self.names.get(name), provenance)),
            RemoteName::Unattributed(reason) => Err(reason),
        }
    }
}

/// The names a batch uses, each once. A shard's workload ids are dense, so the id -> index
/// table is a vector; only the slots a batch used are reset after it.
#[derive(Debug, Default)]
struct NameDictionary {
    text: String,
    ends: Vec<u32>,
    /// Index + 1 of each id's name in this batch; 0 when unused.
    slots: Vec<u32>,
    used: Vec<WorkloadId>,
}

impl NameDictionary {
    fn index(&mut self, id: WorkloadId, names: &WorkloadInterner) -> u32 {
        let slot = id.get() as usize;
        if slot >= self.slots.len() {
            self.slots.resize(names.len().max(slot + 1), 0);
        }
        if self.slots[slot] == 0 {
            self.text.push_str(names.name(id).unwrap_or("?"));
            self.ends.push(u32::try_from(self.text.len()).expect("a batch's names fit in 4 GiB"));
            self.slots[slot] = self.ends.len() as u32;
            self.used.push(id);
        }
        self.slots[slot] - 1
    }

    fn get(&self, index: u32) -> &str {
        let index = index as usize;
        let start = if index == 0 { 0 } else { self.ends[index - 1] as usize };
        &self.text[start..self.ends[index] as usize]
    }

    fn clear(&mut self) {
        for id in self.used.drain(..) {
            self.slots[id.get() as usize] = 0;
        }
        self.text.clear();
        self.ends.clear();
    }
}

pub fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "outbound",
        Direction::Inbound => "inbound",
    }
}

pub fn state_name(state: FlowState) -> &'static str {
    match state {
        FlowState::Open => "open",
        FlowState::Closed => "closed",
    }
}

/// An address as the protobuf and Parquet outputs store it: 4 bytes for IPv4, 16 for IPv6
/// (no allocation per flow).
pub(super) struct IpBytes {
    octets: [u8; 16],
    len: usize,
}

impl AsRef<[u8]> for IpBytes {
    fn as_ref(&self) -> &[u8] {
        &self.octets[..self.len]
    }
}

pub(super) fn ip_bytes(ip: CanonicalIp) -> IpBytes {
    match ip.to_v4() {
        Some(v4) => {
            let mut octets = [0; 16];
            octets[..4].copy_from_slice(&v4.octets());
            IpBytes { octets, len: 4 }
        }
        None => IpBytes {
            octets: ip.octets(),
            len: 16,
        },
    }
}

#[cfg(test)]
mod tests {
    use flowattr_common::{CanonicalIp, Timestamp};

    use super::*;

    #[test]
    fn names_are_stored_once_per_batch_and_forgotten_by_clear() {
        let mut interner = WorkloadInterner::default();
        let (api, db, cache) = (interner.intern("api"), interner.intern("db"), interner.intern("cache"));
        let header = BlockHeader::of_exporter(7, 3, Timestamp::from_nanos(10));
        let flow = BufferedFlow {
            local_ip: CanonicalIp::UNSPECIFIED,
            remote_ip: CanonicalIp::UNSPECIFIED,
            local_port: 1,
            remote_port: 2,
            local_workload: Some(99),
            local_shared: false,
            start: Timestamp::from_nanos(1),
            end: Timestamp::from_nanos(2),
            bytes_sent: 0,
            bytes_received: 0,
            segments_sent: 0,
            segments_received: 0,
            retransmits: 0,
            direction: Direction::Outbound,
            state: FlowState::Closed,
            index: 0,
            retries: 0,
        };
        let mut batch = EmittedBatch::default();
        batch.push(&header, &flow, Some(db), Ok((api, Provenance::Heartbeat)), &interner);
        batch.push(&header, &flow, Some(api), Err(Reason::Conflict), &interner);
        batch.push(&header, &flow, None, Ok((db, Provenance::Event)), &interner);
        let named: Vec<_> = batch
            .flows()
            .iter()
            .map(|flow| (batch.local_name(flow), batch.remote_name(flow)))
            .collect();
        assert_eq!(
            named,
            [
                (Some("db"), Ok(("api", Provenance::Heartbeat))),
                (Some("api"), Err(Reason::Conflict)),
                (None, Ok(("db", Provenance::Event))),
            ]
        );
        assert_eq!(batch.names.text, "dbapi", "each name once");
        batch.clear();
        batch.push(&header, &flow, Some(cache), Err(Reason::NoEvidence), &interner);
        assert_eq!(batch.local_name(&batch.flows()[0]), Some("cache"));
        assert_eq!(batch.names.text, "cache");
    }
}
