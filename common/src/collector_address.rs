//! Where collectors listen, as an operator writes it: `HOST:PORT`, the host a DNS name, an IPv4
//! address or a bracketed IPv6 one, and a list of them to fail over between. A name is kept as
//! written and resolved again at every connect, so a collector that comes back at another
//! address (a rescheduled pod behind a headless Service, a replaced VM) is found on the next
//! reconnect; under TLS the name is what the collector's certificate must carry.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// One collector's ingest address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorAddress {
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{0:?} is not HOST:PORT (a DNS name or an IP address, a colon, a port; IPv6 in brackets)"
    )]
    Form(String),
    #[error("{0:?}: the host is not a DNS name (letters, digits, '-' and '.', at most 253 bytes)")]
    Name(String),
    #[error("no collector address given")]
    Empty,
}

impl CollectorAddress {
    /// The host as written: a DNS name, or an IP address.
    pub fn host(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }

    /// The DNS name, when the host is one (not an IP literal).
    pub fn dns_name(&self) -> Option<&str> {
        match &self.host {
            Host::Ip(_) => None,
            Host::Name(name) => Some(name),
        }
    }

    /// The socket addresses the host has now, in the resolver's order.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = match &self.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, self.port)],
            Host::Name(name) => (name.as_str(), self.port).to_socket_addrs()?.collect(),
        };
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{self} resolves to no address"),
            ));
        }
        Ok(addrs)
    }
}

impl From<SocketAddr> for CollectorAddress {
    fn from(addr: SocketAddr) -> CollectorAddress {
        CollectorAddress {
            host: Host::Ip(addr.ip()),
            port: addr.port(),
        }
    }
}

impl FromStr for CollectorAddress {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<CollectorAddress, AddressError> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr.into());
        }
        let form = || AddressError::Form(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(form)?;
        let port = port.parse::<u16>().map_err(|_| form())?;
        if host.contains([':', '[', ']']) {
            return Err(form());
        }
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
            });
        if !name_ok {
            return Err(AddressError::Name(host.to_owned()));
        }
        Ok(CollectorAddress {
            host: Host::Name(host.to_ascii_lowercase()),
            port,
        })
    }
}

impl fmt::Display for CollectorAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(formatter, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(formatter, "{ip}:{}", self.port),
            Host::Name(name) => write!(formatter, "{name}:{}", self.port),
        }
    }
}

/// Collectors to fail over between, in order: never empty. Written `a:7400,b:7400` (a flag, an
/// environment variable) or as a list in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorAddresses(Vec<CollectorAddress>);

impl CollectorAddresses {
    pub fn new(addresses: Vec<CollectorAddress>) -> Result<CollectorAddresses, AddressError> {
        if addresses.is_empty() {
            return Err(AddressError::Empty);
        }
        Ok(CollectorAddresses(addresses))
    }

    pub fn as_slice(&self) -> &[CollectorAddress] {
        &self.0
    }
}

impl FromStr for CollectorAddresses {
    type Err = AddressError;

    fn from_str(text: &str) -> Result<CollectorAddresses, AddressError> {
        CollectorAddresses::new(
            text.split(',')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()?,
        )
    }
}

impl fmt::Display for CollectorAddresses {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, address) in self.0.iter().enumerate() {
            if index > 0 {
                formatter.write_str(",")?;
            }
            write!(formatter, "{address}")?;
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for CollectorAddress {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<CollectorAddress, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> serde::Deserialize<'de> for CollectorAddresses {
    /// `"a:7400"`, `"a:7400,b:7400"` or `["a:7400", "b:7400"]`.
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<CollectorAddresses, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Written {
            One(String),
            Many(Vec<CollectorAddress>),
        }
        match Written::deserialize(deserializer)? {
            Written::One(text) => text.parse().map_err(serde::de::Error::custom),
            Written::Many(addresses) => {
                CollectorAddresses::new(addresses).map_err(serde::de::Error::custom)
            }
        }
    }
}

/// Which of a list of collectors to use: the same one while it answers, the next after a
/// failure, round the list.
#[derive(Debug, Clone)]
pub struct Failover {
    addresses: CollectorAddresses,
    current: usize,
}

impl Failover {
    pub fn new(addresses: CollectorAddresses) -> Failover {
        Failover {
            addresses,
            current: 0,
        }
    }

    pub fn current(&self) -> &CollectorAddress {
        &self.addresses.0[self.current]
    }

    /// The current collector failed: the next one is tried from now on.
    pub fn failed(&mut self) {
        self.current = (self.current + 1) % self.addresses.0.len();
    }

    pub fn addresses(&self) -> &CollectorAddresses {
        &self.addresses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_names_or_ips_with_a_port() {
        let parse = |text: &str| text.parse::<CollectorAddress>();
        assert_eq!(parse("10.0.0.1:7400").unwrap().to_string(), "10.0.0.1:7400");
        assert_eq!(
            parse("[2001:db8::1]:7400").unwrap().to_string(),
            "[2001:db8::1]:7400"
        );
        let named = parse("Collector-0.flowattr.svc.cluster.local:7400").unwrap();
        assert_eq!(
            named.dns_name(),
            Some("collector-0.flowattr.svc.cluster.local")
        );
        assert_eq!(
            named.to_string(),
            "collector-0.flowattr.svc.cluster.local:7400"
        );
        for bad in [
            "collector",
            "collector:",
            "collector:99999",
            "2001:db8::1:7400",
            "-bad.example:1",
            "a..b:1",
            "a b:1",
            ":7400",
        ] {
            assert!(parse(bad).is_err(), "{bad} was taken");
        }
        assert_eq!(
            parse("collector").unwrap_err().to_string(),
            "\"collector\" is not HOST:PORT (a DNS name or an IP address, a colon, a port; IPv6 in brackets)"
        );
    }

    #[test]
    fn a_list_fails_over_in_order_and_comes_round() {
        let list: CollectorAddresses = "a.example:1, 10.0.0.2:2,b.example:3".parse().unwrap();
        assert_eq!(list.to_string(), "a.example:1,10.0.0.2:2,b.example:3");
        let mut failover = Failover::new(list);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(failover.current().to_string());
            failover.failed();
        }
        assert_eq!(
            seen,
            ["a.example:1", "10.0.0.2:2", "b.example:3", "a.example:1"]
        );
        assert_eq!("".parse::<CollectorAddresses>(), Err(AddressError::Empty));
    }

    #[test]
    fn localhost_resolves_from_the_hosts_file() {
        let addrs = "localhost:7400"
            .parse::<CollectorAddress>()
            .unwrap()
            .resolve()
            .unwrap();
        assert!(
            addrs
                .iter()
                .all(|addr| addr.ip().is_loopback() && addr.port() == 7400),
            "{addrs:?}"
        );
        assert!(
            "no-such-host.invalid:1"
                .parse::<CollectorAddress>()
                .unwrap()
                .resolve()
                .is_err()
        );
    }
}
