#![doc = include_str!("../README.md")]

use deadpool_postgres::{
    Config, Connect, Hook, HookError, Manager, Pool, PoolBuilder, PoolError, Runtime,
};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

// The public interface is:
#[cfg(feature = "azure")]
pub use azure_identity;
pub use deadpool_postgres;
pub use postgres_entra;
pub use postgres_entra::tokio_postgres;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core};
pub use postgres_entra::{
    CacheOptions, Cloud, EntraConnector, Error, TlsRoots, TokenBound, TokenCache,
};
#[cfg(feature = "opentelemetry")]
pub use postgres_entra::{metrics::PoolMetrics, opentelemetry};

mod sessions;

use crate::sessions::Tracker;

/// How the pool retires connections, beyond deadpool's own settings, and names itself in metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    max_age: Option<Duration>,
    max_age_jitter: Duration,
    token_bound: Option<TokenBound>,
    reap_interval: Duration,
    #[cfg(feature = "opentelemetry")]
    pool_name: Option<String>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_age: None,
            max_age_jitter: Duration::ZERO,
            token_bound: Some(TokenBound::default()),
            reap_interval: Duration::from_secs(30),
            #[cfg(feature = "opentelemetry")]
            pool_name: None,
        }
    }
}

impl PoolOptions {
    /// Sessions bounded by their login token ([`TokenBound::default`]: retired up to five
    /// minutes after the token expires), checked every 30 seconds; no other retirement beyond
    /// deadpool's own recycling.
    pub fn new() -> Self {
        Self::default()
    }

    /// Retire each connection once the token it logged in with has expired, as `bound` says
    /// (grace, jitter), or never for `None` (sessions then outlive their token until deadpool
    /// drops them). An idle connection is retired when it is checked out or at the next periodic
    /// check ([`PoolOptions::reap_interval`]), a busy one once it is back in the pool; a checkout
    /// never fails because of it. Default: [`TokenBound::default`].
    #[must_use]
    pub fn token_bound(mut self, bound: Option<TokenBound>) -> Self {
        self.token_bound = bound;
        self
    }

    /// How often idle connections are checked against their token's bound (default 30 s).
    #[must_use]
    pub fn reap_interval(mut self, interval: Duration) -> Self {
        self.reap_interval = interval;
        self
    }

    /// Retire connections when they are recycled once they are older than `max_age` minus up to
    /// `jitter`, chosen per connection so that connections made together do not all go together
    /// (deadpool has no maximum lifetime of its own). `jitter` must not exceed `max_age`.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration, jitter: Duration) -> Self {
        self.max_age = Some(max_age);
        self.max_age_jitter = jitter;
        self
    }

    /// The pool's name in its metrics (`db.client.connection.pool.name`; feature
    /// `opentelemetry`). Default: `host:port/database`, from the connection settings.
    #[cfg(feature = "opentelemetry")]
    #[must_use]
    pub fn pool_name(mut self, name: impl Into<String>) -> Self {
        self.pool_name = Some(name.into());
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.token_bound.is_some() && self.reap_interval.is_zero() {
            return Err(Error::config(
                "a reap_interval of zero would check the pool without pause",
            ));
        }
        match self.max_age {
            Some(age) if age.is_zero() => Err(Error::config(
                "a max_age of zero would retire every connection at once",
            )),
            Some(age) if self.max_age_jitter > age => Err(Error::config(format!(
                "the max_age jitter ({:?}) exceeds the max_age ({age:?})",
                self.max_age_jitter
            ))),
            _ => Ok(()),
        }
    }
}

/// A deadpool-postgres `Connect` that logs every new connection in with an Entra ID token.
#[derive(Clone)]
struct EntraConnect {
    connector: EntraConnector,
    tracker: Arc<Tracker>,
    #[cfg(feature = "opentelemetry")]
    metrics: PoolMetrics,
}

impl fmt::Debug for EntraConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnect")
            .field("connector", &self.connector)
            .finish()
    }
}

impl Connect for EntraConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        (tokio_postgres::Client, JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            #[cfg(feature = "opentelemetry")]
            let started = std::time::Instant::now();
            match self.connector.connect(&pg_config).await {
                Ok((client, connection)) => {
                    #[cfg(feature = "opentelemetry")]
                    self.metrics.record_create_time(started.elapsed());
                    self.tracker.arrived(&connection);
                    let task = tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "PostgreSQL connection ended with an error");
                        }
                    });
                    Ok((client, task))
                }
                Err(error) => {
                    // deadpool shows the carrier's text ("error communicating with the server"),
                    // so say here, where it happens, what went wrong.
                    tracing::warn!(%error, "deadpool-postgres could not open a connection");
                    Err(smuggle(error).await)
                }
            }
        })
    }
}

/// An in-memory stream whose first write fails with our error.
struct FailingStream(Option<Error>);

impl AsyncRead for FailingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FailingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<io::Result<usize>> {
        let error = self
            .0
            .take()
            .map_or_else(|| io::Error::other("closed"), io::Error::other);
        Poll::Ready(Err(error))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Wraps our error in a `tokio_postgres::Error`, which deadpool's `Connect` must return and only
/// tokio-postgres can construct: a startup over a stream that fails with our error yields an I/O
/// error carrying it. [`entra_error`] takes it back out.
async fn smuggle(error: Error) -> tokio_postgres::Error {
    let mut config = tokio_postgres::Config::new();
    config
        .user("postgres-entra")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    match config
        .connect_raw(FailingStream(Some(error)), tokio_postgres::NoTls)
        .await
    {
        Err(carrier) => carrier,
        Ok(_) => unreachable!("a startup over a failing stream cannot succeed"),
    }
}

/// Our typed error inside an error from the pool (or from a connection it made): every failure
/// to open a connection (token, rejected login, TLS, configuration, network, server) carries one.
///
/// deadpool's own `Display` of such an error is `Error occurred while creating a new object:
/// error communicating with the server` whatever happened; this gets the reason:
///
/// ```
/// # fn report(error: deadpool_postgres::PoolError) {
/// match postgres_entra_deadpool::entra_error(&error) {
///     Some(postgres_entra_deadpool::Error::Token(e)) => eprintln!("identity provider: {e}"),
///     Some(other) => eprintln!("database login: {other}"),
///     None => eprintln!("pool: {error}"), // a pool timeout, or the pool was closed
/// }
/// # }
/// ```
pub fn entra_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        // io::Error's own source() skips the error it wraps, so look inside explicitly.
        if let Some(found) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<Error>())
        {
            return Some(found);
        }
        if let Some(PoolError::Backend(backend)) = e.downcast_ref::<PoolError>() {
            next = Some(backend);
            continue;
        }
        next = e.source();
    }
    None
}

/// The pool builder, its `Connect`, and the options the pool is finished with.
fn builder_and_connect(
    config: &Config,
    connector: EntraConnector,
    options: &PoolOptions,
) -> Result<(PoolBuilder, EntraConnect), Error> {
    options.check()?;
    let mut pg_config = config
        .get_pg_config()
        .map_err(|e| Error::config_from(format!("deadpool-postgres configuration: {e}"), e))?;
    if !names_a_user(config) {
        pg_config.user("");
    }
    connector.prepare(&pg_config)?;
    let tracker = Tracker::new(postgres_entra::Sessions::new(options.token_bound));
    let connect = EntraConnect {
        #[cfg(feature = "opentelemetry")]
        metrics: PoolMetrics::new(
            &connector,
            options
                .pool_name
                .clone()
                .unwrap_or_else(|| PoolMetrics::default_name(&pg_config)),
        ),
        connector,
        tracker: tracker.clone(),
    };
    let manager = Manager::from_connect(pg_config, connect.clone(), config.get_manager_config());
    let mut builder = Pool::builder(manager)
        .config(config.get_pool_config())
        .runtime(Runtime::Tokio1)
        .post_create(tracker.hook_post_create());
    if options.token_bound.is_some() {
        builder = builder.pre_recycle(tracker.hook_pre_recycle());
    }
    if let Some(age) = options.max_age {
        builder = builder.pre_recycle(max_age(age, options.max_age_jitter));
    }
    Ok((builder, connect))
}

/// Whether `config` names a user itself (rather than deadpool falling back to `$USER`).
fn names_a_user(config: &Config) -> bool {
    config.user.as_deref().is_some_and(|u| !u.is_empty())
        || config
            .url
            .as_deref()
            .and_then(|url| url.parse::<tokio_postgres::Config>().ok())
            .is_some_and(|url| url.get_user().is_some_and(|u| !u.is_empty()))
}

/// The user's `deadpool_postgres::Config` as a pool whose connections log in with Entra ID
/// tokens: the same `deadpool_postgres::Pool` type, so the rest of the code does not change.
pub fn create_pool(config: &Config, connector: EntraConnector) -> Result<Pool, Error> {
    create_pool_with(config, connector, PoolOptions::default())
}

/// [`create_pool`] with `options`: retirement (`PoolOptions::new().max_age(..)`,
/// [`PoolOptions::token_bound`]) and, with the `opentelemetry` feature, the pool's name in its
/// metrics.
pub fn create_pool_with(
    config: &Config,
    connector: EntraConnector,
    options: PoolOptions,
) -> Result<Pool, Error> {
    create_pool_customized(config, connector, options, |builder| builder)
}

/// [`create_pool_with`], letting `customize` change deadpool's pool builder before the pool is
/// built: hooks of your own (`post_create`, `pre_recycle`, `post_recycle`, which run after this
/// crate's), queue mode, or settings not in your `Config`.
///
/// The connection settings are checked here (TLS, host, cloud): a mistake fails now, not at the
/// first checkout. When the configuration names no user, the role comes from the connector or
/// the token (deadpool would otherwise take `$USER`). Call it within a Tokio runtime: a task of
/// it retires idle connections past their token's bound.
///
/// With the `opentelemetry` feature the pool records, through its connector's meter, under
/// `db.client.connection.pool.name`: `db.client.connection.count` (idle, used),
/// `db.client.connection.max` and `db.client.connection.pending_requests` (read from
/// `Pool::status` when metrics are collected), `db.client.connection.create_time`, and the
/// sessions' `postgres_entra.connection.retired` and `postgres_entra.connection.oldest_token_age`.
/// deadpool keeps no count of checkout timeouts and has no hook around a checkout, so
/// `db.client.connection.timeouts`, `wait_time` and `use_time` are not recorded: a checkout
/// timeout is the `PoolError::Timeout` your code receives.
pub fn create_pool_customized(
    config: &Config,
    connector: EntraConnector,
    options: PoolOptions,
    customize: impl FnOnce(PoolBuilder) -> PoolBuilder,
) -> Result<Pool, Error> {
    let (builder, connect) = builder_and_connect(config, connector, &options)?;
    let pool = customize(builder)
        .build()
        .map_err(|e| Error::config_from(format!("building the deadpool pool: {e}"), e))?;
    if options.token_bound.is_some() {
        connect.tracker.start_reaper(&pool, options.reap_interval);
    }
    #[cfg(feature = "opentelemetry")]
    {
        observe(&pool, &connect.metrics);
        connect.metrics.track(&connect.tracker.sessions);
    }
    Ok(pool)
}

#[cfg(feature = "opentelemetry")]
fn observe(pool: &Pool, metrics: &PoolMetrics) {
    let pool = pool.weak();
    metrics.observe(move || {
        let status = pool.upgrade()?.status();
        let idle = status.available as u64;
        let used = (status.size - status.available) as u64;
        Some(
            postgres_entra::metrics::PoolCounts::new(idle, used, status.max_size as u64)
                .pending(status.waiting as u64),
        )
    });
}

/// A `pre_recycle` hook that retires connections older than `max_age` minus up to `jitter`,
/// chosen per connection, for pools built some other way (ours take [`PoolOptions::max_age`]).
pub fn max_age(max_age: Duration, jitter: Duration) -> Hook {
    let jitter = jitter.min(max_age);
    let hasher = std::collections::hash_map::RandomState::new();
    Hook::sync_fn(move |_client, metrics| {
        let fraction = (hasher.hash_one(metrics.created) % 10_000) as f64 / 10_000.0;
        let limit = max_age - jitter.mul_f64(fraction);
        if metrics.age() >= limit {
            tracing::debug!(
                age_ms = metrics.age().as_millis() as u64,
                "retiring a connection past its maximum age"
            );
            Err(HookError::message("connection reached its maximum age"))
        } else {
            Ok(())
        }
    })
}
