#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::SystemTime;

use postgres_entra_tokio_postgres::__private::PgLogin;
use postgres_entra_tokio_postgres::postgres_entra::__private::Session;

// The public interface is:
pub use bb8;
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra_tokio_postgres::opentelemetry_0_33;
/// The core crate, for what the adapters share: a token source of your own, its tokens and
/// errors, all with this one dependency.
///
/// ```no_run
/// use postgres_entra_bb8::EntraConnector;
/// use postgres_entra_bb8::postgres_entra::{AccessToken, TokenError, TokenErrorKind, TokenFuture, TokenSource};
/// use std::time::{Duration, SystemTime};
///
/// #[derive(Debug)]
/// struct Vault;
///
/// impl TokenSource for Vault {
///     fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
///         Box::pin(async move {
///             if scope.is_empty() {
///                 return Err(TokenError::new(TokenErrorKind::Other, "no scope"));
///             }
///             Ok(AccessToken::new("eyJ...", SystemTime::now() + Duration::from_secs(3600)))
///         })
///     }
///
///     fn identity(&self) -> String {
///         "vault (orders-api)".to_owned()
///     }
/// }
///
/// let connector = EntraConnector::builder(Vault).build()?;
/// # Ok::<(), postgres_entra_bb8::Error>(())
/// ```
pub use postgres_entra_tokio_postgres::postgres_entra;
#[cfg(feature = "azure")]
pub use postgres_entra_tokio_postgres::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra_tokio_postgres::{
    CacheOptions, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache,
    tokio_postgres,
};

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

    /// When the pool retires this connection, if it retires sessions.
    pub fn retire_at(&self) -> Option<SystemTime> {
        self.session.retire_at()
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

/// A bb8 connection manager whose connections log in with Entra ID access tokens, and are retired
/// once their login token has expired (see [`SessionOptions`]).
///
/// `bb8_postgres::PostgresConnectionManager` cannot be wrapped (its fields are private), so this
/// is a small manager of its own; every bb8 builder option (`max_lifetime`, `idle_timeout`,
/// `test_on_check_out`, `retry_connection`, ...) works with it. Cheap to clone; clones share.
#[derive(Clone)]
pub struct EntraConnectionManager {
    login: Arc<PgLogin>,
}

impl fmt::Debug for EntraConnectionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnectionManager")
            .field("login", &self.login)
            .finish()
    }
}

impl EntraConnectionManager {
    /// A manager connecting with `config` (host, port, database, optionally user) through
    /// `connector`. Checks the settings now: `sslmode=disable`, a Unix socket,
    /// `channel_binding=require` or a server in another cloud than the connector's tokens are
    /// errors here rather than at every connect.
    ///
    /// A connection due for retirement is retired when it is returned, or when it is checked out
    /// (with bb8's default `test_on_check_out`): then it is replaced in place by a new login, so
    /// the checkout gets a fresh connection and never fails because of it. bb8's reaper knows
    /// only its own `max_lifetime` and `idle_timeout`, which also close connections whatever the
    /// identity provider's state.
    pub fn new(
        config: tokio_postgres::Config,
        connector: &EntraConnector,
        options: SessionOptions,
    ) -> Result<Self, Error> {
        Ok(Self {
            login: Arc::new(PgLogin::new(connector, &config, options, None)?),
        })
    }

    /// Opens one connection and closes it: a startup check that reports a permanent mistake at
    /// once, typed (an untrusted certificate, a missing role, a credential the provider
    /// refuses). bb8's own `get()` retries a failing connect until `connection_timeout` and then
    /// says only `TimedOut`.
    pub async fn check(&self) -> Result<(), Error> {
        self.login.check().await
    }

    /// Our error behind a failed checkout: bb8's `get()` reports every failure to open a
    /// connection as `RunError::TimedOut`; this returns why the pool's last connect failed (while
    /// none has succeeded since), or why no token can be had now. `None` when nothing is wrong on
    /// our side (the pool is simply exhausted).
    pub fn explain(&self, error: &bb8::RunError<Error>) -> Option<Error> {
        match error {
            bb8::RunError::User(error) => Some(error.clone()),
            bb8::RunError::TimedOut => self.login.core().explain(),
        }
    }

    /// The token cache this pool's logins use (its counters: [`TokenCache::stats`]).
    pub fn token_cache(&self) -> &TokenCache {
        self.login.core().cache()
    }

    /// Records `pool` (built with this manager, or a clone of it) in its metrics until the
    /// returned guard is dropped: `db.client.connection.count` (idle, used),
    /// `db.client.connection.max`, `.pending_requests` and `.timeouts`, read from bb8's
    /// `Pool::state` when metrics are collected. The connections' `.create_time` and the
    /// sessions' `postgres_entra.connection.retired` and `.oldest_token_age` are recorded whether
    /// or not a pool is observed. Observing again replaces the earlier observation.
    ///
    /// The guard holds a handle to the pool (bb8 has no weak one): keep it beside the pool and
    /// drop them together. bb8 has no hook around a checkout and keeps only the total time
    /// checkouts waited, so `wait_time` and `use_time` are not recorded.
    #[cfg(feature = "opentelemetry_0_33")]
    pub fn observe(&self, pool: &bb8::Pool<Self>) -> PoolObservation {
        use postgres_entra_tokio_postgres::postgres_entra::__private::{PoolCounts, PoolReader};
        let pool = pool.clone();
        let reader: Arc<PoolReader> = Arc::new(move || {
            let state = pool.state();
            Some(PoolCounts {
                idle: u64::from(state.idle_connections),
                used: u64::from(state.connections.saturating_sub(state.idle_connections)),
                max: u64::from(pool.config().max_size),
                pending: Some(state.statistics.pending_gets()),
                timeouts: Some(state.statistics.get_timed_out),
            })
        });
        self.login.core().observe(Arc::downgrade(&reader));
        PoolObservation { _reader: reader }
    }

    /// Opens a connection, logged in, with its session.
    async fn open(&self) -> Result<EntraClient, Error> {
        let (client, connection, session) = self.login.open().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection ended with an error");
            }
        });
        Ok(EntraClient { client, session })
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
        conn.client.simple_query("").await.map(drop).map_err(|e| {
            postgres_entra_tokio_postgres::postgres_entra::__private::connect_error(
                "the pooled connection",
                std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e),
            )
        })
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

/// A pool recorded in metrics (see [`EntraConnectionManager::observe`]); dropping it ends the
/// observation and releases its handle to the pool.
#[cfg(feature = "opentelemetry_0_33")]
#[must_use = "the pool is observed only while this guard lives"]
pub struct PoolObservation {
    _reader: Arc<postgres_entra_tokio_postgres::postgres_entra::__private::PoolReader>,
}

#[cfg(feature = "opentelemetry_0_33")]
impl fmt::Debug for PoolObservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolObservation").finish_non_exhaustive()
    }
}
