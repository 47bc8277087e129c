//! Regions: a flow whose remote IP lies in another region's CIDRs is attributed there, where
//! that IP's heartbeats are. The ingest shard splits such records out of their batch, the batch
//! they form is made durable in a spool per destination region before the exporter's ack, and a
//! forwarding thread per region sends it to one of that region's collectors over the ingest
//! protocol, keeping it until it is acked (a crash loses nothing: the spool is read again at
//! start). A forwarded batch keeps its exporter's id and sequence, so a batch forwarded twice (an
//! exporter's retry, a restart) is recognised there as a duplicate. Remote IPs outside every
//! region's CIDRs are attributed here, as are those of this node's own region.

mod forward;
mod spool;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flowattr_common::CanonicalIp;
use ipnet::IpNet;
use prefix_trie::joint::map::JointPrefixMap;

pub use forward::start_forwarders;
pub use spool::ForwardSpool;

use crate::config::{Config, RegionConfig};

/// Longest-prefix match of a remote IP over every region's CIDRs.
pub struct RegionTable {
    table: JointPrefixMap<IpNet, usize>,
    regions: Vec<RegionConfig>,
    own: Option<usize>,
}

impl RegionTable {
    pub fn new(config: &Config) -> RegionTable {
        let mut table = JointPrefixMap::new();
        for (index, region) in config.regions.iter().enumerate() {
            for cidr in &region.cidrs {
                table.insert(cidr.trunc(), index);
            }
        }
        RegionTable {
            table,
            regions: config.regions.clone(),
            own: config
                .node
                .region
                .as_ref()
                .and_then(|own| config.regions.iter().position(|region| region.name == *own)),
        }
    }

    /// The region other than this node's that `ip` belongs to, if any.
    pub fn elsewhere(&self, ip: CanonicalIp) -> Option<usize> {
        let (_, &region) = self.table.get_lpm(&IpNet::from(ip.to_ip_addr()))?;
        (Some(region) != self.own).then_some(region)
    }

    pub fn regions(&self) -> &[RegionConfig] {
        &self.regions
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

/// Forwarding counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct ForwardStatus {
    pub batches_spooled: AtomicU64,
    pub batches_forwarded: AtomicU64,
    pub flows_forwarded: AtomicU64,
    pub send_failures: AtomicU64,
    pub batches_refused: AtomicU64,
    pub records_refused: AtomicU64,
    pub dead_letter_dropped: AtomicU64,
}

impl ForwardStatus {
    pub fn write_metrics(
        &self,
        scrape: &mut flowattr_common::exposition::Scrape<'_>,
    ) -> std::fmt::Result {
        let series: [(&str, &str, &AtomicU64); 7] = [
            (
                "flowattr_forward_batches_spooled",
                "batch parts for another region made durable before the ack",
                &self.batches_spooled,
            ),
            (
                "flowattr_forward_batches",
                "batch parts another region's collector acked",
                &self.batches_forwarded,
            ),
            (
                "flowattr_forward_flows",
                "flows another region's collector acked and took",
                &self.flows_forwarded,
            ),
            (
                "flowattr_forward_records_refused",
                "flows another region's collector refused one by one (kept in the spool's dead-letter/ directory)",
                &self.records_refused,
            ),
            (
                "flowattr_forward_dead_letter_dropped",
                "refused flows not kept: the dead-letter directory was full or unwritable",
                &self.dead_letter_dropped,
            ),
            (
                "flowattr_forward_send_failures",
                "failed sends to another region (retried, next collector)",
                &self.send_failures,
            ),
            (
                "flowattr_forward_batches_refused",
                "batch parts another region refused (kept in the spool's refused/ directory)",
                &self.batches_refused,
            ),
        ];
        for (name, help, value) in series {
            scrape.counter(name, help, value.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// What a node needs to forward: the table, a spool per region, the counters.
pub struct Forwarding {
    pub table: RegionTable,
    pub spools: Vec<Arc<ForwardSpool>>,
    pub status: Arc<ForwardStatus>,
}

impl Forwarding {
    /// None when no regions are configured.
    pub fn new(config: &Config) -> std::io::Result<Option<Forwarding>> {
        let table = RegionTable::new(config);
        if table.is_empty() {
            return Ok(None);
        }
        let spools = table
            .regions()
            .iter()
            .map(|region| {
                ForwardSpool::open(&config.delay.dir.join("forward").join(&region.name))
                    .map(Arc::new)
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Some(Forwarding {
            table,
            spools,
            status: Arc::new(ForwardStatus::default()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_decides_and_the_own_region_stays_here() {
        let mut config = Config::default();
        config.node.region = Some("eu".into());
        let region = |name: &str, cidrs: &[&str]| RegionConfig {
            name: name.into(),
            cidrs: cidrs.iter().map(|cidr| cidr.parse().unwrap()).collect(),
            collectors: vec!["127.0.0.1:7400".parse().unwrap()],
        };
        config.regions = vec![
            region("eu", &["10.0.0.0/8"]),
            region("us", &["10.20.0.0/16", "2001:db8:20::/48"]),
        ];
        let table = RegionTable::new(&config);
        let ip = |text: &str| CanonicalIp::from(text.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(table.elsewhere(ip("10.20.1.2")), Some(1));
        assert_eq!(table.elsewhere(ip("::ffff:10.20.1.2")), Some(1));
        assert_eq!(table.elsewhere(ip("2001:db8:20::7")), Some(1));
        assert_eq!(
            table.elsewhere(ip("10.21.1.2")),
            None,
            "the own region's /8"
        );
        assert_eq!(
            table.elsewhere(ip("192.0.2.1")),
            None,
            "outside every region: attributed here"
        );
    }
}
