//! The tables a `FlowColumns` message carries once for all its flows: the workloads and hosts
//! its flows name, their local endpoints and the exporter batches they came in, each numbered
//! in the order the flows first name it. Positions are one-based (0 is none), as a ClickHouse
//! array is indexed.

use flowattr_common::CanonicalIp;
use rustc_hash::FxHashMap;

use crate::sink::record::{EmittedBatch, EmittedFlow, RemoteName};

/// Not yet numbered in this message.
const UNSEEN: u32 = u32::MAX;

/// Entries of a batch-wide list (its identities, its host names) numbered in the order a
/// message's flows first name them.
#[derive(Debug, Default)]
pub(super) struct FirstSeen {
    /// Per entry of the batch's list: its position in this message, or [`UNSEEN`].
    positions: Vec<u32>,
    /// The entries the message names, in position order.
    pub(super) order: Vec<u32>,
}

impl FirstSeen {
    fn reset(&mut self, entries: usize) {
        self.positions.clear();
        self.positions.resize(entries, UNSEEN);
        self.order.clear();
    }

    fn number(&mut self, entry: u32) -> u32 {
        let position = &mut self.positions[entry as usize];
        if *position == UNSEEN {
            self.order.push(entry);
            *position = self.order.len() as u32;
        }
        *position
    }
}

/// Endpoints recently numbered, direct-mapped by a hash of the pair: numbering a flow's
/// endpoint is one probe, with no table to clear between messages (an entry counts only for the
/// message it was written in). A pair that another pushed out and that comes back is given a
/// second position; readers only look positions up, so that costs a few bytes, never a wrong
/// name.
const ENDPOINT_CACHE_BITS: u32 = 10;

#[derive(Debug, Clone, Copy, Default)]
struct CachedEndpoint {
    ip: CanonicalIp,
    workload: u32,
    position: u32,
    message: u32,
}

/// An exporter batch: its exporter, its sequence number and its host name's position.
pub(super) type ExporterBatch = (u64, u64, u32);

/// One message's tables, and the positions each flow's local endpoint and exporter batch were
/// given. Kept with the batch for its buffers.
#[derive(Debug, Default)]
pub struct MessageTables {
    /// The batch's identities the message names.
    pub(super) workloads: FirstSeen,
    /// The batch's host names the message names.
    pub(super) hosts: FirstSeen,
    /// The (local address, workload position) pairs, in position order.
    pub(super) endpoints: Vec<(CanonicalIp, u32)>,
    endpoint_cache: Vec<CachedEndpoint>,
    /// Counts the messages numbered, from 1: which cache entries are this message's.
    message: u32,
    /// The exporter batches, in position order; consecutive flows nearly always share one.
    pub(super) batches: Vec<ExporterBatch>,
    batch_positions: FxHashMap<ExporterBatch, u32>,
}

/// A flow's positions in its message's tables.
pub(super) struct FlowPositions {
    pub local_endpoint: u32,
    pub exporter_batch: u32,
    /// 0 for an unattributed flow.
    pub remote_workload: u32,
}

impl MessageTables {
    /// Empties the tables for a message of `batch`'s flows.
    pub(super) fn reset(&mut self, batch: &EmittedBatch) {
        self.workloads.reset(batch.identity_count() as usize);
        self.hosts.reset(batch.host_names().len());
        self.forget_endpoints();
        self.batches.clear();
        self.batch_positions.clear();
    }

    /// Numbers what the message's next flow names, and returns its positions. Done in the pass
    /// that fills the columns: a message's flows are more than a core's cache holds, so a
    /// second pass would read them all from memory again.
    pub(super) fn number(&mut self, emitted: &EmittedFlow) -> FlowPositions {
        let local = emitted.flow.local_workload;
        let local = local.map_or(0, |workload| self.workloads.number(workload));
        let remote_workload = match emitted.remote {
            RemoteName::Workload { name, .. } => self.workloads.number(name),
            RemoteName::Unattributed(_) => 0,
        };
        let local_endpoint = self.endpoint(emitted.flow.local_ip, local);
        let host = emitted.host_name.map_or(0, |host| self.hosts.number(host));
        let exporter_batch = self.batch((emitted.exporter, emitted.sequence, host));
        FlowPositions {
            local_endpoint,
            exporter_batch,
            remote_workload,
        }
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

    fn forget_endpoints(&mut self) {
        self.endpoints.clear();
        self.endpoint_cache
            .resize(1 << ENDPOINT_CACHE_BITS, CachedEndpoint::default());
        self.message = self.message.wrapping_add(1);
        if self.message == 0 {
            // Entries of the message 2^32 ago would look current.
            self.endpoint_cache.fill(CachedEndpoint::default());
            self.message = 1;
        }
    }

    fn endpoint(&mut self, ip: CanonicalIp, workload: u32) -> u32 {
        let entry = &mut self.endpoint_cache[cache_slot(ip, workload)];
        if entry.message == self.message && entry.ip == ip && entry.workload == workload {
            return entry.position;
        }
        self.endpoints.push((ip, workload));
        let position = self.endpoints.len() as u32;
        *entry = CachedEndpoint {
            ip,
            workload,
            position,
            message: self.message,
        };
        position
    }
}

/// Where a pair lives in the endpoint cache: both halves of the address and the workload
/// mixed by one multiplication, the top bits taken.
fn cache_slot(ip: CanonicalIp, workload: u32) -> usize {
    let octets = ip.octets();
    let [high, low] = [&octets[..8], &octets[8..]]
        .map(|half| u64::from_ne_bytes(half.try_into().expect("8 bytes")));
    let hash =
        (high ^ low.rotate_left(32) ^ u64::from(workload)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (hash >> (64 - ENDPOINT_CACHE_BITS)) as usize
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// Two pairs sharing a cache slot: the cached one answers only for itself, whichever half
    /// of the pair differs.
    #[test]
    fn a_cached_endpoint_answers_only_for_its_own_address_and_workload() {
        let mut tables = MessageTables::default();
        tables.forget_endpoints();
        let ip = CanonicalIp::from(Ipv4Addr::new(10, 0, 0, 1));
        let first = tables.endpoint(ip, 1);
        let slot = cache_slot(ip, 1);
        let workload = (2..).find(|&w| cache_slot(ip, w) == slot).unwrap();
        let other_ip = (2..=u32::MAX)
            .map(|v4| CanonicalIp::from(Ipv4Addr::from(v4)))
            .find(|&other| other != ip && cache_slot(other, 1) == slot)
            .unwrap();
        assert_eq!(tables.endpoint(ip, workload), 2);
        assert_eq!(tables.endpoint(other_ip, 1), 3);
        assert_eq!(tables.endpoint(ip, 1), 4, "pushed out, so numbered again");
        assert_eq!(tables.endpoint(ip, 1), 4);
        assert_eq!(
            tables.endpoints,
            [(ip, 1), (ip, workload), (other_ip, 1), (ip, 1)]
        );
        assert_eq!(first, 1);
        // A new message forgets the last one's positions.
        tables.forget_endpoints();
        assert_eq!(tables.endpoint(ip, 1), 1);
        assert_eq!(tables.endpoints, [(ip, 1)]);
    }
}
