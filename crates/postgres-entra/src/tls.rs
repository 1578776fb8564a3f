//! TLS for token logins: rustls with full chain and host-name verification, always.

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use std::path::PathBuf;
use std::sync::Arc;

use crate::Error;

/// Subjects of the roots Azure Database for PostgreSQL chains to, picked out of webpki-roots.
const AZURE_ROOT_SUBJECTS: [&str; 4] = [
    "DigiCert Global Root G2",
    "DigiCert Global Root G3",
    "Microsoft RSA Root Certificate Authority 2017",
    "Microsoft ECC Root Certificate Authority 2017",
];

/// Which certificate authorities to trust for the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsRoots {
    /// Only the roots Azure Database for PostgreSQL uses (DigiCert Global Root G2/G3, Microsoft
    /// RSA/ECC Root CA 2017), taken from Mozilla's list in `webpki-roots`. The default.
    #[default]
    Azure,
    /// The operating system's verifier and trust store (feature `platform-verifier`).
    #[cfg(feature = "platform-verifier")]
    Platform,
    /// The CA certificates in this PEM file (a private CA, or the local emulator's).
    CaFile(PathBuf),
    /// These PEM-encoded CA certificates.
    CaPem(String),
}

/// The Azure roots as a rustls root store.
pub(crate) fn azure_roots() -> RootCertStore {
    let anchors = webpki_roots::TLS_SERVER_ROOTS.iter().filter(|anchor| {
        let subject: &[u8] = anchor.subject.as_ref();
        AZURE_ROOT_SUBJECTS.iter().any(|name| {
            subject
                .windows(name.len())
                .any(|window| window == name.as_bytes())
        })
    });
    RootCertStore {
        roots: anchors.cloned().collect(),
    }
}

fn roots_from_pem(pem: &[u8], origin: &str) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| Error::config(format!("{origin} is not valid PEM: {e}")))?;
        roots.add(cert).map_err(|e| {
            Error::config(format!("{origin} holds an unusable CA certificate: {e}"))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::config(format!("{origin} holds no certificate")));
    }
    Ok(roots)
}

/// A rustls client configuration for `roots`, with the aws-lc-rs provider chosen explicitly.
pub(crate) fn tls_config(roots: &TlsRoots) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS protocol versions: {e}")))?;
    let store = match roots {
        TlsRoots::Azure => azure_roots(),
        #[cfg(feature = "platform-verifier")]
        TlsRoots::Platform => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| Error::config(format!("platform certificate verifier: {e}")))?;
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth());
        }
        TlsRoots::CaFile(path) => {
            let origin = format!("CA file {}", path.display());
            let pem = std::fs::read(path)
                .map_err(|e| Error::config(format!("cannot read {origin}: {e}")))?;
            roots_from_pem(&pem, &origin)?
        }
        TlsRoots::CaPem(pem) => roots_from_pem(pem.as_bytes(), "the CA PEM")?,
    };
    Ok(builder.with_root_certificates(store).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_azure_roots_are_exactly_the_four_azure_uses() {
        assert_eq!(azure_roots().len(), AZURE_ROOT_SUBJECTS.len());
    }

    #[cfg(feature = "platform-verifier")]
    #[test]
    fn the_platform_verifier_builds_a_config() {
        tls_config(&TlsRoots::Platform).unwrap();
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_configuration_error() {
        let missing = tls_config(&TlsRoots::CaFile("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(
            missing.to_string().contains("cannot read CA file"),
            "{missing}"
        );
        let empty = tls_config(&TlsRoots::CaPem(String::new())).unwrap_err();
        assert!(
            empty.to_string().contains("holds no certificate"),
            "{empty}"
        );
    }
}
