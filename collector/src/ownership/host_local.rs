//! Evidence about host-local addresses (loopback, link-local, unspecified, multicast), kept per
//! reporting host. Every host has its own 127.0.0.1: a loopback connection on host A says
//! nothing about a loopback connection on host B, so these addresses never enter the fleet-wide
//! map. A flow whose remote side is host-local is attributed only from its own host's evidence,
//! which exists because the exporter sees both ends of a local connection.
//!
//! Within one host such an address is shared by every process on it, so evidence is kept per
//! (address, port), as for a NAT64 address: the listener on 127.0.0.1:6379 owns that port, not
//! the address.

use flowattr_common::{CanonicalIp, Timestamp};
use rustc_hash::FxHashMap;

use super::{
    Attribution, Heartbeat, HeartbeatError, InsertOutcome, OwnershipConfig, OwnershipMap, Reason,
};

/// One host, as far as the collector can tell: the exporter a batch names, and who vouched for
/// the batch (the exporter itself, its id checked against its certificate under mutual TLS; or
/// the relay that forwarded it). Evidence a relay, or an impostor, files under an exporter's id
/// is another host's than the exporter's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Host {
    pub sender: u64,
    pub exporter: u64,
}

/// One ownership map per host that has reported a host-local address, made on first use and
/// dropped once eviction empties it.
#[derive(Debug)]
pub struct HostLocalOwnership {
    config: OwnershipConfig,
    hosts: FxHashMap<Host, OwnershipMap>,
}

impl HostLocalOwnership {
    pub fn new(config: OwnershipConfig) -> Self {
        HostLocalOwnership {
            config,
            hosts: FxHashMap::default(),
        }
    }

    /// Adds evidence `host` reported about one of its own host-local addresses. The
    /// heartbeat's port must be the local port: host-local addresses are owned per port.
    pub fn insert(
        &mut self,
        host: Host,
        heartbeat: Heartbeat,
    ) -> Result<InsertOutcome, HeartbeatError> {
        debug_assert!(heartbeat.ip.is_host_local());
        let config = self.config;
        self.hosts
            .entry(host)
            .or_insert_with(|| OwnershipMap::new(config))
            .insert(heartbeat)
    }

    /// Who held `(ip, port)` at `at` on `host`, from that host's evidence only. No evidence is
    /// [`Reason::HostLocal`]: the address cannot be looked up anywhere else.
    pub fn attribute(&self, host: Host, ip: CanonicalIp, port: u16, at: Timestamp) -> Attribution {
        let answer = self
            .hosts
            .get(&host)
            .map_or(Attribution::Unattributed(Reason::NoEvidence), |map| {
                map.attribute(ip, port, at)
            });
        match answer {
            Attribution::Unattributed(Reason::NoEvidence) => {
                Attribution::Unattributed(Reason::HostLocal)
            }
            answer => answer,
        }
    }

    /// Forgets evidence older than retention, and the hosts left with none.
    pub fn evict(&mut self, now: Timestamp) {
        self.hosts.retain(|_, map| {
            map.evict(now);
            map.key_count() > 0
        });
    }

    /// Keys held, over every host.
    pub fn key_count(&self) -> usize {
        self.hosts.values().map(OwnershipMap::key_count).sum()
    }
}

#[cfg(test)]
mod tests {
    use flowattr_common::WorkloadId;

    use crate::ownership::SourceId;

    use super::*;

    fn beat(port: u16, owner: u32, start: u64, end: u64) -> Heartbeat {
        Heartbeat {
            ip: CanonicalIp::from_v4([127, 0, 0, 1].into()),
            port,
            owner: Some(WorkloadId::new(owner)),
            start: Timestamp::from_nanos(start * 1_000_000_000),
            end: Timestamp::from_nanos(end * 1_000_000_000),
            source: SourceId::UNKNOWN,
        }
    }

    #[test]
    fn one_hosts_loopback_evidence_never_answers_for_another_host() {
        let mut evidence = HostLocalOwnership::new(OwnershipConfig::default());
        let loopback = CanonicalIp::from_v4([127, 0, 0, 1].into());
        let at = Timestamp::from_nanos(105 * 1_000_000_000);
        let host = |exporter| Host {
            sender: exporter,
            exporter,
        };
        evidence.insert(host(1), beat(6379, 7, 100, 110)).unwrap();
        evidence.insert(host(2), beat(5432, 8, 100, 110)).unwrap();
        assert_eq!(
            evidence.attribute(host(1), loopback, 6379, at),
            Attribution::Owner(WorkloadId::new(7))
        );
        assert_eq!(
            evidence.attribute(host(2), loopback, 6379, at),
            Attribution::Unattributed(Reason::HostLocal)
        );
        assert_eq!(
            evidence.attribute(host(3), loopback, 6379, at),
            Attribution::Unattributed(Reason::HostLocal)
        );
        // Per port on one host: another port of the same address is another owner.
        assert_eq!(
            evidence.attribute(host(1), loopback, 5432, at),
            Attribution::Unattributed(Reason::HostLocal)
        );
        // Filed under exporter 1's id by a relay, it is not exporter 1's own evidence.
        let relayed = Host {
            sender: 99,
            exporter: 1,
        };
        evidence.insert(relayed, beat(5432, 9, 100, 110)).unwrap();
        assert_eq!(
            evidence.attribute(host(1), loopback, 5432, at),
            Attribution::Unattributed(Reason::HostLocal)
        );
        assert_eq!(
            evidence.attribute(relayed, loopback, 5432, at),
            Attribution::Owner(WorkloadId::new(9))
        );
        assert_eq!(evidence.key_count(), 3);
        evidence.evict(Timestamp::from_nanos(10_000 * 1_000_000_000));
        assert_eq!(evidence.key_count(), 0);
        assert!(evidence.hosts.is_empty(), "emptied hosts are dropped");
    }
}
