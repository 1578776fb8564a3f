#![doc = include_str!("../README.md")]

// The public interface is:
pub use crate::child::{CHILD_MARKER, in_app_service_child, in_child, run_test_in_child};
pub use crate::connector::TestConnector;
pub use crate::emulator::{Emulator, EmulatorBuilder, TENANT_ID};
pub use crate::faults::{Endpoint, Fault};
pub use crate::identity::{Identity, IdentityKind};
pub use crate::issuer::{FEDERATED_AUDIENCE, FEDERATED_ISSUER, Rejection, Signer, TokenOptions};
pub use crate::metrics::{Metrics, MetricsReader, Point, Value};
pub use crate::pg::{DIR_PREFIX, SharedCluster};
pub use crate::plaintext::PlaintextListener;
pub use crate::processes::{PROCESSES_VARIABLE, record_started, start_time};
pub use crate::relay::Relay;
pub use crate::servers::AzureServer;
pub use crate::shared::LoginAttempt;
pub use crate::source::FnTokenSource;
pub use crate::stuck::{StuckRuntime, StuckSink, panicking_log_runtime};
pub use crate::tls::client_config;
pub use crate::trace::{TraceCapture, trace_capture};
pub use crate::transport::LoopbackTransport;

mod child;
mod connector;
mod emulator;
mod entra;
mod faults;
mod identity;
mod issuer;
mod ldap;
mod metrics;
mod pg;
mod plaintext;
mod processes;
mod relay;
mod servers;
mod shared;
mod source;
mod stuck;
mod tls;
mod trace;
mod transport;

/// Audience of access tokens for Azure Database for PostgreSQL (public cloud).
pub const TOKEN_AUDIENCE: &str = "https://ossrdbms-aad.database.windows.net";

/// Why the emulator could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The machine lacks something the emulator needs, or a setup step failed.
    #[error("emulator setup: {0}")]
    Setup(String),
    /// A file or process operation failed.
    #[error("emulator I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Certificate generation failed.
    #[error("emulator certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Key generation or token signing failed.
    #[error("emulator crypto: {0}")]
    Crypto(String),
    /// A TLS configuration could not be built.
    #[error("emulator TLS: {0}")]
    Tls(String),
    /// The emulator's own PostgreSQL session failed.
    #[error("emulator PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Building an azure_identity credential failed.
    #[error("emulator credential: {0}")]
    Azure(#[from] azure_core::Error),
}
