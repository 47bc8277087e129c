//! The one-hop routing rule: which shard stores a flow's heartbeat and which buffers and
//! attributes the flow. Evidence about an address and the flows that need it meet on one
//! shard: the shard of the address, or for a host-local address (one per host), the shard of
//! the exporter that reported it.

use flowattr_common::{CanonicalIp, Timestamp, WorkloadId};

use crate::delay::codec::BufferedFlow;
use crate::ownership::{Heartbeat, SourceId};
use crate::shard_router::ShardRouter;

/// "The workload at `workload` in the dictionary (None: one its exporter could not name) held
/// `ip` (or `(ip, port)` if shared) during `[start, end]`".
#[derive(Debug, Clone, Copy)]
pub struct BeatRecord {
    pub ip: CanonicalIp,
    pub port: u16,
    pub shared: bool,
    pub workload: Option<u32>,
    pub start: Timestamp,
    pub end: Timestamp,
}

impl BeatRecord {
    /// The heartbeat a flow carries for its local side, named or not: a flow the exporter
    /// could not name is still evidence that someone held its local IP. A host-local address
    /// is shared by every process of its host: owned per port.
    pub fn of(flow: &BufferedFlow) -> BeatRecord {
        let per_port = flow.local_shared || flow.local_ip.is_host_local();
        BeatRecord {
            ip: flow.local_ip,
            port: if per_port { flow.local_port } else { 0 },
            shared: flow.local_shared,
            workload: flow.local_workload,
            start: flow.start,
            end: flow.end,
        }
    }

    /// The heartbeat, with the workload resolved to `owner`, reported by `source`.
    pub fn heartbeat(&self, owner: Option<WorkloadId>, source: SourceId) -> Heartbeat {
        Heartbeat {
            ip: self.ip,
            port: self.port,
            owner,
            start: self.start,
            end: self.end,
            source,
        }
    }
}

/// A batch split by destination: flows by the shard of their remote IP, heartbeats by the
/// shard of their local IP (see [`ShardRouter::shard_for`]).
#[derive(Debug)]
pub struct SplitBatch {
    pub flows: Vec<Vec<BufferedFlow>>,
    pub beats: Vec<Vec<BeatRecord>>,
    /// Flows whose remote IP belongs to another region, by region.
    pub forward: Vec<Vec<BufferedFlow>>,
}

impl SplitBatch {
    /// For a batch of `records` flows: each shard's lists sized for its share up front, as
    /// growing them copies every flow of a batch about twice over on ingest's busy path.
    pub fn new(shards: usize, records: usize) -> Self {
        let share = match shards {
            0 | 1 => records,
            // Addresses spread evenly over shards (`ShardRouter`); a quarter over for the
            // variation of one batch.
            _ => records / shards + records / (4 * shards) + 16,
        };
        SplitBatch {
            flows: (0..shards).map(|_| Vec::with_capacity(share)).collect(),
            beats: (0..shards).map(|_| Vec::with_capacity(share)).collect(),
            forward: Vec::new(),
        }
    }

    pub fn add_heartbeat(&mut self, router: &ShardRouter, exporter: u64, flow: &BufferedFlow) {
        let beat = BeatRecord::of(flow);
        self.beats[router.shard_for(beat.ip, exporter)].push(beat);
    }

    /// A flow attributed in another region: its heartbeat stays here (its local IP is ours).
    pub fn add_forwarded(
        &mut self,
        router: &ShardRouter,
        exporter: u64,
        region: usize,
        flow: BufferedFlow,
    ) {
        self.add_heartbeat(router, exporter, &flow);
        if self.forward.len() <= region {
            self.forward.resize_with(region + 1, Vec::new);
        }
        self.forward[region].push(flow);
    }

    pub fn add(&mut self, router: &ShardRouter, exporter: u64, flow: BufferedFlow) {
        self.add_heartbeat(router, exporter, &flow);
        self.flows[router.shard_for(flow.remote_ip, exporter)].push(flow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_spreads_ips_evenly_and_stably() {
        let router = ShardRouter::new(8);
        let mut counts = [0usize; 8];
        for i in 0..80_000u32 {
            counts[router.shard_of(CanonicalIp::from_v4((0x0A00_0000 + i).into()))] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "{counts:?}");
        }
        let ip = CanonicalIp::from_v4([10, 1, 2, 3].into());
        assert_eq!(router.shard_of(ip), ShardRouter::new(8).shard_of(ip));
        assert_eq!(ShardRouter::new(1).shard_of(ip), 0);
    }

    #[test]
    fn host_local_addresses_route_by_their_host() {
        let router = ShardRouter::new(8);
        let loopback = CanonicalIp::from_v4([127, 0, 0, 1].into());
        let fleet = CanonicalIp::from_v4([10, 1, 2, 3].into());
        let shards: std::collections::HashSet<usize> = (0..64)
            .map(|exporter| router.shard_for(loopback, exporter))
            .collect();
        assert!(
            shards.len() > 4,
            "hosts' loopbacks spread over shards: {shards:?}"
        );
        assert_eq!(router.shard_for(fleet, 1), router.shard_of(fleet));
        assert_eq!(router.shard_for(fleet, 2), router.shard_of(fleet));
    }
}
