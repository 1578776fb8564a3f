#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

use diesel::ConnectionError;
use diesel::IntoSql as _;
use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use postgres_entra_tokio_postgres::__private::PgLogin;
use postgres_entra_tokio_postgres::postgres_entra::__private::Session;

// The public interface is:
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra_tokio_postgres::opentelemetry_0_33;
/// The core crate, for what the adapters share: a token source of your own, its tokens and
/// errors, all with this one dependency.
///
/// ```no_run
/// use postgres_entra_diesel::EntraConnector;
/// use postgres_entra_diesel::postgres_entra::{AccessToken, TokenError, TokenErrorKind, TokenFuture, TokenSource};
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
/// # Ok::<(), postgres_entra_diesel::Error>(())
/// ```
pub use postgres_entra_tokio_postgres::postgres_entra;
#[cfg(feature = "azure")]
pub use postgres_entra_tokio_postgres::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra_tokio_postgres::{
    CacheOptions, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache,
    tokio_postgres,
};
pub use {bb8, deadpool, diesel, diesel_async};

/// diesel-async's connection manager for `AsyncPgConnection`, as this crate configures it: the
/// manager of both its deadpool and its bb8 pools.
pub type Manager = AsyncDieselConnectionManager<AsyncPgConnection>;
/// diesel-async's deadpool pool of `AsyncPgConnection`s.
pub type DeadpoolPool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;
/// A bb8 pool of `AsyncPgConnection`s.
pub type Bb8Pool = bb8::Pool<Manager>;

/// The logins of diesel-async pools: every new `AsyncPgConnection` logs in through the same
/// connector (shared token cache, TLS verify-full, the role from configuration or claims, the
/// cloud from the host, one retry with a different token after a refused login), and is retired
/// once its login token has expired.
///
/// diesel-async keeps nothing beside a connection but its instrumentation, so each connection
/// carries a small one of this crate's that knows its session (and passes every event on to
/// diesel's default instrumentation, `diesel::connection::set_default_instrumentation`): when it
/// is recycled (deadpool) or tested on checkout (bb8, with its default `test_on_check_out`), a
/// connection past its token's bound is dropped, else checked with diesel-async's `select 1`. A
/// connection whose instrumentation was replaced (`set_instrumentation` on a checked-out
/// connection) can no longer be told, and is retired when recycled. Idle connections are retired
/// when next checked out, or by the pool's own idle timeout. Cheap to clone; clones share.
#[derive(Clone)]
pub struct EntraDiesel {
    inner: Arc<Inner>,
}

struct Inner {
    login: PgLogin,
    /// The session of each open connection, by the key its [`SessionTag`] carries.
    open: Mutex<HashMap<u64, Session>>,
    next_key: AtomicU64,
    /// Whether a connection without its tag was met (said once).
    untagged_said: AtomicBool,
}

/// The instrumentation of each connection: the key of its session, and diesel's default
/// instrumentation, to which every event is passed on.
struct SessionTag {
    key: u64,
    default: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for SessionTag {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let Some(default) = &mut self.default {
            default.on_connection_event(event);
        }
    }
}

impl fmt::Debug for EntraDiesel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraDiesel")
            .field("login", &self.inner.login)
            .field("open", &self.inner.lock_open().len())
            .finish()
    }
}

/// Why a connection is retired when it is recycled.
const RETIRED: &str = "the connection's login token has expired (or it reached its age limit)";

impl EntraDiesel {
    /// The logins of pools connecting with `config` (host, port, database, optionally user)
    /// through `connector`. Checks the settings now: `sslmode=disable`, a Unix socket,
    /// `channel_binding=require` or a server in another cloud than the connector's tokens are
    /// errors here rather than at every connect.
    pub fn new(
        config: tokio_postgres::Config,
        connector: &EntraConnector,
        options: SessionOptions,
    ) -> Result<Self, Error> {
        Ok(Self {
            inner: Arc::new(Inner {
                login: PgLogin::new(connector, &config, options, None)?,
                open: Mutex::default(),
                next_key: AtomicU64::new(0),
                untagged_said: AtomicBool::new(false),
            }),
        })
    }

    /// diesel-async's manager for a deadpool or bb8 pool, its connections logging in through
    /// this: `DeadpoolPool::builder(entra.manager()).max_size(16).build()?`, or
    /// `bb8::Pool::builder().build(entra.manager()).await?`. Connections are recycled as
    /// diesel-async's default `RecyclingMethod::Verified` does; [`EntraDiesel::manager_with`]
    /// takes another method.
    pub fn manager(&self) -> Manager {
        self.manager_with(RecyclingMethod::Verified)
    }

    /// [`EntraDiesel::manager`] with your recycling method, as diesel-async's `ManagerConfig`
    /// takes it: a connection past its token's bound is retired first, then `recycling` runs
    /// (`Fast`: nothing more; `Verified`: `select 1`; `CustomQuery`; `CustomFunction`: yours).
    /// The rest of `ManagerConfig` is the connect itself (`custom_setup`), which this crate
    /// makes; for a step after each connect, use your pool's hook (deadpool's `post_create`,
    /// bb8's `connection_customizer`).
    pub fn manager_with(&self, recycling: RecyclingMethod<AsyncPgConnection>) -> Manager {
        let mut config = ManagerConfig::default();
        let setup = self.inner.clone();
        config.custom_setup = Box::new(move |_url| Box::pin(setup.clone().open()));
        let recycle = self.inner.clone();
        let recycling = Arc::new(recycling);
        config.recycling_method = RecyclingMethod::CustomFunction(Box::new(move |connection| {
            let inner = recycle.clone();
            let recycling = recycling.clone();
            let key = connection
                .instrumentation()
                .downcast_ref::<SessionTag>()
                .map(|tag| tag.key);
            Box::pin(async move {
                if inner.retire(key) {
                    return Err(diesel::result::Error::QueryBuilderError(RETIRED.into()));
                }
                match &*recycling {
                    RecyclingMethod::Fast => Ok(()),
                    // diesel-async's own check.
                    RecyclingMethod::Verified => {
                        diesel::select(1_i32.into_sql::<diesel::sql_types::Integer>())
                            .get_result::<i32>(connection)
                            .await
                            .map(drop)
                    }
                    RecyclingMethod::CustomQuery(query) => diesel::sql_query(query.as_ref())
                        .execute(connection)
                        .await
                        .map(drop),
                    RecyclingMethod::CustomFunction(check) => check(connection).await,
                }
            })
        }));
        // diesel-async's manager connects with `custom_setup`; the URL is not used.
        Manager::new_with_config("postgres://postgres-entra", config)
    }

    /// Opens one connection and closes it: a startup check that reports a permanent mistake at
    /// once, typed (an untrusted certificate, a missing role, a credential the provider refuses).
    pub async fn check(&self) -> Result<(), Error> {
        self.inner.login.check().await
    }

    /// Our error behind a failed checkout from a pool of [`manager`](Self::manager):
    /// diesel-async carries a failed connect as text (`ConnectionError::BadConnection`), and bb8
    /// reports every failed connect as `TimedOut`. For a deadpool or bb8 pool error this returns
    /// why the pool's last connect failed (while none has succeeded since), or why no token can be
    /// had now; `None` when nothing is wrong on our side (the pool is simply exhausted, or
    /// closed).
    pub fn explain(&self, error: &(dyn std::error::Error + 'static)) -> Option<Error> {
        use deadpool::managed;
        use diesel_async::pooled_connection::PoolError;
        use diesel_async::pooled_connection::deadpool::PoolError as DeadpoolError;
        let ours = match error.downcast_ref::<DeadpoolError>() {
            Some(managed::PoolError::Backend(_) | managed::PoolError::Timeout(_)) => true,
            Some(_) => false,
            None => error.is::<bb8::RunError<PoolError>>() || error.is::<PoolError>(),
        };
        if ours {
            self.inner.login.core().explain()
        } else {
            None
        }
    }

    /// The token cache this pool's logins use (its counters: [`TokenCache::stats`]).
    pub fn token_cache(&self) -> &TokenCache {
        self.inner.login.core().cache()
    }

    /// Records `pool` (built on [`manager`](Self::manager): a [`DeadpoolPool`] or a [`Bb8Pool`])
    /// in its metrics until the returned guard is dropped: `db.client.connection.count` (idle,
    /// used), `db.client.connection.max`, `.pending_requests`, and bb8's `.timeouts`, read from
    /// the pool when metrics are collected. The connections' `.create_time` and the sessions'
    /// `postgres_entra.connection.retired` and `.oldest_token_age` are recorded whether or not a
    /// pool is observed. Observing again replaces the earlier observation.
    ///
    /// The guard of a bb8 pool holds a handle to it (bb8 has no weak one): keep the guard beside
    /// the pool and drop them together.
    #[cfg(feature = "opentelemetry_0_33")]
    pub fn observe(&self, pool: &impl ObservablePool) -> PoolObservation {
        let reader = pool.reader();
        self.inner.login.core().observe(Arc::downgrade(&reader));
        PoolObservation { _reader: reader }
    }
}

#[cfg(feature = "opentelemetry_0_33")]
use postgres_entra_tokio_postgres::postgres_entra::__private::{PoolCounts, PoolReader};

/// A pool [`EntraDiesel::observe`] reads: [`DeadpoolPool`] and [`Bb8Pool`]. Sealed.
#[cfg(feature = "opentelemetry_0_33")]
pub trait ObservablePool: sealed::Sealed {
    #[doc(hidden)]
    fn reader(&self) -> Arc<PoolReader>;
}

#[cfg(feature = "opentelemetry_0_33")]
mod sealed {
    pub trait Sealed {}
    impl Sealed for super::DeadpoolPool {}
    impl Sealed for super::Bb8Pool {}
}

#[cfg(feature = "opentelemetry_0_33")]
impl ObservablePool for DeadpoolPool {
    fn reader(&self) -> Arc<PoolReader> {
        let weak = self.weak();
        Arc::new(move || {
            let status = weak.upgrade()?.status();
            Some(PoolCounts {
                idle: status.available as u64,
                used: status.size.saturating_sub(status.available) as u64,
                max: status.max_size as u64,
                pending: Some(status.waiting as u64),
                timeouts: None,
            })
        })
    }
}

#[cfg(feature = "opentelemetry_0_33")]
impl ObservablePool for Bb8Pool {
    fn reader(&self) -> Arc<PoolReader> {
        let pool = self.clone();
        Arc::new(move || {
            let state = pool.state();
            Some(PoolCounts {
                idle: u64::from(state.idle_connections),
                used: u64::from(state.connections.saturating_sub(state.idle_connections)),
                max: u64::from(pool.config().max_size),
                pending: Some(state.statistics.pending_gets()),
                timeouts: Some(state.statistics.get_timed_out),
            })
        })
    }
}

/// A pool recorded in metrics (see [`EntraDiesel::observe`]); dropping it ends the observation.
#[cfg(feature = "opentelemetry_0_33")]
#[must_use = "the pool is observed only while this guard lives"]
pub struct PoolObservation {
    _reader: Arc<PoolReader>,
}

#[cfg(feature = "opentelemetry_0_33")]
impl fmt::Debug for PoolObservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolObservation").finish_non_exhaustive()
    }
}

impl Inner {
    fn lock_open(&self) -> MutexGuard<'_, HashMap<u64, Session>> {
        // One insert or remove at a time: consistent across a panic elsewhere.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: logged in, its session kept under the key its instrumentation carries
    /// until the task driving it ends.
    async fn open(self: Arc<Self>) -> Result<AsyncPgConnection, ConnectionError> {
        let bad = |error: Error| ConnectionError::BadConnection(error.to_string());
        let (client, connection, session) = self.login.open().await.map_err(bad)?;
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.lock_open().insert(key, session);
        let forget: Weak<Inner> = Arc::downgrade(&self);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection ended with an error");
            }
            if let Some(inner) = forget.upgrade() {
                inner.lock_open().remove(&key);
            }
        });
        let mut connection = AsyncPgConnection::try_from(client).await?;
        connection.set_instrumentation(SessionTag {
            key,
            default: diesel::connection::get_default_instrumentation(),
        });
        Ok(connection)
    }

    /// Whether the connection whose session has `key` is due for retirement (then counted and
    /// forgotten); a connection without its key cannot be told, and is retired.
    fn retire(&self, key: Option<u64>) -> bool {
        let Some(key) = key else {
            if !self.untagged_said.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "a pooled diesel connection's instrumentation was replaced, so postgres-entra cannot tell the token it logged in with: it is retired when recycled. Set instrumentation with diesel::connection::set_default_instrumentation instead"
                );
            }
            return true;
        };
        let core = self.login.core();
        let now = core.now();
        // Only the session's own times under the lock; asking whether it may go (which may log)
        // and counting it, outside.
        let past_due = self
            .lock_open()
            .get(&key)
            .is_some_and(|session| session.is_past_due(now));
        if !past_due || !core.may_retire() {
            return false;
        }
        let session = self.lock_open().remove(&key);
        if let Some(session) = session {
            session.retired();
        }
        true
    }
}
