//! What a shard hands the sinks: attributed flows as plain data, with a dictionary of the
//! workload names they use. A shard only copies each flow in (no formatting, no allocation per
//! flow); the sink threads turn a batch into JSON or protobuf, off the executor that attributes
//! flows and acks batches.

use std::sync::Arc;

use flowattr_common::{CanonicalIp, Direction, FlowState, WorkloadId, WorkloadIdentity};
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
    Workload {
        name: u32,
        provenance: Provenance,
    },
    Unattributed(Reason),
}

/// One attributed flow in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmittedFlow {
    pub exporter: u64,
    pub sequence: u64,
    /// An index into the batch's host names, when the exporter's batch carried one.
    pub host_name: Option<u32>,
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
    /// The host names the flows came from: consecutive flows of one block share one entry.
    host_names: Vec<Arc<str>>,
    /// The region of the node that emitted the batch.
    region: Option<Arc<str>>,
    /// JSON lines of every flow, made by the first sink that wants them.
    pub(super) json: Vec<u8>,
    /// Protobuf messages, back to back; `protobuf_ends` holds where each ends (the buffer is
    /// scratch past the last end, kept at its size).
    pub(super) protobuf: Vec<u8>,
    pub(super) protobuf_ends: Vec<usize>,
    /// The names' protobuf fields, encoded once per batch.
    pub(super) protobuf_names: super::protobuf::EncodedNames,
    /// A `FlowColumns` message's tables and columns, kept for their buffers.
    pub(super) protobuf_columns: (
        super::protobuf::columns::MessageTables,
        super::protobuf::columns::ColumnBuffers,
    ),
}

impl EmittedBatch {
    /// Adds one flow. `local` indexes the batch's identities ([`Self::add_identity`]); the
    /// remote owner is the shard's id, named from `names`.
    pub fn push(
        &mut self,
        header: &BlockHeader,
        flow: &BufferedFlow,
        local: Option<u32>,
        remote: Result<(WorkloadId, Provenance), Reason>,
        names: &WorkloadInterner,
    ) {
        let local_workload = local;
        let remote = match remote {
            Ok((owner, provenance)) => RemoteName::Workload {
                name: self.names.index(owner, names),
                provenance,
            },
            Err(reason) => RemoteName::Unattributed(reason),
        };
        let host_name = header
            .host_name
            .as_ref()
            .map(|host| match self.host_names.last() {
                Some(last) if Arc::ptr_eq(last, host) => self.host_names.len() as u32 - 1,
                _ => {
                    self.host_names.push(host.clone());
                    self.host_names.len() as u32 - 1
                }
            });
        self.flows.push(EmittedFlow {
            exporter: header.exporter,
            sequence: header.sequence,
            host_name,
            flow: BufferedFlow {
                local_workload,
                ..*flow
            },
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
        self.host_names.clear();
        self.clear_encodings();
    }

    /// Forgets the encodings, keeping the flows (a benchmark encodes the same batch again).
    pub fn clear_encodings(&mut self) {
        self.json.clear();
        self.protobuf_ends.clear();
    }

    pub fn json_bytes(&self) -> usize {
        self.json.len()
    }

    pub fn protobuf_bytes(&self) -> usize {
        self.protobuf_ends.last().copied().unwrap_or(0)
    }

    /// Adds the identity of a block's dictionary (with its instance, as the reporting host
    /// named it), for the local side of that block's flows; returns its index.
    pub fn add_identity(&mut self, key: &str) -> u32 {
        self.names.push_key(key)
    }

    /// Identities in the batch's dictionary; [`Self::identity`] reads them by index.
    pub fn identity_count(&self) -> u32 {
        self.names.ends.len() as u32
    }

    pub fn identity(&self, index: u32) -> WorkloadIdentity<'_> {
        self.names.get(index)
    }

    pub fn local_identity(&self, flow: &EmittedFlow) -> Option<WorkloadIdentity<'_>> {
        flow.flow.local_workload.map(|index| self.names.get(index))
    }

    pub fn remote_identity(
        &self,
        flow: &EmittedFlow,
    ) -> Result<(WorkloadIdentity<'_>, Provenance), Reason> {
        match flow.remote {
            RemoteName::Workload { name, provenance } => Ok((self.names.get(name), provenance)),
            RemoteName::Unattributed(reason) => Err(reason),
        }
    }

    pub fn local_name(&self, flow: &EmittedFlow) -> Option<&str> {
        self.local_identity(flow).map(|identity| identity.name)
    }

    pub fn remote_name(&self, flow: &EmittedFlow) -> Result<(&str, Provenance), Reason> {
        self.remote_identity(flow)
            .map(|(identity, provenance)| (identity.name, provenance))
    }

    /// The host names of the batch, by [`EmittedFlow::host_name`] index.
    pub fn host_names(&self) -> &[Arc<str>] {
        &self.host_names
    }

    pub fn host_name(&self, flow: &EmittedFlow) -> Option<&str> {
        flow.host_name
            .map(|index| &*self.host_names[index as usize])
    }

    /// The emitting node's region, stamped on every record.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    pub fn set_region(&mut self, region: Option<&Arc<str>>) {
        if self.region.as_ref().map(Arc::as_ptr) != region.map(Arc::as_ptr) {
            self.region = region.cloned();
        }
    }
}

/// The identities a batch uses, each once, with their fields found once. A shard's workload ids
/// are dense, so the id -> index table is a vector; only the slots a batch used are reset after
/// it.
#[derive(Debug, Default)]
struct NameDictionary {
    text: String,
    ends: Vec<u32>,
    /// Per identity, where each field (name, namespace, instance, owner kind) lies in `text`.
    fields: Vec<[(u32, u32); 4]>,
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
            self.slots[slot] = self.push_key(names.key(id).unwrap_or("?")) + 1;
            self.used.push(id);
        }
        self.slots[slot] - 1
    }

    /// Appends `key` as a new entry.
    fn push_key(&mut self, key: &str) -> u32 {
        let start = self.text.len();
        self.text.push_str(key);
        let key = &self.text[start..];
        let identity = WorkloadIdentity::of_checked_key(key);
        let span = |field: &str| {
            if field.is_empty() {
                return (0, 0);
            }
            // Every field is a slice of `key`: its offset in `key` is the distance between them.
            let at = field.as_ptr() as usize - key.as_ptr() as usize + start;
            (at as u32, (at + field.len()) as u32)
        };
        self.fields.push(
            [
                identity.name,
                identity.namespace,
                identity.instance,
                identity.owner_kind,
            ]
            .map(span),
        );
        self.ends
            .push(u32::try_from(self.text.len()).expect("a batch's names fit in 4 GiB"));
        self.ends.len() as u32 - 1
    }

    fn get(&self, index: u32) -> WorkloadIdentity<'_> {
        let [name, namespace, instance, owner_kind] = self.fields[index as usize]
            .map(|(start, end)| &self.text[start as usize..end as usize]);
        WorkloadIdentity {
            name,
            namespace,
            instance,
            owner_kind,
        }
    }

    fn clear(&mut self) {
        for id in self.used.drain(..) {
            self.slots[id.get() as usize] = 0;
        }
        self.text.clear();
        self.ends.clear();
        self.fields.clear();
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

impl IpBytes {
    /// The octets followed by zeros to 16 bytes: a fixed-size copy of this costs less than a
    /// call to copy 4 bytes.
    pub(super) fn padded(&self) -> &[u8; 16] {
        &self.octets
    }
}

impl AsRef<[u8]> for IpBytes {
    fn as_ref(&self) -> &[u8] {
        &self.octets[..self.len]
    }
}

#[inline]
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

    fn test_flow() -> BufferedFlow {
        BufferedFlow {
            local_ip: CanonicalIp::UNSPECIFIED,
            remote_ip: CanonicalIp::UNSPECIFIED,
            local_port: 1,
            remote_port: 2,
            local_workload: None,
            local_shared: false,
            start: Timestamp::from_nanos(1),
            end: Timestamp::from_nanos(2),
            bytes_sent: 0,
            bytes_received: 0,
            segments_sent: 0,
            segments_received: 0,
            retransmits: 0,
            round_trip: None,
            direction: Direction::Outbound,
            state: FlowState::Closed,
            index: 0,
            retries: 0,
        }
    }

    #[test]
    fn names_are_stored_once_per_batch_and_forgotten_by_clear() {
        let mut interner = WorkloadInterner::default();
        let (api, db) = (interner.intern("api"), interner.intern("db"));
        let header = BlockHeader::of_exporter(7, 3, Timestamp::from_nanos(10));
        let flow = BufferedFlow {
            local_workload: Some(99),
            ..test_flow()
        };
        let mut batch = EmittedBatch::default();
        let local_db = batch.add_identity("db");
        batch.push(
            &header,
            &flow,
            Some(local_db),
            Ok((api, Provenance::Heartbeat)),
            &interner,
        );
        let local_api = batch.add_identity("api");
        batch.push(
            &header,
            &flow,
            Some(local_api),
            Err(Reason::Conflict),
            &interner,
        );
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
        assert_eq!(
            batch.names.text, "dbapiapidb",
            "local identities as added, each remote owner once"
        );
        batch.clear();
        let local_cache = batch.add_identity("cache");
        batch.push(
            &header,
            &flow,
            Some(local_cache),
            Err(Reason::NoEvidence),
            &interner,
        );
        assert_eq!(batch.local_name(&batch.flows()[0]), Some("cache"));
        assert_eq!(batch.names.text, "cache");
    }

    #[test]
    fn identities_come_out_field_by_field_and_host_names_once_per_block() {
        let mut interner = WorkloadInterner::default();
        let pod = WorkloadIdentity {
            name: "shop/api",
            namespace: "shop",
            instance: "api-1",
            owner_kind: "Deployment",
        };
        let (api, db) = (interner.intern(&pod.key()), interner.intern("db"));
        let flow = BufferedFlow {
            local_workload: Some(0),
            ..test_flow()
        };
        let first = BlockHeader {
            host_name: Some(Arc::from("node-a")),
            ..BlockHeader::of_exporter(7, 3, Timestamp::from_nanos(10))
        };
        let second = BlockHeader {
            host_name: Some(Arc::from("node-b")),
            ..first.clone()
        };
        let mut batch = EmittedBatch::default();
        let (local_api, local_db) = (batch.add_identity(&pod.key()), batch.add_identity("db"));
        batch.push(
            &first,
            &flow,
            Some(local_api),
            Ok((db, Provenance::Heartbeat)),
            &interner,
        );
        batch.push(
            &first,
            &flow,
            Some(local_db),
            Ok((api, Provenance::Heartbeat)),
            &interner,
        );
        batch.push(&second, &flow, None, Err(Reason::Unnamed), &interner);
        batch.push(
            &BlockHeader::of_exporter(8, 1, Timestamp::from_nanos(10)),
            &flow,
            None,
            Err(Reason::Unnamed),
            &interner,
        );
        let flows = batch.flows();
        assert_eq!(batch.local_identity(&flows[0]), Some(pod));
        assert_eq!(
            batch
                .remote_identity(&flows[0])
                .map(|(identity, _)| identity),
            Ok(WorkloadIdentity::named("db"))
        );
        // The map keeps the workload, not the replica: the remote side has no instance.
        assert_eq!(
            batch
                .remote_identity(&flows[1])
                .map(|(identity, _)| identity),
            Ok(pod.workload())
        );
        let hosts: Vec<_> = flows.iter().map(|flow| batch.host_name(flow)).collect();
        assert_eq!(
            hosts,
            [Some("node-a"), Some("node-a"), Some("node-b"), None]
        );
        assert_eq!(batch.host_names().len(), 2);
        let region: Arc<str> = Arc::from("eu-west-1");
        batch.set_region(Some(&region));
        assert_eq!(batch.region(), Some("eu-west-1"));
    }
}
