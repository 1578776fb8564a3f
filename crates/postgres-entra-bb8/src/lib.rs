#![doc = include_str!("../README.md")]

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

// The public interface is:
#[cfg(feature = "azure")]
pub use azure_identity;
pub use bb8;
pub use postgres_entra;
pub use postgres_entra::tokio_postgres;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core};
pub use postgres_entra::{
    CacheOptions, Cloud, EntraConnector, Error, TlsRoots, TokenBound, TokenCache,
};
#[cfg(feature = "opentelemetry")]
pub use postgres_entra::{metrics::PoolMetrics, opentelemetry};

use postgres_entra::{Session, Sessions};
use tokio_postgres::Client;

/// A connection of the pool: a `tokio_postgres::Client` (it dereferences to one, so
/// `conn.query(..)`, `&*conn` where a `&Client` is wanted, and `conn.transaction()` work as with
/// `bb8-postgres`), with the login token's expiry the pool retires it by.
pub struct EntraClient {
    client: Client,
    session: Session,
}

impl EntraClient {
    /// When the token this connection logged in with expires.
    pub fn token_expires_on(&self) -> SystemTime {
        self.session.token_expires_on()
    }

    /// When the pool retires this connection (if its manager bounds sessions by their token).
    pub fn retire_at(&self) -> Option<SystemTime> {
        self.session.retire_at()
    }

    /// The `tokio_postgres::Client`, out of the pool's accounting.
    pub fn into_inner(self) -> Client {
        self.client
    }
}

impl Deref for EntraClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for EntraClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl AsRef<Client> for EntraClient {
    fn as_ref(&self) -> &Client {
        &self.client
    }
}

/// For code generic over bb8 managers of `Client`s (`bb8-postgres`'s and this one):
/// `M::Connection: Borrow<Client>` holds for both.
impl std::borrow::Borrow<Client> for EntraClient {
    fn borrow(&self) -> &Client {
        &self.client
    }
}

impl fmt::Debug for EntraClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraClient")
            .field("closed", &self.client.is_closed())
            .field("session", &self.session)
            .finish()
    }
}

/// A bb8 connection manager whose connections log in with Entra ID access tokens.
///
/// `bb8_postgres::PostgresConnectionManager` cannot be wrapped (its fields are private), so this
/// is a small manager of its own; every bb8 builder option (`max_lifetime`, `idle_timeout`,
/// `test_on_check_out`, `retry_connection`, ...) works with it.
#[derive(Debug, Clone)]
pub struct EntraConnectionManager {
    config: tokio_postgres::Config,
    connector: EntraConnector,
    sessions: Sessions,
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
            sessions: Sessions::new(Some(TokenBound::default())),
        })
    }

    /// Retire each connection once the token it logged in with has expired, as `bound` says
    /// (grace, jitter), or never for `None` (sessions then outlive their token until bb8 drops
    /// them). Default: [`TokenBound::default`]. Set it before building the pool.
    ///
    /// A connection is retired when it is returned, or when it is checked out (with bb8's
    /// default `test_on_check_out`): then it is replaced in place by a new login, so the checkout
    /// gets a fresh connection and never fails because of it (only a failing new login is an
    /// error, as for any new connection). bb8's reaper knows only `max_lifetime` and
    /// `idle_timeout`: an idle connection nobody checks out stays open until one of them (or a
    /// checkout) ends it, so set `idle_timeout` to bound idle sessions too.
    #[must_use]
    pub fn token_bound(mut self, bound: Option<TokenBound>) -> Self {
        self.sessions = Sessions::new(bound);
        self
    }

    /// The pool's open connections and the tokens they logged in with.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
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
        self.metrics.track(&self.sessions);
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

    /// Opens a connection, logged in and registered with the pool's sessions.
    async fn open(&self) -> Result<EntraClient, Error> {
        #[cfg(feature = "opentelemetry")]
        let started = std::time::Instant::now();
        match self.connector.connect(&self.config).await {
            Ok((client, connection)) => {
                #[cfg(feature = "opentelemetry")]
                self.metrics.record_create_time(started.elapsed());
                let session = self.sessions.open(
                    connection.token_received_at(),
                    connection.token_expires_on(),
                );
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "PostgreSQL connection ended with an error");
                    }
                });
                Ok(EntraClient { client, session })
            }
            Err(error) => {
                // bb8 reports only a timeout to the caller; say here what went wrong.
                tracing::warn!(%error, "bb8 could not open a connection");
                Err(error)
            }
        }
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
    type Connection = EntraClient;
    type Error = Error;

    async fn connect(&self) -> Result<EntraClient, Error> {
        self.open().await
    }

    async fn is_valid(&self, conn: &mut EntraClient) -> Result<(), Error> {
        if conn.session.is_due() {
            // Replaced in place: bb8 would report a failed check to its error sink, and a
            // retirement is not an error.
            conn.session.retired();
            *conn = self.open().await?;
            return Ok(());
        }
        conn.client.simple_query("").await?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut EntraClient) -> bool {
        if conn.client.is_closed() {
            return true;
        }
        if conn.session.is_due() {
            conn.session.retired();
            return true;
        }
        false
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
