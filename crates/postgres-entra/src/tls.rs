//! TLS for token logins: rustls with full chain and host-name verification, always.

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::Error;

/// One of the root certificates [`TlsRoots::Azure`] trusts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AzureRoot {
    /// The root's common name, e.g. `DigiCert Global Root G2`.
    pub(crate) name: &'static str,
    /// The certificate, PEM-encoded.
    pub(crate) pem: &'static str,
}

/// The roots Microsoft tells clients of Azure Database for PostgreSQL to trust, as of its TLS
/// pages of December 2025 (Microsoft Learn, "Transport Layer Security (TLS) in Azure Database for
/// PostgreSQL" and "Connect clients with TLS security to your database"):
///
/// - DigiCert Global Root G2 and Microsoft RSA Root CA 2017: what servers chain to today;
/// - DigiCert Global Root CA: China regions until their root change after the 2026 Spring
///   Festival, and read replicas while the migration from it is not complete in every region
///   (webpki-roots no longer carries it, so it is embedded here);
/// - Microsoft ECC Root CA 2017: in Microsoft's combined root file for PostgreSQL clients.
///
/// Embedded as PEM (Mozilla's copies, as Debian's ca-certificates ships them); a test pins each by
/// its published SHA-256 fingerprint and by the SHA-1 thumbprint Microsoft lists.
pub(crate) const AZURE_ROOTS: [AzureRoot; 4] = [
    AzureRoot {
        name: "DigiCert Global Root G2",
        pem: include_str!("roots/digicert-global-root-g2.pem"),
    },
    AzureRoot {
        name: "Microsoft RSA Root Certificate Authority 2017",
        pem: include_str!("roots/microsoft-rsa-root-certificate-authority-2017.pem"),
    },
    AzureRoot {
        name: "DigiCert Global Root CA",
        pem: include_str!("roots/digicert-global-root-ca.pem"),
    },
    AzureRoot {
        name: "Microsoft ECC Root Certificate Authority 2017",
        pem: include_str!("roots/microsoft-ecc-root-certificate-authority-2017.pem"),
    },
];

/// Which certificate authorities to trust for the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsRoots {
    /// Only the roots Microsoft documents for Azure Database for PostgreSQL (Microsoft Learn, "Transport
    /// Layer Security (TLS) in Azure Database for PostgreSQL", December 2025): DigiCert Global Root
    /// G2, Microsoft RSA Root CA 2017, DigiCert Global Root CA, Microsoft ECC Root CA 2017;
    /// embedded, each pinned by its published fingerprint in a test. The default.
    #[default]
    Azure,
    /// The operating system's verifier and trust store (feature `platform-verifier`).
    #[cfg(feature = "platform-verifier")]
    Platform,
    /// The CA certificates in this PEM file (a private CA, more roots, or the local emulator's).
    CaFile(PathBuf),
    /// These PEM-encoded CA certificates.
    CaPem(String),
}

/// The Azure roots as a rustls root store.
pub(crate) fn azure_roots() -> RootCertStore {
    let pem: String = AZURE_ROOTS.iter().map(|root| root.pem).collect();
    roots_from_pem(pem.as_bytes(), "the embedded Azure roots")
        .expect("the embedded roots are valid certificates (tested)")
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

/// The rustls crypto provider: the process-wide default when the application installed one,
/// otherwise aws-lc-rs (feature `aws-lc-rs`, the default) or ring (feature `ring`).
fn crypto_provider() -> Result<Arc<CryptoProvider>, Error> {
    if let Some(installed) = CryptoProvider::get_default() {
        return Ok(installed.clone());
    }
    #[cfg(feature = "aws-lc-rs")]
    return Ok(Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    // rustls 0.23.48 deprecates its ring provider ("no support for post-quantum algorithms"):
    // still a working TLS 1.3 provider, kept for builds that cannot build aws-lc; the feature's
    // documentation says so.
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    #[allow(deprecated)]
    return Ok(Arc::new(rustls::crypto::ring::default_provider()));
    #[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
    Err(Error::config(
        "no rustls crypto provider: enable feature `aws-lc-rs` or `ring`, or install one with `rustls::crypto::CryptoProvider::install_default` before building the connector",
    ))
}

/// A rustls client configuration trusting `roots`, verifying chain and host name.
pub(crate) fn client_config(roots: &TlsRoots) -> Result<rustls::ClientConfig, Error> {
    let provider = crypto_provider()?;
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
    use aws_lc_rs::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};

    fn hex(bytes: &[u8]) -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// SHA-256 fingerprints as DigiCert publishes them for its roots
    /// (digicert.com/kb/digicert-root-certificates.htm) and Mozilla's CA program (CCADB) lists them
    /// for Microsoft's, and SHA-1 thumbprints as Microsoft Learn's "Azure Certificate Authority
    /// details" lists all four.
    const PUBLISHED: [(&str, &str, &str); 4] = [
        (
            "DigiCert Global Root G2",
            "CB:3C:CB:B7:60:31:E5:E0:13:8F:8D:D3:9A:23:F9:DE:47:FF:C3:5E:43:C1:14:4C:EA:27:D4:6A:5A:B1:CB:5F",
            "DF:3C:24:F9:BF:D6:66:76:1B:26:80:73:FE:06:D1:CC:8D:4F:82:A4",
        ),
        (
            "Microsoft RSA Root Certificate Authority 2017",
            "C7:41:F7:0F:4B:2A:8D:88:BF:2E:71:C1:41:22:EF:53:EF:10:EB:A0:CF:A5:E6:4C:FA:20:F4:18:85:30:73:E0",
            "73:A5:E6:4A:3B:FF:83:16:FF:0E:DC:CC:61:8A:90:6E:4E:AE:4D:74",
        ),
        (
            "DigiCert Global Root CA",
            "43:48:A0:E9:44:4C:78:CB:26:5E:05:8D:5E:89:44:B4:D8:4F:96:62:BD:26:DB:25:7F:89:34:A4:43:C7:01:61",
            "A8:98:5D:3A:65:E5:E5:C4:B2:D7:D6:6D:40:C6:DD:2F:B1:9C:54:36",
        ),
        (
            "Microsoft ECC Root Certificate Authority 2017",
            "35:8D:F3:9D:76:4A:F9:E1:B7:66:E9:C9:72:DF:35:2E:E1:5C:FA:C2:27:AF:6A:D1:D7:0E:8E:4A:6E:DC:BA:02",
            "99:9A:64:C3:7F:F4:7D:9F:AB:95:F1:47:69:89:14:60:EE:C4:C3:C5",
        ),
    ];

    #[test]
    fn each_azure_root_is_the_certificate_its_publishers_fingerprint() {
        assert_eq!(AZURE_ROOTS.len(), PUBLISHED.len());
        for (root, (name, sha256, sha1)) in AZURE_ROOTS.iter().zip(PUBLISHED) {
            assert_eq!(root.name, name);
            let ders: Vec<_> = CertificateDer::pem_slice_iter(root.pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(ders.len(), 1, "{name}: one certificate");
            assert_eq!(hex(digest(&SHA256, &ders[0]).as_ref()), sha256, "{name}");
            assert_eq!(
                hex(digest(&SHA1_FOR_LEGACY_USE_ONLY, &ders[0]).as_ref()),
                sha1,
                "{name}"
            );
            // The certificate's subject names the root.
            assert!(
                ders[0].windows(name.len()).any(|w| w == name.as_bytes()),
                "{name}: subject"
            );
        }
        assert_eq!(azure_roots().len(), 4);
    }

    #[cfg(feature = "platform-verifier")]
    #[test]
    fn the_platform_verifier_builds_a_config() {
        client_config(&TlsRoots::Platform).unwrap();
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_configuration_error() {
        let missing = client_config(&TlsRoots::CaFile("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(
            missing.to_string().contains("cannot read CA file"),
            "{missing}"
        );
        let empty = client_config(&TlsRoots::CaPem(String::new())).unwrap_err();
        assert!(
            empty.to_string().contains("holds no certificate"),
            "{empty}"
        );
    }
}
