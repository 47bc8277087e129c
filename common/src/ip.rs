use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 address in one 16-byte form: IPv6 as is, IPv4 as its IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`).
///
/// One form for both families keeps eBPF map keys, wire records and ownership keys fixed-size,
/// and makes a dual-stack socket that reports `::ffff:10.0.0.1` the same endpoint as a v4 socket
/// reporting `10.0.0.1`, which is what they are.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(
    feature = "std",
    derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize),
    rkyv(derive(Debug, PartialEq, Eq, Hash))
)]
pub struct CanonicalIp([u8; 16]);

const _: () = assert!(core::mem::size_of::<CanonicalIp>() == 16);

impl CanonicalIp {
    pub const UNSPECIFIED: CanonicalIp = CanonicalIp([0; 16]);

    pub const fn from_octets(octets: [u8; 16]) -> Self {
        CanonicalIp(octets)
    }

    pub const fn from_v4(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        CanonicalIp([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
    }

    pub const fn octets(&self) -> [u8; 16] {
        self.0
    }

    // Inlined: called per flow from other crates (the collector's hot paths).
    #[inline]
    pub fn to_v4(&self) -> Option<Ipv4Addr> {
        Ipv6Addr::from(self.0).to_ipv4_mapped()
    }

    /// An address that means something only on the host that uses it: loopback (127.0.0.0/8,
    /// `::1`), unspecified (`0.0.0.0`, `::`: a connect to it reaches the local host), link-local
    /// (169.254.0.0/16 with the cloud metadata address, fe80::/10) and multicast. Every host has
    /// its own, so no host's evidence about one says anything about another host's.
    #[inline]
    pub fn is_host_local(&self) -> bool {
        match self.to_v4() {
            Some(v4) => {
                v4.is_loopback() || v4.is_unspecified() || v4.is_link_local() || v4.is_multicast()
            }
            None => {
                let v6 = Ipv6Addr::from(self.0);
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_unicast_link_local()
                    || v6.is_multicast()
            }
        }
    }

    pub fn to_ip_addr(&self) -> IpAddr {
        match self.to_v4() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(self.0)),
        }
    }
}

impl From<IpAddr> for CanonicalIp {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => CanonicalIp::from_v4(v4),
            IpAddr::V6(v6) => CanonicalIp(v6.octets()),
        }
    }
}

impl From<Ipv4Addr> for CanonicalIp {
    fn from(ip: Ipv4Addr) -> Self {
        CanonicalIp::from_v4(ip)
    }
}

impl From<Ipv6Addr> for CanonicalIp {
    fn from(ip: Ipv6Addr) -> Self {
        CanonicalIp(ip.octets())
    }
}

impl fmt::Display for CanonicalIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_ip_addr().fmt(f)
    }
}

impl fmt::Debug for CanonicalIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "std")]
impl ArchivedCanonicalIp {
    pub fn get(&self) -> CanonicalIp {
        CanonicalIp(self.0)
    }
}

#[cfg(feature = "user")]
// SAFETY: 16 plain bytes, repr(C): every bit pattern is valid and there is no padding.
unsafe impl aya::Pod for CanonicalIp {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_its_mapped_ipv6_form_are_one_endpoint() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(CanonicalIp::from(v4), CanonicalIp::from(mapped));
        assert_eq!(CanonicalIp::from(mapped).to_ip_addr(), v4);
        assert_eq!(CanonicalIp::from(v4).to_string(), "10.1.2.3");
    }

    #[test]
    fn host_local_addresses_are_recognised_in_both_families() {
        let local = [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.1.1",
        ];
        for ip in local {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(CanonicalIp::from(ip).is_host_local(), "{ip}");
        }
        let fleet = [
            "10.0.0.1",
            "128.0.0.1",
            "169.253.0.1",
            "2001:db8::1",
            "fec0::1",
            "::2",
            "::ffff:10.0.0.1",
        ];
        for ip in fleet {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!CanonicalIp::from(ip).is_host_local(), "{ip}");
        }
    }

    #[test]
    fn ipv6_round_trips_unchanged() {
        let v6: IpAddr = "2001:db8::17".parse().unwrap();
        assert_eq!(CanonicalIp::from(v6).to_ip_addr(), v6);
        assert_eq!(CanonicalIp::from(v6).to_v4(), None);
    }
}
