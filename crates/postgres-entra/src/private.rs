//! Not public API: what the postgres-entra adapters share, which may change in any release.
//! Applications use the items at the crate root.

use std::error::Error as StdError;
use std::sync::Arc;
use std::time::Duration;

use crate::{EntraConnector, Error};

pub use crate::cache::Entry;
#[cfg(feature = "opentelemetry_0_33")]
pub use crate::metrics::{PoolCounts, PoolReader};
pub use crate::pool::{Attempt, Now, PoolCore, PoolHost, Session};

/// The rustls configuration `connector` logs in with: its roots, full verification.
pub fn tls_config(connector: &EntraConnector) -> Arc<rustls::ClientConfig> {
    connector.inner.tls_config.clone()
}

/// [`Error::Config`].
pub fn config_error(message: impl Into<String>) -> Error {
    Error::config(message)
}

/// An error another crate reported, kept as the `source()` of ours.
pub type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// [`Error::Tls`].
pub fn tls_error(message: impl Into<String>, source: Option<Cause>) -> Error {
    Error::tls(message, source)
}

/// [`Error::Tls`]: the server's certificate did not verify.
pub fn certificate_error(error: rustls::Error) -> Error {
    Error::tls(
        "the server's certificate did not verify (it must chain to a trusted root, see \
         TlsRoots, and name the host you connect to)",
        Some(Arc::new(error)),
    )
}

/// [`Error::Tls`]: the server declined TLS.
pub fn tls_declined() -> Error {
    Error::tls_declined()
}

/// [`Error::Connect`].
pub fn connect_error(target: impl Into<String>, source: std::io::Error) -> Error {
    Error::connect(target, source)
}

/// [`Error::Postgres`].
pub fn postgres_error(
    code: Option<&str>,
    message: impl Into<String>,
    source: Option<Cause>,
) -> Error {
    Error::postgres(code, message, source)
}

/// `error` and its sources as one line, each part once.
pub fn flatten(error: &(dyn StdError + 'static)) -> String {
    crate::error::flatten(error)
}

/// A duration as a person reads it.
pub fn human(duration: Duration) -> String {
    crate::error::human(duration)
}

/// The roots `TlsRoots::Azure` trusts, by name, as PEM (for a tool that says which root
/// verified a chain).
pub fn azure_roots() -> impl Iterator<Item = (&'static str, &'static str)> {
    crate::tls::AZURE_ROOTS
        .iter()
        .map(|root| (root.name, root.pem))
}
