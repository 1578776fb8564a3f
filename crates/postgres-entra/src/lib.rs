#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The public interface is:
#[cfg(feature = "azure")]
pub use crate::azure::AzureTokenSource;
pub use crate::cache::{CacheOptions, CacheStats, TokenCache, TokenCacheBuilder};
pub use crate::claims::{ClaimsError, TokenClaims};
#[cfg(feature = "test-util")]
pub use crate::clock::{Clock, TokioClock};
pub use crate::connector::{EntraConnector, EntraConnectorBuilder};
pub use crate::error::{Error, LoginRejected, LoginRetry, RoleSource, TokenError, TokenErrorKind};
#[cfg(feature = "azure")]
pub use crate::from_env::{CredentialKind, EnvCredential};
pub use crate::host::ALLOWED_HOSTS_VARIABLE;
pub use crate::pool::SessionOptions;
pub use crate::scope::Cloud;
pub use crate::tls::TlsRoots;
pub use crate::token::{AccessToken, TokenFuture, TokenSource};
#[cfg(feature = "opentelemetry_0_33")]
pub use opentelemetry_0_33;
#[cfg(feature = "azure")]
pub use {azure_core, azure_identity};

#[cfg(feature = "azure")]
mod azure;
mod cache;
mod claims;
mod clock;
mod connector;
mod error;
#[cfg(feature = "azure")]
mod from_env;
mod host;
mod log;
#[cfg(feature = "opentelemetry_0_33")]
mod metrics;
mod pool;
mod scope;
mod tls;
mod token;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
