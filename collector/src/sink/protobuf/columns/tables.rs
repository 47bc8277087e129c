//! The tables a `FlowColumns` message carries once for all its flows: the workloads and hosts
//! its flows name, their local endpoints and the exporter batches they came in, each numbered
//! in the order the flows first name it. Positions are one-based (0 is none), as a ClickHouse
//! array is indexed.

use flowattr_common::CanonicalIp;
use rustc_hash::FxHashMap;

use crate::sink::record::{EmittedBatch, EmittedFlow, RemoteName};

/// Not yet numbered in this message.
const UNSEEN: u32 = u32::MAX;

/// The last endpoint a local workload (or no workload) was seen with: a workload's flows in a
/// message nearly always share one address, so most flows find their endpoint here without
/// hashing.
#[derive(Debug, Clone, Copy)]
struct LastEndpoint {
    ip: CanonicalIp,
    position: u32,
}

const NO_ENDPOINT: LastEndpoint = LastEndpoint {
    ip: CanonicalIp::UNSPECIFIED,
    position: 0,
};

/// An exporter batch: its exporter, its sequence number and its host name's position.
pub(super) type ExporterBatch = (u64, u64, u32);

/// One message's tables, and the positions each flow's local endpoint and exporter batch were
/// given. Kept with the batch for its buffers.
#[derive(Debug, Default)]
pub struct MessageTables {
    /// Per identity of the batch: its position in this message, or [`UNSEEN`].
    workload_positions: Vec<u32>,
    /// The identities the message names, in position order.
    pub(super) workloads: Vec<u32>,
    host_positions: Vec<u32>,
    pub(super) hosts: Vec<u32>,
    /// The (local address, workload position) pairs, in position order.
    pub(super) endpoints: Vec<(CanonicalIp, u32)>,
    endpoint_positions: FxHashMap<(CanonicalIp, u32), u32>,
    /// Indexed by the local workload's identity plus one (0: none).
    last_endpoints: Vec<LastEndpoint>,
    /// The exporter batches, in position order; consecutive flows nearly always share one.
    pub(super) batches: Vec<ExporterBatch>,
    batch_positions: FxHashMap<ExporterBatch, u32>,
    /// Per flow of the message, its local endpoint's and its exporter batch's positions.
    pub(super) flow_positions: Vec<(u32, u32)>,
}

impl MessageTables {
    pub(super) fn number(&mut self, batch: &EmittedBatch, flows: &[EmittedFlow]) {
        let identities = batch.identity_count() as usize;
        self.workload_positions.clear();
        self.workload_positions.resize(identities, UNSEEN);
        self.workloads.clear();
        self.host_positions.clear();
        self.host_positions.resize(batch.host_names().len(), UNSEEN);
        self.hosts.clear();
        self.endpoints.clear();
        self.endpoint_positions.clear();
        self.last_endpoints.clear();
        self.last_endpoints.resize(identities + 1, NO_ENDPOINT);
        self.batches.clear();
        self.batch_positions.clear();
        self.flow_positions.clear();
        for emitted in flows {
            let local = emitted
                .flow
                .local_workload
                .map(|workload| self.workload(workload));
            if let RemoteName::Workload { name, .. } = emitted.remote {
                self.workload(name);
            }
            let slot = emitted
                .flow
                .local_workload
                .map_or(0, |workload| workload as usize + 1);
            let endpoint = self.endpoint(emitted.flow.local_ip, local.unwrap_or(0), slot);
            let host = emitted.host_name.map_or(0, |host| self.host(host));
            let batch = self.batch((emitted.exporter, emitted.sequence, host));
            self.flow_positions.push((endpoint, batch));
        }
    }

    fn host(&mut self, host: u32) -> u32 {
        let position = &mut self.host_positions[host as usize];
        if *position == UNSEEN {
            self.hosts.push(host);
            *position = self.hosts.len() as u32;
        }
        *position
    }

    fn batch(&mut self, batch: ExporterBatch) -> u32 {
        if self.batches.last() == Some(&batch) {
            return self.batches.len() as u32;
        }
        let next = self.batches.len() as u32 + 1;
        let position = *self.batch_positions.entry(batch).or_insert(next);
        if position == next {
            self.batches.push(batch);
        }
        position
    }

    fn workload(&mut self, workload: u32) -> u32 {
        let position = &mut self.workload_positions[workload as usize];
        if *position == UNSEEN {
            self.workloads.push(workload);
            *position = self.workloads.len() as u32;
        }
        *position
    }

    /// `slot` stands for the workload (whose position is `workload`): one slot, one workload.
    fn endpoint(&mut self, ip: CanonicalIp, workload: u32, slot: usize) -> u32 {
        let last = self.last_endpoints[slot];
        if last.position != 0 && last.ip == ip {
            return last.position;
        }
        let next = self.endpoints.len() as u32 + 1;
        let position = *self
            .endpoint_positions
            .entry((ip, workload))
            .or_insert(next);
        if position == next {
            self.endpoints.push((ip, workload));
        }
        self.last_endpoints[slot] = LastEndpoint { ip, position };
        position
    }

    pub(super) fn remote(&self, emitted: &EmittedFlow) -> u64 {
        match emitted.remote {
            RemoteName::Workload { name, .. } => u64::from(self.workload_positions[name as usize]),
            RemoteName::Unattributed(_) => 0,
        }
    }
}
