//! Who is on the other end of an ingest connection, and which IPs it may speak for.
//!
//! With `[tls]` configured every connection is mutual TLS: a client without a certificate
//! signed by the fleet's CA never gets past the handshake, and the handshake must finish
//! within `tls.handshake_timeout`, so a connection that never authenticates holds at most
//! rustls's bounded handshake buffer and one connection slot, for a bounded time. Nothing of
//! the protocol (frame buffers, decoders, shard state) exists for it before then.
//!
//! An authenticated client's flows are heartbeats: "this local IP was this workload's". A
//! compromised host must not be able to claim other hosts' IPs, so each record's local IP
//! must be one the client's certificate carries as an IP SAN, or lie in a CIDR configured for
//! one of its names (`[[tls.clients]]`: a peer collector forwarding a region's flows, a host
//! whose containers take addresses from a range). Others are refused by the evidence gate as
//! `claim_not_allowed`, counted per exporter and named in the ack.
//!
//! Nor may it speak as another host: its certificate gives it one exporter id
//! ([`ExporterId::for_certificate`] of its identity), and a batch under any other id is refused
//! whole (`exporter_not_certified`), unless `[[tls.clients]]` names it a relay (another
//! region's collector, which forwards its exporters' batches under their ids). Everything kept
//! per sender (duplicate filtering, host-local evidence) is keyed by who vouched for it.

use std::time::Duration;

use flowattr_common::CanonicalIp;
use flowattr_common::tls::{CertificateNames, ClientTls, TlsError, TlsFiles};
use flowattr_common::wire::ExporterId;
use futures_rustls::TlsAcceptor;
use futures_rustls::server::TlsStream;
use glommio::net::TcpStream;
use ipnet::IpNet;

use crate::config::{ClientClaims, TlsSection};

/// The node's TLS: as the ingest server, and as a client of other regions' collectors.
pub struct NodeTls {
    acceptor: TlsAcceptor,
    client: ClientTls,
    clients: Vec<ClientClaims>,
    handshake_timeout: Duration,
}

impl NodeTls {
    pub fn load(section: &TlsSection) -> Result<NodeTls, TlsError> {
        let files = TlsFiles {
            ca: section.ca.clone(),
            cert: section.cert.clone(),
            key: section.key.clone(),
        };
        Ok(NodeTls {
            acceptor: TlsAcceptor::from(flowattr_common::tls::server_config(&files)?),
            client: ClientTls::from_files(&files, None)?,
            clients: section.clients.clone(),
            handshake_timeout: section.handshake_timeout,
        })
    }

    /// How this node connects to another region's collectors.
    pub fn client(&self) -> &ClientTls {
        &self.client
    }

    /// Runs the handshake and learns what the client may claim. The error is the reason to
    /// log: a refused certificate, a timeout, a client that speaks no TLS.
    pub async fn accept(
        &self,
        stream: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, ClaimSet), String> {
        let handshake = async {
            self.acceptor
                .accept(stream)
                .await
                .map_err(|error| error.to_string())
        };
        let timeout = async {
            glommio::timer::sleep(self.handshake_timeout).await;
            Err(format!(
                "no TLS handshake within {:?}",
                self.handshake_timeout
            ))
        };
        let stream = futures_lite::future::or(handshake, timeout).await?;
        let leaf = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or("the client sent no certificate")?;
        let claims = ClaimSet::from_certificate(leaf, &self.clients)?;
        Ok((stream, claims))
    }
}

/// What one authenticated client is, and what it may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimSet {
    /// The certificate's first DNS name (or its common name, or its first IP).
    pub identity: String,
    /// The exporter id the certificate gives its holder ([`ExporterId::for_certificate`]): a
    /// client that is not a relay may send only under it.
    pub id: ExporterId,
    /// Granted in `[[tls.clients]]`: it speaks for other exporters, under their ids.
    pub relay: bool,
    addresses: Vec<CanonicalIp>,
    networks: Vec<IpNet>,
}

impl ClaimSet {
    pub fn new(identity: String, addresses: Vec<CanonicalIp>, networks: Vec<IpNet>) -> ClaimSet {
        ClaimSet {
            id: ExporterId::for_certificate(&identity),
            identity,
            relay: false,
            addresses,
            networks,
        }
    }

    /// The certificate's IP SANs, and the CIDRs configured for any of its names.
    fn from_certificate(der: &[u8], configured: &[ClientClaims]) -> Result<ClaimSet, String> {
        let names = CertificateNames::of_certificate(der)?;
        let granted = || {
            configured
                .iter()
                .filter(|client| names.names.contains(&client.name))
        };
        let networks = granted()
            .flat_map(|client| client.claims.iter().copied())
            .collect();
        let addresses = names
            .addresses
            .iter()
            .map(|ip| CanonicalIp::from(*ip))
            .collect();
        let mut claims = ClaimSet::new(names.identity(), addresses, networks);
        claims.relay = granted().any(|client| client.relay);
        Ok(claims)
    }

    pub fn allows(&self, ip: CanonicalIp) -> bool {
        self.addresses.contains(&ip) || {
            let ip = ip.to_ip_addr();
            self.networks.iter().any(|network| network.contains(&ip))
        }
    }

    /// Who vouches for a batch sent under `exporter`: the exporter itself, or this relay.
    /// None: the client is not a relay and `exporter` is not its own id.
    pub fn sender_for(&self, exporter: ExporterId) -> Option<u64> {
        if self.relay {
            Some(self.id.0)
        } else {
            (exporter == self.id).then_some(exporter.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> CanonicalIp {
        CanonicalIp::from(text.parse::<std::net::IpAddr>().unwrap())
    }

    #[test]
    fn a_claim_set_allows_its_addresses_and_networks_and_nothing_else() {
        let claims = ClaimSet::new(
            "host-a".into(),
            vec![ip("10.0.0.1"), ip("fd00::1")],
            vec!["10.9.0.0/16".parse().unwrap(), "fd01::/64".parse().unwrap()],
        );
        for allowed in [
            "10.0.0.1",
            "fd00::1",
            "10.9.0.0",
            "10.9.255.255",
            "fd01::42",
            "::ffff:10.9.1.1",
        ] {
            assert!(claims.allows(ip(allowed)), "{allowed}");
        }
        for refused in [
            "10.0.0.2",
            "10.10.0.0",
            "10.8.255.255",
            "fd00::2",
            "fd01:0:0:1::1",
            "0.0.0.0",
        ] {
            assert!(!claims.allows(ip(refused)), "{refused}");
        }
    }

    #[test]
    fn a_certificate_claims_its_ip_sans_and_the_networks_configured_for_its_names() {
        let mut params = rcgen::CertificateParams::new(vec!["host-a.fleet".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "host-a-cn");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let configured = vec![
            ClientClaims {
                name: "host-a-cn".into(),
                claims: vec!["10.9.0.0/16".parse().unwrap()],
                relay: false,
            },
            ClientClaims {
                name: "host-b.fleet".into(),
                claims: vec!["10.7.0.0/16".parse().unwrap()],
                relay: true,
            },
        ];
        let claims = ClaimSet::from_certificate(&der, &configured).unwrap();
        assert_eq!(claims.identity, "host-a.fleet");
        assert!(claims.allows(ip("10.0.0.1")));
        assert!(
            claims.allows(ip("10.9.3.4")),
            "configured for its common name"
        );
        assert!(
            !claims.allows(ip("10.7.3.4")),
            "configured for another client"
        );
        assert!(!claims.allows(ip("10.0.0.2")));
        assert!(ClaimSet::from_certificate(b"not a certificate", &configured).is_err());
        // Not a relay: it sends under the id its certificate gives it, and no other.
        let own = ExporterId::for_certificate("host-a.fleet");
        assert_eq!(claims.id, own);
        assert_eq!(claims.sender_for(own), Some(own.0));
        assert_eq!(claims.sender_for(ExporterId(7)), None);
    }

    #[test]
    fn a_relay_speaks_for_any_exporter_and_vouches_as_itself() {
        let params = rcgen::CertificateParams::new(vec!["host-b.fleet".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let configured = vec![ClientClaims {
            name: "host-b.fleet".into(),
            claims: vec![],
            relay: true,
        }];
        let claims = ClaimSet::from_certificate(&der, &configured).unwrap();
        assert!(claims.relay);
        let relay = ExporterId::for_certificate("host-b.fleet").0;
        assert_eq!(claims.sender_for(ExporterId(7)), Some(relay));
        assert_eq!(claims.sender_for(ExporterId(8)), Some(relay));
    }
}
