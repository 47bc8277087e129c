//! Which shard owns an address: the rule that every part of a node (ingest, the shards, the
//! broadcast and events readers, the control plane) routes by.

use flowattr_common::CanonicalIp;

/// Maps an IP to the shard that owns it. Stable for a given shard count: the delay buffer's
/// files are only valid under the count that wrote them (the node checks its manifest).
#[derive(Debug, Clone, Copy)]
pub struct ShardRouter {
    shards: usize,
}

impl ShardRouter {
    pub fn new(shards: usize) -> Self {
        assert!(shards > 0, "at least one shard");
        ShardRouter { shards }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    pub fn shard_of(&self, ip: CanonicalIp) -> usize {
        let octets = ip.octets();
        let high = u64::from_le_bytes(octets[..8].try_into().expect("8 bytes"));
        let low = u64::from_le_bytes(octets[8..].try_into().expect("8 bytes"));
        // IPv4 lives in the low half; mixing both halves spreads v6 prefixes too.
        let hash = (low ^ high.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.scale(hash)
    }

    /// The shard for evidence about `ip` reported by `exporter`, and for the flows whose
    /// remote side it is.
    pub fn shard_for(&self, ip: CanonicalIp, exporter: u64) -> usize {
        if ip.is_host_local() {
            // Spread hosts, not addresses: every host's loopback would otherwise be one shard.
            self.scale(exporter.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        } else {
            self.shard_of(ip)
        }
    }

    fn scale(&self, hash: u64) -> usize {
        ((u128::from(hash) * self.shards as u128) >> 64) as usize
    }
}
