#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

use deadpool::Runtime;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::{ClientWrapper, ManagerConfig, RecyclingMethod, StatementCache};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use postgres_entra_tokio_postgres::__private::PgLogin;
use postgres_entra_tokio_postgres::postgres_entra::__private::{Session, config_error};

// The public interface is:
pub use deadpool_postgres;
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra_tokio_postgres::opentelemetry_0_33;
/// The core crate, for what the adapters share: a token source of your own, its tokens and
/// errors, all with this one dependency.
///
/// ```no_run
/// use postgres_entra_deadpool::EntraConnector;
/// use postgres_entra_deadpool::postgres_entra::{AccessToken, TokenError, TokenErrorKind, TokenFuture, TokenSource};
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
/// # Ok::<(), postgres_entra_deadpool::Error>(())
/// ```
pub use postgres_entra_tokio_postgres::postgres_entra;
#[cfg(feature = "azure")]
pub use postgres_entra_tokio_postgres::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra_tokio_postgres::{
    CacheOptions, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache,
    tokio_postgres,
};
/// The pool: deadpool's, over this crate's [`Manager`].
pub type Pool = managed::Pool<Manager>;
/// A connection checked out of the [`Pool`]; dereferences to an [`EntraClient`].
pub type Object = managed::Object<Manager>;
/// What [`Pool::get`](managed::Pool::get) fails with: [`PoolError::Backend`](managed::PoolError)
/// carries this crate's [`Error`].
pub type PoolError = managed::PoolError<Error>;
/// deadpool's builder for a [`Pool`] (for [`create_pool_with`]).
pub type PoolBuilder = managed::PoolBuilder<Manager>;
/// A hook for [`PoolBuilder::post_create`](managed::PoolBuilder), `pre_recycle` or `post_recycle`.
pub type Hook = managed::Hook<Manager>;

/// A connection of the pool: deadpool-postgres's `ClientWrapper` (it dereferences to one, so
/// `prepare_cached`, `transaction()` and every `tokio_postgres::Client` method work as with
/// deadpool-postgres), with the login token's expiry the pool retires it by.
pub struct EntraClient {
    client: ClientWrapper,
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

    /// The `tokio_postgres::Client`, for code generic over `tokio_postgres::GenericClient`
    /// (deadpool-postgres's own `GenericClient` is sealed to its own pool's objects).
    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }
}

impl Deref for EntraClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl DerefMut for EntraClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
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

/// A deadpool manager whose connections log in with Entra ID access tokens, recycled as
/// deadpool-postgres recycles them (`RecyclingMethod`), and retired once their login token has
/// expired (see [`SessionOptions`]).
pub struct Manager {
    login: PgLogin,
    recycling: RecyclingMethod,
    statement_caches: Mutex<Vec<Weak<StatementCache>>>,
    #[cfg(feature = "opentelemetry_0_33")]
    reader: std::sync::OnceLock<
        Arc<postgres_entra_tokio_postgres::postgres_entra::__private::PoolReader>,
    >,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("login", &self.login)
            .field("recycling", &self.recycling)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager for the pool `config` describes, logging in through `connector`. Checks the
    /// settings now: `sslmode=disable`, a Unix socket, `channel_binding=require` or a server in
    /// another cloud than the connector's tokens are errors here rather than at every connect.
    /// When the configuration names no user, the role comes from the connector or the token
    /// (deadpool-postgres would otherwise take `$USER`).
    pub fn new(
        config: &deadpool_postgres::Config,
        connector: &EntraConnector,
        options: SessionOptions,
    ) -> Result<Self, Error> {
        let mut pg_config = config
            .get_pg_config()
            .map_err(|e| config_error(format!("deadpool-postgres configuration: {e}")))?;
        if !names_a_user(config) {
            pg_config.user("");
        }
        let create_limit = config.get_pool_config().timeouts.create;
        Ok(Self::with(
            PgLogin::new(connector, &pg_config, options, create_limit)?,
            config.get_manager_config(),
        ))
    }

    /// A manager over `pg_config` with `manager_config`'s recycling, as deadpool-postgres's
    /// `Manager::from_config` makes one, for a pool you build with `Pool::builder(manager)`. The
    /// settings are checked as [`Manager::new`] checks them. The pool's create timeout, set on
    /// the builder, is not known here: a login waits up to 30 s for the identity provider (a
    /// pool from [`create_pool`] waits up to its create timeout).
    pub fn from_config(
        pg_config: tokio_postgres::Config,
        connector: &EntraConnector,
        manager_config: ManagerConfig,
        options: SessionOptions,
    ) -> Result<Self, Error> {
        Ok(Self::with(
            PgLogin::new(connector, &pg_config, options, None)?,
            manager_config,
        ))
    }

    fn with(login: PgLogin, manager_config: ManagerConfig) -> Self {
        Self {
            login,
            recycling: manager_config.recycling_method,
            statement_caches: Mutex::default(),
            #[cfg(feature = "opentelemetry_0_33")]
            reader: std::sync::OnceLock::new(),
        }
    }

    /// Opens one connection and closes it: a startup check that reports a permanent mistake at
    /// once, typed (an untrusted certificate, a missing role, a credential the provider refuses).
    pub async fn check(&self) -> Result<(), Error> {
        self.login.check().await
    }

    /// Our error behind a failed checkout: the one it carries
    /// ([`PoolError::Backend`](managed::PoolError)), else (a deadpool timeout) why the pool's last
    /// connect failed, or why no token can be had now. `None` when nothing is wrong on our side
    /// (the pool is simply exhausted, or closed).
    pub fn explain(&self, error: &PoolError) -> Option<Error> {
        match error {
            managed::PoolError::Backend(error) => Some(error.clone()),
            managed::PoolError::Timeout(_) => self.login.core().explain(),
            _ => None,
        }
    }

    /// The token cache this pool's logins use (its counters: [`TokenCache::stats`]).
    pub fn token_cache(&self) -> &TokenCache {
        self.login.core().cache()
    }

    /// Clears the prepared statements cached for every connection of the pool (e.g. after a
    /// schema change), as deadpool-postgres's `StatementCaches::clear` does for its pools.
    pub fn clear_statement_caches(&self) {
        let mut caches = self
            .statement_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        caches.retain(|cache| match cache.upgrade() {
            Some(cache) => {
                cache.clear();
                true
            }
            None => false,
        });
    }
}

impl managed::Manager for Manager {
    type Type = EntraClient;
    type Error = Error;

    async fn create(&self) -> Result<EntraClient, Error> {
        let (client, connection, session) = self.login.open().await?;
        let task = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection ended with an error");
            }
        });
        let client = ClientWrapper::new(client, task);
        let mut caches = self
            .statement_caches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        caches.retain(|cache| cache.strong_count() > 0);
        caches.push(Arc::downgrade(&client.statement_cache));
        Ok(EntraClient { client, session })
    }

    async fn recycle(&self, object: &mut EntraClient, _: &Metrics) -> RecycleResult<Error> {
        if object.client.is_closed() {
            return Err(RecycleError::message("Connection closed"));
        }
        if object.session.is_due() {
            object.session.retired();
            return Err(RecycleError::message(
                "the connection's login token has expired (or it reached its age limit)",
            ));
        }
        if let Some(sql) = self.recycling.query() {
            object
                .client
                .simple_query(sql)
                .await
                .map_err(|e| RecycleError::message(format!("the recycling query failed: {e}")))?;
        }
        Ok(())
    }
}

/// Whether `config` names a user itself (rather than deadpool-postgres falling back to `$USER`).
fn names_a_user(config: &deadpool_postgres::Config) -> bool {
    config.user.as_deref().is_some_and(|u| !u.is_empty())
        || config
            .url
            .as_deref()
            .and_then(|url| url.parse::<tokio_postgres::Config>().ok())
            .is_some_and(|url| url.get_user().is_some_and(|u| !u.is_empty()))
}

/// Your `deadpool_postgres::Config` (loaded from env or serde, as today) as a pool whose
/// connections log in with Entra ID tokens from `connector`. The settings are checked now (TLS,
/// host, cloud: see [`Manager::new`]); idle connections past their token are retired every
/// [`SessionOptions::reap_interval`] by a task that ends with the pool. Call it within a Tokio
/// runtime.
///
/// With feature `opentelemetry_0_33`, the pool is recorded under its name
/// (`db.client.connection.pool.name`, [`SessionOptions::pool_name`]): `db.client.connection.count`
/// (idle, used), `.max` and `.pending_requests` (read from `Pool::status` when metrics are
/// collected), `.create_time`, and `postgres_entra.connection.retired` and `.oldest_token_age`.
/// deadpool keeps no count of checkout timeouts and has no hook around a checkout, so
/// `db.client.connection.timeouts`, `wait_time` and `use_time` are not recorded.
pub fn create_pool(
    config: &deadpool_postgres::Config,
    connector: &EntraConnector,
    options: SessionOptions,
) -> Result<Pool, Error> {
    create_pool_with(config, connector, options, |builder| builder)
}

/// [`create_pool`], letting `customize` change deadpool's pool builder before the pool is built:
/// hooks of your own (`post_create`, `pre_recycle`, `post_recycle`), queue mode, or settings not
/// in your `Config`.
pub fn create_pool_with(
    config: &deadpool_postgres::Config,
    connector: &EntraConnector,
    options: SessionOptions,
    customize: impl FnOnce(PoolBuilder) -> PoolBuilder,
) -> Result<Pool, Error> {
    let manager = Manager::new(config, connector, options)?;
    let builder = Pool::builder(manager)
        .config(config.get_pool_config())
        .runtime(Runtime::Tokio1);
    let pool = customize(builder)
        .build()
        .map_err(|e| config_error(format!("building the deadpool pool: {e}")))?;
    // The create timeout as the pool has it, after `customize`.
    let core = pool.manager().login.core();
    core.set_create_limit(pool.timeouts().create);
    #[cfg(feature = "opentelemetry_0_33")]
    observe(&pool);
    if pool.manager().login.core().retires_sessions() {
        start_reaper(&pool);
    }
    Ok(pool)
}

/// Records the pool's counts for its metrics, read through a weak handle.
#[cfg(feature = "opentelemetry_0_33")]
fn observe(pool: &Pool) {
    use postgres_entra_tokio_postgres::postgres_entra::__private::{PoolCounts, PoolReader};
    let weak = pool.weak();
    let reader: Arc<PoolReader> = Arc::new(move || {
        let status = weak.upgrade()?.status();
        Some(PoolCounts {
            idle: status.available as u64,
            used: (status.size - status.available) as u64,
            max: status.max_size as u64,
            pending: Some(status.waiting as u64),
            timeouts: None,
        })
    });
    let manager = pool.manager();
    manager.login.core().observe(Arc::downgrade(&reader));
    let _ = manager.reader.set(reader);
}

/// One round of the reaper: retires the idle connections due for retirement.
fn reap(pool: &Pool) {
    let core = pool.manager().login.core();
    // Asked before deadpool's lock is taken (it may log and start a token request): under the
    // lock, only the sessions' own times are read.
    if !core.may_retire() {
        return;
    }
    let now = core.now();
    let retired = pool.retain(|object, _| !object.session.is_past_due(now));
    for object in &retired.removed {
        object.session.retired();
    }
    if !retired.removed.is_empty() {
        tracing::debug!(
            retired = retired.removed.len(),
            "retired idle connections whose login token expired"
        );
    }
}

/// Retires idle connections due for retirement every reap interval, for as long as the pool
/// lives (deadpool has no reaper of its own). Without a Tokio runtime, connections are retired at
/// checkout only.
fn start_reaper(pool: &Pool) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "no Tokio runtime when the pool was built: idle connections past their login token are retired at checkout only"
        );
        return;
    };
    let interval = pool.manager().login.core().reap_interval();
    let pool = pool.weak();
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            // A round that panics (in a log sink the application set up, say) is only that
            // round: the reaper lives as long as the pool.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reap(&pool)));
        }
    });
}
