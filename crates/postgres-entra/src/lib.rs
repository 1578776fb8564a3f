#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

// The public interface is:
#[cfg(feature = "azure")]
pub use crate::azure::AzureTokenSource;
pub use crate::cache::{CacheOptions, CacheStats, Token, TokenCache, TokenCacheBuilder};
pub use crate::claims::{MAX_TOKEN_LEN, RoleNameError, role_name_from_token};
pub use crate::clock::{Clock, SystemClock, TokioClock};
pub use crate::connect::{EntraConnector, EntraConnectorBuilder, TlsStream};
pub use crate::error::{Error, TokenError, TokenErrorKind};
pub use crate::scope::{Cloud, validate_scope};
pub use crate::tls::{TlsRoots, azure_roots, tls_config};
pub use crate::token::{AccessToken, FnTokenSource, TokenSource, TokenSourceError};
#[cfg(feature = "azure")]
pub use azure_core;
pub use tokio_postgres;

#[cfg(feature = "azure")]
mod azure;
mod cache;
mod claims;
mod clock;
mod connect;
mod error;
mod scope;
mod tls;
mod token;
