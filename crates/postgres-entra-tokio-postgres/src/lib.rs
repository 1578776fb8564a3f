#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The public interface is:
pub use crate::connect::connect;
pub use crate::connection::Connection;
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra::opentelemetry_0_33;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra::{
    CacheOptions, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache,
};
pub use {postgres_entra, tokio_postgres};

mod connect;
mod connection;
mod login;

#[doc(hidden)]
pub mod __private {
    //! Not public API: what the tokio-postgres pool adapters share, which may change in any
    //! release.
    pub use crate::login::PgLogin;
}
