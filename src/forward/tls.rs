//! The TLS listener, as Fluentd's `<transport tls>` configures it: a certificate chain and its
//! private key (PEM), TLS 1.2 or newer, and optionally client certificates verified against a
//! CA (`client_cert_auth`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

/// `tls_min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsVersion {
    #[value(name = "TLSv1_2", alias = "1.2")]
    Tls12,
    #[value(name = "TLSv1_3", alias = "1.3")]
    Tls13,
}

/// The TLS settings of the forward listener.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub private_key_path: PathBuf,
    /// CA certificates that client certificates must chain to.
    pub ca_path: Option<PathBuf>,
    pub client_cert_auth: bool,
    pub min_version: TlsVersion,
}

impl TlsSettings {
    /// Reads the files and builds the acceptor; errors name the file and the problem.
    pub fn acceptor(&self) -> Result<TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let certs = read_certs(&self.cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&self.private_key_path).map_err(|e| {
            format!(
                "tls_private_key_path {}: no readable unencrypted PEM private key ({e})",
                self.private_key_path.display()
            )
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = if self.client_cert_auth {
            let ca = self
                .ca_path
                .as_ref()
                .ok_or("tls_client_cert_auth needs tls_ca_path (the CA of client certificates)")?;
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("tls_ca_path {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls_ca_path {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            format!(
                "tls_cert_path {} and tls_private_key_path {}: {e}",
                self.cert_path.display(),
                self.private_key_path.display()
            )
        })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}
