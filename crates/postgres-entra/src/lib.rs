#![doc = include_str!("../README.md")]

// The public interface is:
#[cfg(feature = "azure")]
pub use crate::azure::AzureTokenSource;
pub use crate::cache::{CacheOptions, CacheStats, Token, TokenCache, TokenCacheBuilder};
pub use crate::claims::{MAX_TOKEN_LEN, RoleFromToken, RoleNameError, TokenClaims};
#[cfg(feature = "test-util")]
pub use crate::clock::{Clock, SystemClock, TokioClock};
pub use crate::connect::{Connection, EntraConnector, EntraConnectorBuilder};
pub use crate::error::{Error, LoginRejected, LoginRetry, RoleSource, TokenError, TokenErrorKind};
pub use crate::scope::Cloud;
pub use crate::session::{Session, Sessions, TokenBound};
pub use crate::tls::{AZURE_ROOTS, AzureRoot, TlsRoots};
pub use crate::token::{AccessToken, FnTokenSource, TokenSource, TokenSourceError};
#[cfg(feature = "azure")]
pub use azure_core;
#[cfg(feature = "opentelemetry")]
pub use opentelemetry;
pub use tokio_postgres;

#[cfg(feature = "azure")]
mod azure;
mod cache;
mod claims;
mod clock;
mod connect;
mod error;
#[cfg(feature = "opentelemetry")]
pub mod metrics;
mod scope;
mod session;
mod tls;
mod token;
