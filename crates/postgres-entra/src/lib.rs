//! Microsoft Entra ID token login for PostgreSQL (Azure Database for PostgreSQL), the core of the
//! `postgres-entra` adapters for deadpool-postgres and bb8.
//!
//! - [`TokenSource`]: where tokens come from: any `azure_core` credential through
//!   [`AzureTokenSource`] (feature `azure`, default), or a closure ([`FnTokenSource`]).
//! - [`TokenCache`]: one shared cache per identity and scope: single-flight fetches, refresh in the
//!   background ahead of expiry, jittered exponential backoff, never an expired token.
//! - [`EntraConnector`]: logs in over verified TLS with the token as password, the role name
//!   from configuration or the token's claims, and one retry with a fresh token when the server
//!   rejects the login.
//!
//! ```no_run
//! # async fn run(credential: std::sync::Arc<dyn azure_core::credentials::TokenCredential>) -> Result<(), postgres_entra::Error> {
//! use postgres_entra::{AzureTokenSource, EntraConnector};
//!
//! let config: tokio_postgres::Config = "host=mydb.postgres.database.azure.com dbname=app user=orders-api"
//!     .parse()
//!     .map_err(postgres_entra::Error::Postgres)?;
//! let connector = EntraConnector::builder(AzureTokenSource::new(credential))
//!     .host("mydb.postgres.database.azure.com")
//!     .build()?;
//! let (client, connection) = connector.connect(&config).await?;
//! tokio::spawn(connection);
//! client.query_one("select 1", &[]).await?;
//! # Ok(()) }
//! ```
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
