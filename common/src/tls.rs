//! Mutual TLS for the ingest protocol (exporter -> collector, and collector -> collector when
//! flows are forwarded to another region). Both ends hold a certificate signed by the fleet's
//! CA; the collector refuses a client without one, and what a client's certificate names
//! (its IP addresses, its DNS names) decides which IPs its flows may claim (the collector's
//! `tls` module). Only TLS 1.3, with the `ring` provider, so the build needs no C toolchain
//! beyond what `ring` brings and no system OpenSSL.
//!
//! The files are PEM, as every CA tool writes them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A node's or an agent's TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA whose signature the other side's certificate must carry.
    pub ca: PathBuf,
    /// This side's certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
    #[error("`{0}` is not a DNS name or IP address a certificate can carry")]
    ServerName(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file; none is an error.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(path, error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, error))?;
    if certificates.is_empty() {
        return Err(file_error(path, "holds no certificate"));
    }
    Ok(certificates)
}

pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| file_error(path, error))
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|error| file_error(path, error))?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate names: its DNS names (then its common names) and its IP addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateNames {
    pub names: Vec<String>,
    pub addresses: Vec<std::net::IpAddr>,
}

impl CertificateNames {
    /// Reads a DER certificate's subject alternative names and common names.
    pub fn of_certificate(der: &[u8]) -> Result<CertificateNames, String> {
        use x509_parser::extensions::GeneralName;
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| format!("unreadable certificate: {error}"))?;
        let mut names: Vec<String> = Vec::new();
        let mut addresses = Vec::new();
        if let Ok(Some(san)) = certificate.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => addresses.extend(ip_from_san(bytes)),
                    _ => {}
                }
            }
        }
        names.extend(
            certificate
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_owned)),
        );
        Ok(CertificateNames { names, addresses })
    }

    /// The one name that stands for the holder: its first DNS name, else its common name,
    /// else its first IP address.
    pub fn identity(&self) -> String {
        self.names
            .first()
            .cloned()
            .or_else(|| self.addresses.first().map(|ip| ip.to_string()))
            .unwrap_or_else(|| "(unnamed certificate)".to_owned())
    }

    /// The names of the leaf of a PEM certificate file: what this side's certificate says.
    pub fn of_file(path: &Path) -> Result<CertificateNames, TlsError> {
        let leaf = load_certificates(path)?
            .into_iter()
            .next()
            .expect("load_certificates returns one at least");
        CertificateNames::of_certificate(&leaf).map_err(|reason| file_error(path, reason))
    }
}

fn ip_from_san(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// The collector's side: its certificate, and a client certificate signed by the CA required
/// of every connection.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = Arc::new(root_store(&files.ca)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|error| TlsError::Setup(error.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Setup(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certificates(&files.cert)?,
            load_private_key(&files.key)?,
        )
        .map_err(|error| file_error(&files.cert, error))?;
    Ok(Arc::new(config))
}

/// The client's side of a collector connection: its certificate, the CA the collector's must
/// chain to, and the name the collector's certificate must carry.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// Unset: the collector's IP address, which its certificate then carries as a SAN.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn from_files(files: &TlsFiles, server_name: Option<&str>) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| TlsError::Setup(error.to_string()))?
            .with_root_certificates(root_store(&files.ca)?)
            .with_client_auth_cert(
                load_certificates(&files.cert)?,
                load_private_key(&files.key)?,
            )
            .map_err(|error| file_error(&files.cert, error))?;
        let server_name = server_name
            .map(|name| {
                ServerName::try_from(name.to_owned())
                    .map_err(|_| TlsError::ServerName(name.to_owned()))
            })
            .transpose()?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// A connection to `collector`, reached at `connected`: the certificate must carry the
    /// configured server name, else the collector's DNS name as written, else the IP reached.
    pub(crate) fn connection(
        &self,
        collector: &crate::collector_address::CollectorAddress,
        connected: SocketAddr,
    ) -> Result<rustls::ClientConnection, rustls::Error> {
        let name = match (&self.server_name, collector.dns_name()) {
            (Some(name), _) => name.clone(),
            (None, Some(dns)) => ServerName::try_from(dns.to_owned())
                .map_err(|_| rustls::Error::General(format!("{dns} is not a TLS server name")))?,
            (None, None) => ServerName::IpAddress(connected.ip().into()),
        };
        rustls::ClientConnection::new(self.config.clone(), name)
    }
}
