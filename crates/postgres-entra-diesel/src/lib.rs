#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

use diesel::ConnectionError;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use postgres_entra_tokio_postgres::__private::PgLogin;
use postgres_entra_tokio_postgres::postgres_entra::__private::Session;

// The public interface is:
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra_tokio_postgres::opentelemetry_0_33;
#[cfg(feature = "azure")]
pub use postgres_entra_tokio_postgres::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra_tokio_postgres::{
    CacheOptions, Cloud, EntraConnector, Error, PoolOptions, TlsRoots, TokenCache, tokio_postgres,
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
/// diesel-async keeps nothing beside a connection, so a connection is known by its server
/// process id: when it is recycled (deadpool) or tested on checkout (bb8, with its default
/// `test_on_check_out`), `select pg_backend_pid()` (in place of diesel-async's `select 1`) finds
/// the token it logged in with, and a connection past its token's bound is dropped. Idle
/// connections are retired when next checked out, or by the pool's own idle timeout. Cheap to
/// clone; clones share.
#[derive(Clone)]
pub struct EntraDiesel {
    inner: Arc<Inner>,
}

struct Inner {
    login: PgLogin,
    /// The session of each open connection, by its server process id, with a serial number.
    open: Mutex<HashMap<i32, (u64, Session)>>,
    serial: AtomicU64,
}

impl fmt::Debug for EntraDiesel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraDiesel")
            .field("login", &self.inner.login)
            .field("open", &self.inner.lock_open().len())
            .finish()
    }
}

/// SQL functions the recycle check calls (in a private module: the macro makes its items public).
mod sql {
    diesel::define_sql_function! {
        /// PostgreSQL's `pg_backend_pid()`: the server process of this connection.
        fn pg_backend_pid() -> diesel::sql_types::Integer;
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
        options: PoolOptions,
    ) -> Result<Self, Error> {
        Ok(Self {
            inner: Arc::new(Inner {
                login: PgLogin::new(connector, &config, options, None)?,
                open: Mutex::default(),
                serial: AtomicU64::new(0),
            }),
        })
    }

    /// diesel-async's manager for a deadpool or bb8 pool, its connections logging in through
    /// this: `DeadpoolPool::builder(entra.manager()).max_size(16).build()?`, or
    /// `bb8::Pool::builder().build(entra.manager()).await?`.
    pub fn manager(&self) -> Manager {
        let mut config = ManagerConfig::default();
        let setup = self.inner.clone();
        config.custom_setup = Box::new(move |_url| Box::pin(setup.clone().open()));
        let recycle = self.inner.clone();
        config.recycling_method = RecyclingMethod::CustomFunction(Box::new(move |connection| {
            let inner = recycle.clone();
            Box::pin(async move {
                // A function with a static query id: its prepared statement is cached, so the
                // check costs one round trip, as diesel-async's own `select 1` does.
                let pid: i32 = diesel::select(sql::pg_backend_pid())
                    .get_result(connection)
                    .await?;
                if inner.retire(pid) {
                    Err(diesel::result::Error::QueryBuilderError(RETIRED.into()))
                } else {
                    Ok(())
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
}

impl Inner {
    fn lock_open(&self) -> MutexGuard<'_, HashMap<i32, (u64, Session)>> {
        // One insert or remove at a time: consistent across a panic elsewhere.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection: logged in, its session kept under its server process id until the
    /// task driving it ends.
    async fn open(self: Arc<Self>) -> Result<AsyncPgConnection, ConnectionError> {
        let bad = |error: Error| ConnectionError::BadConnection(error.to_string());
        let (client, connection, session) = self.login.open().await.map_err(bad)?;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
        let forget: Weak<Inner> = Arc::downgrade(&self);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection ended with an error");
            }
            if let (Ok(pid), Some(inner)) = (pid_rx.await, forget.upgrade()) {
                let mut open = inner.lock_open();
                // A later connection may have the same process id: forget only this one.
                if open.get(&pid).is_some_and(|(s, _)| *s == serial) {
                    open.remove(&pid);
                }
            }
        });
        // The simple protocol: one round trip, no statement prepared.
        let pid = client
            .simple_query("select pg_backend_pid()")
            .await
            .ok()
            .and_then(|messages| {
                messages.into_iter().find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
                    _ => None,
                })
            })
            .ok_or_else(|| {
                ConnectionError::BadConnection(
                    "the new connection did not tell its server process id".to_owned(),
                )
            })?;
        self.lock_open().insert(pid, (serial, session));
        let _ = pid_tx.send(pid);
        AsyncPgConnection::try_from(client).await
    }

    /// Whether the connection with server process id `pid` is due for retirement (then counted
    /// and forgotten).
    fn retire(&self, pid: i32) -> bool {
        let mut open = self.lock_open();
        let due = open.get(&pid).is_some_and(|(_, session)| session.is_due());
        if due && let Some((_, session)) = open.remove(&pid) {
            session.retired();
        }
        due
    }
}
