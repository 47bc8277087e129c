//! A throwaway certificate authority for mutual TLS: the tests of both the collector and the
//! exporter issue their nodes' and hosts' certificates from it, and an operator trying TLS on
//! one machine can too. A fleet's real CA is the operator's own (docs/operations.md).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flowattr_common::tls::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A CA whose certificate is written to `<dir>/<name>-ca.pem`, and which issues leaf
/// certificates into the same directory.
pub struct TestPki {
    dir: PathBuf,
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<TestPki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pki = TestPki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            issuer,
        };
        std::fs::write(pki.ca(), pki.issuer.pem())?;
        Ok(pki)
    }

    /// The CA certificate's PEM file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// Issues a certificate for `dns` names and `ips`, good as both a TLS server's and a
    /// client's (a collector is both), and writes it and its key beside the CA.
    pub fn issue(&self, leaf: &str, dns: &[&str], ips: &[IpAddr]) -> anyhow::Result<TlsFiles> {
        let mut params = CertificateParams::new(
            dns.iter()
                .map(|name| (*name).to_owned())
                .collect::<Vec<_>>(),
        )?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, leaf);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        let files = TlsFiles {
            ca: self.ca(),
            cert: self.dir.join(format!("{}-{leaf}.pem", self.name)),
            key: self.dir.join(format!("{}-{leaf}.key", self.name)),
        };
        std::fs::write(&files.cert, certificate.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
