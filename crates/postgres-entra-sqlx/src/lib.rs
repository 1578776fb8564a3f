#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};
use std::collections::VecDeque;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use postgres_entra::__private::{
    Entry, PoolCore, config_error, connect_error, flatten, postgres_error, roots_pem, tls_declined,
    tls_error,
};
use postgres_entra::{LoginRetry, RoleSource};

mod responder;

use crate::responder::Responder;

// The public interface is:
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra::opentelemetry_0_33;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra::{
    CacheOptions, Cloud, EntraConnector, Error, PoolOptions, TlsRoots, TokenCache,
};
pub use {postgres_entra, sqlx};

/// After a token's refresh point, how often the task looks whether a new token arrived.
const POLL: Duration = Duration::from_millis(250);
/// How many tokens the pool remembers having logged in with, to tell each connection's.
const HISTORY: usize = 8;

/// A `sqlx::PgPool` whose new connections log in with Entra ID access tokens.
///
/// It dereferences to the `PgPool`: `pool.acquire()`, `pool.begin()` and functions taking a
/// `&PgPool` work as before; where sqlx wants an executor, pass `&*pool`
/// (`sqlx::query("select 1").fetch_one(&*pool)`). Cheap to clone; clones share the pool.
///
/// sqlx takes the password from the pool's connect options, so a task keeps them current: it
/// puts each new token from the cache in them before the previous one stops being usable, and
/// when no usable token can be had it points them at a private local socket that answers every
/// connect with why (SQLSTATE 08001, `postgres-entra: no new connection for pool …`), so that
/// no connect presents an expired token. The task ends when the pool is closed or the last handle
/// dropped. `PgPool::connect_options()` holds the current token, and sqlx's `Debug` of those
/// options prints it: never print them.
#[derive(Clone)]
pub struct EntraPgPool {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    core: PoolCore,
    /// The settings without a token.
    base: PgConnectOptions,
    /// The tokens the options held, newest last: when each was put in, received and expires.
    history: Mutex<VecDeque<Installed>>,
    responder: Responder,
    /// When the pool was made: connections' creation instants are read from it (their share of
    /// jitter).
    born: Instant,
    refresher: Mutex<Option<tokio::task::AbortHandle>>,
    #[cfg(feature = "opentelemetry_0_33")]
    _reader: Arc<postgres_entra::__private::PoolReader>,
}

#[derive(Debug, Clone, Copy)]
struct Installed {
    at: SystemTime,
    received_at: SystemTime,
    expires_on: SystemTime,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.refresher).take() {
            task.abort();
        }
        // A `PgPool` cloned out of the last handle may live on without the task: leave it no
        // token that could expire in its options.
        self.pool
            .set_connect_options(self.responder.options(&self.base));
    }
}

impl fmt::Debug for EntraPgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the connect options: they hold the token.
        f.debug_struct("EntraPgPool")
            .field("size", &self.shared.pool.size())
            .field("num_idle", &self.shared.pool.num_idle())
            .field("is_closed", &self.shared.pool.is_closed())
            .field("core", &self.shared.core)
            .finish_non_exhaustive()
    }
}

impl Deref for EntraPgPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.shared.pool
    }
}

impl AsRef<PgPool> for EntraPgPool {
    fn as_ref(&self) -> &PgPool {
        &self.shared.pool
    }
}

impl EntraPgPool {
    /// Opens one connection with the pool's current settings and closes it: a startup check
    /// that reports a permanent mistake at once, typed (an untrusted certificate, a missing role,
    /// a credential the provider refuses).
    pub async fn check(&self) -> Result<(), Error> {
        let shared = &self.shared;
        let entry = postgres_entra::__private::entry(shared.core.cache())
            .await
            .map_err(Error::Token)?;
        let options = with_token(&shared.base, &shared.core, &entry)?;
        match options.connect().await {
            Ok(connection) => {
                let _ = connection.close().await;
                Ok(())
            }
            Err(error) => Err(shared
                .explain(&error)
                .unwrap_or_else(|| postgres_error(None, flatten(&error)))),
        }
    }

    /// Our error behind a failed checkout or query, where there is one: why no token could be
    /// had (sqlx reports it as the local answer, SQLSTATE 08001, or as `PoolTimedOut`), a refused
    /// login (28000, 28P01) with what the token says, a server that declined TLS or a certificate
    /// that did not verify, a server that could not be reached. `None` for errors that are not
    /// about connecting (a failed query).
    pub fn explain(&self, error: &sqlx::Error) -> Option<Error> {
        self.shared.explain(error)
    }

    /// The token cache this pool's logins use (its counters: [`TokenCache::stats`]).
    pub fn token_cache(&self) -> &TokenCache {
        self.shared.core.cache()
    }

    /// Whether the task that keeps the connect options current still runs (it ends when the pool
    /// is closed or the last handle dropped).
    pub fn is_refreshing(&self) -> bool {
        lock(&self.shared.refresher)
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }
}

impl Shared {
    fn explain(&self, error: &sqlx::Error) -> Option<Error> {
        match error {
            sqlx::Error::Database(db) if self.responder.answered(db.message()) => {
                self.core.explain()
            }
            sqlx::Error::Database(db) => {
                let code = db.code()?;
                if !matches!(code.as_ref(), "28000" | "28P01") {
                    return None;
                }
                let entry = self.current_entry()?;
                let role = self.role(&entry).ok()?;
                Some(
                    self.core
                        .rejected(&entry, role, &code, db.message(), LoginRetry::NotRetried),
                )
            }
            sqlx::Error::PoolTimedOut => self.core.explain(),
            sqlx::Error::Tls(tls) => {
                let text = flatten(tls.as_ref());
                Some(if text.contains(SQLX_TLS_DECLINED) {
                    tls_declined()
                } else {
                    tls_error(format!(
                        "{text}; the server's certificate must chain to a trusted root (TlsRoots) and name the host you connect to"
                    ))
                })
            }
            sqlx::Error::Io(io) => Some(connect_error(
                format!("{}:{}", self.base.get_host(), self.base.get_port()),
                io.to_string(),
            )),
            _ => None,
        }
    }

    fn current_entry(&self) -> Option<Arc<Entry>> {
        postgres_entra::__private::usable_entry(self.core.cache())
    }

    fn role(&self, entry: &Entry) -> Result<(String, RoleSource), Error> {
        self.core.role(entry)
    }

    /// The token a connection made at `created_at` logged in with: the earliest-expiring of
    /// those the options held while it was being made (a connect reads the options up to the
    /// acquire timeout before the connection counts as made).
    fn token_of(&self, created_at: SystemTime) -> Option<Installed> {
        let window = self.pool.options().get_acquire_timeout();
        let from = created_at.checked_sub(window).unwrap_or(created_at);
        let history = lock(&self.history);
        // In the options while the connection was being made, and not yet expired when it was
        // made (the server checks the token's expiry at login).
        let in_force = |i: usize| {
            let installed = history[i];
            let until = history.get(i + 1).map(|next| next.at);
            installed.at <= created_at
                && until.is_none_or(|until| until > from)
                && installed.expires_on > created_at
        };
        (0..history.len())
            .filter(|i| in_force(*i))
            .map(|i| history[i])
            .min_by_key(|installed| installed.expires_on)
    }

    /// Whether the connection made `age` ago is due for retirement (and counted so).
    fn retire(&self, age: Duration) -> bool {
        let now = postgres_entra::__private::now(self.core.cache());
        let created_at = now.checked_sub(age).unwrap_or(now);
        let Some(token) = self.token_of(created_at) else {
            return false;
        };
        let jitter = jitter_of(self.born, Instant::now().checked_sub(age));
        let retire_at =
            self.core
                .retire_at(token.received_at, token.expires_on, created_at, jitter);
        self.core.retire_if_due(retire_at)
    }
}

/// Period of the creation instants that [`jitter_of`] reads.
const JITTER_PERIOD_NANOS: u128 = 100_000;

/// A connection's share of jitter, in 0..1: where its creation instant falls within a 100 µs
/// period. sqlx keeps nothing beside a connection but its age, so the share is read from that, the
/// same at every look (an age is read within a microsecond of the instant it is measured from,
/// a hundredth of the period) and, between connections made together, as good as independent
/// (each finishes its own TLS handshake and login, at instants scattered over far more than
/// 100 µs). Coarser buckets of the creation time gave connections made in the same bucket the
/// same share, so they were retired together.
fn jitter_of(born: Instant, created: Option<Instant>) -> f64 {
    let Some(created) = created else {
        return 0.0;
    };
    let nanos = created.saturating_duration_since(born).as_nanos();
    (nanos % JITTER_PERIOD_NANOS) as f64 / JITTER_PERIOD_NANOS as f64
}

/// What sqlx-postgres 0.9 says (`Error::Tls`) when the server answers the SSLRequest with `N`
/// (pinned by a test against the real crate).
const SQLX_TLS_DECLINED: &str = "server does not support TLS";

/// A pool for `url` (sqlx's `postgres://` URL syntax) with sqlx's default pool options, whose
/// connections log in with tokens from `connector`; see [`connect_with`]. Without a user in the
/// URL (`postgres://user@host/db` or `?user=`) or in `PGUSER`, the role comes from the connector or
/// the token.
pub async fn connect(
    url: &str,
    connector: &EntraConnector,
    options: PoolOptions,
) -> Result<EntraPgPool, Error> {
    let connect_options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| config_error(format!("the URL: {}", flatten(&e))))?;
    connect_with(connect_options, PgPoolOptions::new(), connector, options).await
}

/// The user explicitly named by `options`: not sqlx's fallback to the operating system's user
/// (`PgConnectOptions::new()` takes `PGUSER`, else the OS user), which would otherwise be taken
/// for a role.
fn configured_user(options: &PgConnectOptions) -> Option<String> {
    let user = options.get_username();
    let from_env = std::env::var("PGUSER").ok().filter(|u| !u.is_empty());
    let fallback = PgConnectOptions::new_without_pgpass()
        .get_username()
        .to_owned();
    if user.is_empty() || (from_env.is_none() && user == fallback) {
        None
    } else {
        Some(user.to_owned())
    }
}

/// Your `PgConnectOptions` and `PgPoolOptions` as a pool whose connections log in with tokens
/// from `connector`, over TLS verified against the connector's roots (`verify-full`). One
/// connection is opened now, so that a mistake fails here.
///
/// The settings are checked as the other adapters check them: `sslmode=disable` (or `allow`), a
/// Unix socket, or a server in another cloud than the connector's tokens are errors; any other
/// mode becomes `verify-full`. The role is the connector's role name, else the options' user when
/// it is named (not sqlx's fallback to the operating system's user), else the token's name.
///
/// With [`PoolOptions::token_bound`] (the default) or an age limit, this pool's `before_acquire`
/// and `after_release` retire connections due for retirement (replacing any you set: turn both
/// off to keep yours); sqlx's own `max_lifetime` and `idle_timeout` still apply. sqlx's TLS
/// trusts Mozilla's roots (webpki-roots) in addition to the ones given to it, so the trusted set
/// is the connector's roots plus those; the chain and the host name are always verified.
pub async fn connect_with(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: PoolOptions,
) -> Result<EntraPgPool, Error> {
    let pool = build(connect_options, pool_options, connector, options)?;
    pool.check().await?;
    Ok(pool)
}

/// [`connect_with`] without opening a connection now: the first checkouts open them. The first
/// token is fetched when the pool is created, in the background.
pub fn connect_lazy_with(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: PoolOptions,
) -> Result<EntraPgPool, Error> {
    build(connect_options, pool_options, connector, options)
}

fn build(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: PoolOptions,
) -> Result<EntraPgPool, Error> {
    let user = configured_user(&connect_options);
    let base = secure(connect_options, connector)?;
    let name = format!(
        "{}:{}/{}",
        base.get_host(),
        base.get_port(),
        base.get_database().unwrap_or("postgres")
    );
    let acquire_timeout = pool_options.get_acquire_timeout();
    let core = PoolCore::new(
        connector,
        &[base.get_host()],
        user.as_deref(),
        options,
        name,
        Some(acquire_timeout),
    )?;
    let responder = Responder::start(&core)?;
    let retires = core.retires_sessions();
    let pool = Arc::new_cyclic(|weak: &Weak<Shared>| {
        let mut pool_options = pool_options;
        if retires {
            let (before, after) = (weak.clone(), weak.clone());
            pool_options = pool_options
                .before_acquire(move |_, meta| {
                    let keep = !before.upgrade().is_some_and(|s| s.retire(meta.age));
                    Box::pin(async move { Ok(keep) })
                })
                .after_release(move |_, meta| {
                    let keep = !after.upgrade().is_some_and(|s| s.retire(meta.age));
                    Box::pin(async move { Ok(keep) })
                });
        }
        let pool = pool_options.connect_lazy_with(responder.options(&base));
        #[cfg(feature = "opentelemetry_0_33")]
        let reader: Arc<postgres_entra::__private::PoolReader> = {
            let pool = pool.clone();
            let weak = weak.clone();
            Arc::new(move || {
                weak.upgrade()?;
                let (size, idle) = (u64::from(pool.size()), pool.num_idle() as u64);
                Some(postgres_entra::__private::PoolCounts {
                    idle,
                    used: size.saturating_sub(idle),
                    max: u64::from(pool.options().get_max_connections()),
                    pending: None,
                    timeouts: None,
                })
            })
        };
        #[cfg(feature = "opentelemetry_0_33")]
        core.observe(Arc::downgrade(&reader));
        Shared {
            pool,
            core,
            base,
            history: Mutex::new(VecDeque::new()),
            responder,
            born: Instant::now(),
            refresher: Mutex::new(None),
            #[cfg(feature = "opentelemetry_0_33")]
            _reader: reader,
        }
    });
    let task = tokio::spawn(keep_current(Arc::downgrade(&pool), pool.pool.close_event()));
    *lock(&pool.refresher) = Some(task.abort_handle());
    Ok(EntraPgPool { shared: pool })
}

/// The checks of the other adapters, and TLS `verify-full` with the connector's roots.
fn secure(
    options: PgConnectOptions,
    connector: &EntraConnector,
) -> Result<PgConnectOptions, Error> {
    if matches!(
        options.get_ssl_mode(),
        PgSslMode::Disable | PgSslMode::Allow
    ) {
        return Err(config_error(
            "sslmode=disable would send the access token in clear text; token login requires TLS (use sslmode=verify-full, or leave it unset)",
        ));
    }
    if options.get_socket().is_some() || options.get_host().starts_with('/') {
        return Err(config_error(
            "a Unix-socket host cannot carry TLS; token login needs a TCP host name",
        ));
    }
    let options = options.ssl_mode(PgSslMode::VerifyFull);
    match roots_pem(connector)? {
        Some(pem) => Ok(options.ssl_root_cert_from_pem(pem)),
        None => Err(config_error(
            "sqlx verifies certificates with rustls and its own roots: give the connector TlsRoots::Azure, CaFile or CaPem",
        )),
    }
}

/// `base` logging in with `entry` as the role the connector's rules give.
fn with_token(
    base: &PgConnectOptions,
    core: &PoolCore,
    entry: &Entry,
) -> Result<PgConnectOptions, Error> {
    let (role, _) = core.role(entry)?;
    Ok(base.clone().username(&role).password(entry.secret()))
}

/// When to look at the cache next: at the token's refresh point, then every [`POLL`] until a new
/// token arrives, and never later than the moment the token stops being usable.
fn next_look(entry: &Entry, now: SystemTime) -> Duration {
    let until = |at: SystemTime| at.duration_since(now).unwrap_or_default();
    let refresh = until(entry.refresh_at());
    let wait = if refresh.is_zero() { POLL } else { refresh };
    wait.min(until(entry.usable_until()))
}

/// The refresh task: puts each new token in the pool's connect options, and none when no usable
/// token can be had. What the options hold is recorded only once they hold it.
async fn keep_current(shared: Weak<Shared>, closed: sqlx::pool::CloseEvent) {
    let mut closed = std::pin::pin!(closed);
    // The token the options hold now.
    let mut in_options: Option<Arc<Entry>> = None;
    loop {
        let Some(pool) = shared.upgrade() else {
            break;
        };
        let cache = pool.core.cache().clone();
        let now = postgres_entra::__private::now(&cache);
        if let Some(entry) = &in_options
            && now >= entry.usable_until()
        {
            // No new token came in time: none rather than this one, before asking the cache.
            pool.pool
                .set_connect_options(pool.responder.options(&pool.base));
            in_options = None;
        }
        let wait = match postgres_entra::__private::entry(&cache).await {
            Ok(entry) => {
                if !in_options
                    .as_ref()
                    .is_some_and(|held| Arc::ptr_eq(held, &entry))
                {
                    match with_token(&pool.base, &pool.core, &entry) {
                        Ok(options) => {
                            pool.pool.set_connect_options(options);
                            let mut history = lock(&pool.history);
                            history.push_back(Installed {
                                at: postgres_entra::__private::now(&cache),
                                received_at: entry.received_at(),
                                expires_on: entry.expires_on(),
                            });
                            while history.len() > HISTORY {
                                history.pop_front();
                            }
                            drop(history);
                            in_options = Some(entry.clone());
                            pool.core.succeeded();
                            tracing::debug!(
                                pool = pool.core.name(),
                                "a new token is in the sqlx pool's connect options"
                            );
                        }
                        // Logged once and kept for `explain`; the options keep the token they hold
                        // until it stops being usable.
                        Err(error) => pool.core.failed(&error),
                    }
                }
                // Never later than the token the options hold stops being usable.
                let now = postgres_entra::__private::now(&cache);
                let held_until = in_options.as_ref().map_or(Duration::MAX, |held| {
                    held.usable_until().duration_since(now).unwrap_or_default()
                });
                next_look(&entry, now).min(held_until)
            }
            // The cache decides when to ask the provider again (and logs it); look again soon.
            Err(_) => POLL,
        };
        drop(pool);
        tokio::select! {
            () = &mut closed => break,
            () = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
        }
    }
    tracing::debug!("the sqlx pool's token refresh task ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections made within a few milliseconds of each other draw shares spread over 0..1, and
    /// a share read a microsecond off moves by a hundredth.
    #[test]
    fn connections_made_together_draw_their_own_share_of_jitter_and_keep_it() {
        let born = Instant::now();
        // Eight connections finishing 137 to 900 µs apart, as a burst of connects on two cores.
        let gaps = [0, 137, 412, 655, 1_203, 1_540, 2_011, 2_911];
        let shares: Vec<f64> = gaps
            .iter()
            .map(|us| jitter_of(born, Some(born + Duration::from_micros(*us + 10_000))))
            .collect();
        let (low, high) = shares
            .iter()
            .fold((1.0f64, 0.0f64), |(l, h), s| (l.min(*s), h.max(*s)));
        assert!(high - low > 0.5, "spread over the period: {shares:?}");
        for us in gaps {
            let made = born + Duration::from_micros(us + 10_000 + 50);
            let late = jitter_of(born, Some(made + Duration::from_micros(1)));
            let share = jitter_of(born, Some(made));
            assert!((late - share).abs() <= 0.011, "{share} then {late}");
        }
        assert_eq!(jitter_of(born, None), 0.0);
    }

    /// The text `explain` recognises a declined TLS by, from the real sqlx against a loopback
    /// listener that answers the SSLRequest with `N`.
    #[tokio::test]
    async fn sqlx_says_server_does_not_support_tls_when_declined() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 8];
            socket.read_exact(&mut request).await.unwrap();
            socket.write_all(b"N").await.unwrap();
        });
        let error = PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("u")
            .ssl_mode(PgSslMode::Require)
            .connect()
            .await
            .expect_err("refused");
        assert!(matches!(error, sqlx::Error::Tls(_)), "{error:?}");
        assert!(flatten(&error).contains(SQLX_TLS_DECLINED), "{error}");
    }
}
