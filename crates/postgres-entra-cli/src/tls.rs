//! The TLS step: PostgreSQL's `SSLRequest`, then a rustls handshake that records the chain the
//! server presents, so that a failure can name the certificate that is not trusted.

use postgres_entra::__private::azure_roots;
use postgres_entra::TlsRoots;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_cert::der::Decode;

/// A certificate as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateInfo {
    /// Its subject (RFC 4514).
    pub subject: String,
    /// Its issuer (RFC 4514).
    pub issuer: String,
    /// The DNS names it is valid for.
    pub dns_names: Vec<String>,
}

fn describe(der: &CertificateDer<'_>) -> CertificateInfo {
    match x509_cert::Certificate::from_der(der) {
        Ok(cert) => {
            let tbs = &cert.tbs_certificate;
            let dns_names = match tbs.get::<x509_cert::ext::pkix::SubjectAltName>() {
                Ok(Some((_, names))) => names
                    .0
                    .iter()
                    .filter_map(|name| match name {
                        x509_cert::ext::pkix::name::GeneralName::DnsName(dns) => {
                            Some(dns.to_string())
                        }
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            CertificateInfo {
                subject: tbs.subject.to_string(),
                issuer: tbs.issuer.to_string(),
                dns_names,
            }
        }
        Err(e) => CertificateInfo {
            subject: format!("(unparsable certificate: {e})"),
            issuer: String::new(),
            dns_names: Vec::new(),
        },
    }
}

/// The trusted roots, each with a name to report.
pub(crate) fn trusted(roots: &TlsRoots) -> Result<Vec<(String, CertificateDer<'static>)>, String> {
    let named = |pem: &[u8], origin: &str| -> Result<Vec<_>, String> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .map(|cert| {
                let cert = cert.map_err(|e| format!("{origin} is not valid PEM: {e}"))?;
                let name = describe(&cert).subject;
                Ok((name, cert))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if certs.is_empty() {
            return Err(format!("{origin} holds no certificate"));
        }
        Ok(certs)
    };
    match roots {
        TlsRoots::Azure => Ok(azure_roots()
            .map(|(name, pem)| {
                let cert = CertificateDer::from_pem_slice(pem.as_bytes())
                    .expect("the embedded roots are valid (tested in the core)");
                (name.to_owned(), cert)
            })
            .collect()),
        TlsRoots::CaFile(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            named(&pem, &format!("the CA file {}", path.display()))
        }
        TlsRoots::CaPem(pem) => named(pem.as_bytes(), "the CA PEM"),
        _ => Err("the doctor checks the Azure roots or a CA file".to_owned()),
    }
}

/// Records the chain the server presents, and verifies it as the library does.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    chain: Mutex<Vec<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.chain.lock().unwrap_or_else(|e| e.into_inner()) = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|cert| cert.clone().into_owned())
            .collect();
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn verifier(
    roots: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root)
            .map_err(|e| format!("an unusable CA certificate: {e}"))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(|e| format!("certificate verifier: {e}"))
}

/// A handshake that went through.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Handshake {
    /// The TLS version.
    pub protocol: String,
    /// The cipher suite.
    pub cipher_suite: String,
    /// The chain the server presented, its own certificate first.
    pub chain: Vec<CertificateInfo>,
    /// The trusted root the chain verified against.
    pub verified_by: String,
}

/// Why the TLS step failed.
#[derive(Debug)]
pub enum TlsFailure {
    /// The server answered the `SSLRequest` with `N`: it does not do TLS.
    Declined,
    /// The connection failed or timed out before or during the handshake.
    Io(String),
    /// The roots could not be loaded.
    Roots(String),
    /// rustls refused the server's certificate or the handshake.
    Handshake {
        /// rustls' words.
        error: String,
        /// The certificate problem, when it is one.
        certificate: Option<rustls::CertificateError>,
        /// The chain the server presented (empty if it presented none).
        chain: Vec<CertificateInfo>,
    },
}

/// Connects to `address`, asks for TLS as PostgreSQL clients do, and completes a handshake for
/// `host` against `roots`.
pub async fn probe(
    address: SocketAddr,
    host: &str,
    roots: &TlsRoots,
    timeout: Duration,
) -> Result<Handshake, TlsFailure> {
    let trusted = trusted(roots).map_err(TlsFailure::Roots)?;
    let recording = Arc::new(Recording {
        inner: verifier(trusted.iter().map(|(_, cert)| cert.clone())).map_err(TlsFailure::Roots)?,
        chain: Mutex::new(Vec::new()),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFailure::Roots(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(recording.clone())
        .with_no_client_auth();
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|e| TlsFailure::Roots(format!("`{host}` is not a valid server name: {e}")))?;
    let io = |e: std::io::Error| TlsFailure::Io(e.to_string());
    let handshake = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await.map_err(io)?;
        // SSLRequest: length 8, code 80877103.
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(io)?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io)?;
        if answer[0] != b'S' {
            return Err(TlsFailure::Declined);
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        connector
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(|error| match error {
                        rustls::Error::InvalidCertificate(problem) => Some(problem.clone()),
                        _ => None,
                    });
                TlsFailure::Handshake {
                    error: e.to_string(),
                    certificate,
                    chain: Vec::new(),
                }
            })
    };
    let result = tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or_else(|_| Err(TlsFailure::Io(format!("no answer within {timeout:?}"))));
    let chain = recording
        .chain
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let stream = match result {
        Ok(stream) => stream,
        Err(TlsFailure::Handshake {
            error, certificate, ..
        }) => {
            return Err(TlsFailure::Handshake {
                error,
                certificate,
                chain: chain.iter().map(describe).collect(),
            });
        }
        Err(other) => return Err(other),
    };
    let (_, session) = stream.get_ref();
    let verified_by = which_root(&trusted, &chain, &server_name)
        .unwrap_or_else(|| "one of the trusted roots".to_owned());
    Ok(Handshake {
        protocol: session
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher_suite: session
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default(),
        chain: chain.iter().map(describe).collect(),
        verified_by,
    })
}

/// The trusted root `chain` verifies against: each tried alone.
fn which_root(
    trusted: &[(String, CertificateDer<'static>)],
    chain: &[CertificateDer<'static>],
    server_name: &ServerName<'_>,
) -> Option<String> {
    let (end_entity, intermediates) = chain.split_first()?;
    trusted.iter().find_map(|(name, root)| {
        let verifier = verifier([root.clone()]).ok()?;
        verifier
            .verify_server_cert(end_entity, intermediates, server_name, &[], UnixTime::now())
            .ok()
            .map(|_| name.clone())
    })
}
