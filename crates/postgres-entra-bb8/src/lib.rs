#![doc = include_str!("../README.md")]

use std::sync::{Arc, Mutex};

// The public interface is:
#[cfg(feature = "azure")]
pub use azure_identity;
pub use bb8;
pub use postgres_entra;
pub use postgres_entra::tokio_postgres;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core};
pub use postgres_entra::{CacheOptions, Cloud, EntraConnector, Error, TlsRoots, TokenCache};

use tokio_postgres::Client;

/// A bb8 connection manager whose connections log in with Entra ID access tokens.
///
/// `bb8_postgres::PostgresConnectionManager` cannot be wrapped (its fields are private), so this
/// is a small manager of its own; every bb8 builder option (`max_lifetime`, `idle_timeout`,
/// `test_on_check_out`, `retry_connection`, ...) works with it.
#[derive(Debug, Clone)]
pub struct EntraConnectionManager {
    config: tokio_postgres::Config,
    connector: EntraConnector,
}

impl EntraConnectionManager {
    /// A manager connecting with `config` (host, port, database, optionally user) through
    /// `connector` (tokens, TLS, role name). Checks the settings now: `sslmode=disable`, a Unix
    /// socket, `channel_binding=require` or a server in another cloud than the connector's tokens
    /// are errors here rather than at every connect.
    pub fn new(config: tokio_postgres::Config, connector: EntraConnector) -> Result<Self, Error> {
        connector.prepare(&config)?;
        Ok(Self { config, connector })
    }

    /// The connector, e.g. to read its token cache's counters.
    pub fn connector(&self) -> &EntraConnector {
        &self.connector
    }

    /// Opens one connection and closes it: the startup check. bb8's `get()` retries a failing
    /// connect until `connection_timeout` and then reports only `RunError::TimedOut`; this
    /// returns the reason at once: an untrusted certificate, a missing role, an identity
    /// provider that refuses the credential. Call it before building the pool.
    pub async fn check(&self) -> Result<(), Error> {
        let (client, connection) = self.connector.connect(&self.config).await?;
        let task = tokio::spawn(connection);
        client.simple_query("").await?;
        drop(client);
        let _ = task.await;
        Ok(())
    }
}

impl bb8::ManageConnection for EntraConnectionManager {
    type Connection = Client;
    type Error = Error;

    async fn connect(&self) -> Result<Client, Error> {
        match self.connector.connect(&self.config).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "PostgreSQL connection ended with an error");
                    }
                });
                Ok(client)
            }
            Err(error) => {
                // bb8 reports only a timeout to the caller; say here what went wrong.
                tracing::warn!(%error, "bb8 could not open a connection");
                Err(error)
            }
        }
    }

    async fn is_valid(&self, client: &mut Client) -> Result<(), Error> {
        client.simple_query("").await?;
        Ok(())
    }

    fn has_broken(&self, client: &mut Client) -> bool {
        client.is_closed()
    }
}

/// A bb8 error sink that keeps the last connection error.
///
/// bb8's `Pool::get` retries failed connects until `connection_timeout` and then reports only
/// `RunError::TimedOut`, passing each connect error to the error sink; install this sink with
/// `Builder::error_sink` to learn why (for example that no token could be fetched).
#[derive(Debug, Clone, Default)]
pub struct LastErrorSink {
    last: Arc<Mutex<Option<Arc<Error>>>>,
}

impl LastErrorSink {
    /// A new, empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The most recent connection error, if any.
    pub fn last_error(&self) -> Option<Arc<Error>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl bb8::ErrorSink<Error> for LastErrorSink {
    fn sink(&self, error: Error) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(error));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}
