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
#[cfg(feature = "opentelemetry")]
pub use postgres_entra::{metrics::PoolMetrics, opentelemetry};

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
    #[cfg(feature = "opentelemetry")]
    metrics: PoolMetrics,
}

impl EntraConnectionManager {
    /// A manager connecting with `config` (host, port, database, optionally user) through
    /// `connector` (tokens, TLS, role name). Checks the settings now: `sslmode=disable`, a Unix
    /// socket, `channel_binding=require` or a server in another cloud than the connector's tokens
    /// are errors here rather than at every connect.
    pub fn new(config: tokio_postgres::Config, connector: EntraConnector) -> Result<Self, Error> {
        connector.prepare(&config)?;
        Ok(Self {
            #[cfg(feature = "opentelemetry")]
            metrics: PoolMetrics::new(&connector, PoolMetrics::default_name(&config)),
            config,
            connector,
        })
    }

    /// The pool's name in its metrics (`db.client.connection.pool.name`; feature
    /// `opentelemetry`). Default: `host:port/database`, from the connection settings.
    #[cfg(feature = "opentelemetry")]
    #[must_use]
    pub fn pool_name(mut self, name: impl Into<String>) -> Self {
        self.metrics = PoolMetrics::new(&self.connector, name);
        self
    }

    /// Observes `pool` (built with this manager, or a clone of it) as OpenTelemetry metrics
    /// until the returned guard is dropped: `db.client.connection.count` (idle, used),
    /// `db.client.connection.max`, `db.client.connection.pending_requests` and
    /// `db.client.connection.timeouts`, read from bb8's `Pool::state` when metrics are collected.
    /// The connections' `db.client.connection.create_time` is recorded whether or not a pool is
    /// observed.
    ///
    /// The guard holds a handle to the pool (bb8 has no weak one): keep it beside the pool and
    /// drop them together. bb8 has no hook around a checkout and keeps only the total time
    /// checkouts waited, so `wait_time` and `use_time` are not recorded.
    ///
    /// ```no_run
    /// # async fn run(manager: postgres_entra_bb8::EntraConnectionManager) -> Result<(), postgres_entra_bb8::Error> {
    /// let pool = postgres_entra_bb8::bb8::Pool::builder().build(manager.clone()).await?;
    /// let observed = manager.observe(&pool);
    /// # drop(observed);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "opentelemetry")]
    pub fn observe(&self, pool: &bb8::Pool<Self>) -> PoolObservation {
        let slot = Arc::new(Mutex::new(Some(pool.clone())));
        let read = slot.clone();
        self.metrics.observe(move || {
            let pool = read.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
            let state = pool.state();
            let idle = u64::from(state.idle_connections);
            let used = u64::from(state.connections.saturating_sub(state.idle_connections));
            Some(
                postgres_entra::metrics::PoolCounts::new(
                    idle,
                    used,
                    u64::from(pool.config().max_size),
                )
                .pending(state.statistics.pending_gets())
                .timeouts(state.statistics.get_timed_out),
            )
        });
        PoolObservation { slot }
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
        #[cfg(feature = "opentelemetry")]
        let started = std::time::Instant::now();
        match self.connector.connect(&self.config).await {
            Ok((client, connection)) => {
                #[cfg(feature = "opentelemetry")]
                self.metrics.record_create_time(started.elapsed());
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

/// A pool observed as OpenTelemetry metrics (see [`EntraConnectionManager::observe`]); dropping
/// it ends the observation and releases its handle to the pool.
#[cfg(feature = "opentelemetry")]
#[must_use = "the pool is observed only while this guard lives"]
pub struct PoolObservation {
    slot: Arc<Mutex<Option<bb8::Pool<EntraConnectionManager>>>>,
}

#[cfg(feature = "opentelemetry")]
impl std::fmt::Debug for PoolObservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolObservation").finish_non_exhaustive()
    }
}

#[cfg(feature = "opentelemetry")]
impl Drop for PoolObservation {
    fn drop(&mut self) {
        let pool = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(pool);
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
