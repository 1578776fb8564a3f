#![doc = include_str!("../README.md")]

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

// The public interface is:
#[cfg(feature = "azure")]
pub use azure_identity;
pub use postgres_entra;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core};
pub use postgres_entra::{CacheOptions, Cloud, EntraConnector, TlsRoots, TokenCache};
pub use sqlx;

use postgres_entra::{AZURE_ROOTS, Token};

/// Why a pool could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings cannot carry a token safely, or no token could be had (see the message).
    #[error(transparent)]
    Entra(#[from] postgres_entra::Error),
    /// sqlx could not open the pool's first connection.
    #[error("sqlx: {0}")]
    Sqlx(#[from] sqlx::Error),
}

/// After the token's refresh point, how often the cache is asked whether a new token arrived.
const POLL: Duration = Duration::from_millis(250);

/// A `sqlx::PgPool` whose new connections log in with Entra ID access tokens.
///
/// It dereferences to the `PgPool`: `pool.acquire()`, `pool.begin()` and functions taking a
/// `&PgPool` work as before; where sqlx wants an executor, pass `&*pool`
/// (`sqlx::query("select 1").fetch_one(&*pool)`). Cheap to clone; clones share the pool.
///
/// Why not a plain `PgPool`: sqlx offers no weak handle to a pool, so the task that keeps its
/// connect options current could not notice that the application dropped it; this handle
/// owns the pool, and the task ends (and the pool closes) when the last one is dropped.
///
/// A task keeps the pool's connect options current: it puts each new token from the cache in
/// them (with `Pool::set_connect_options`) before the previous one stops being usable, and when
/// no usable token can be had, it leaves none in them, so that no connect ever presents an
/// expired token. The task ends when the pool is closed or the last `EntraPgPool` handle is
/// dropped. `connect_options()` holds the current token, and sqlx's `Debug` of it shows it:
/// never print it.
#[derive(Clone)]
pub struct EntraPgPool {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    connector: EntraConnector,
    /// What the task last failed with (no usable token), until it succeeds again.
    last_error: Mutex<Option<Arc<postgres_entra::Error>>>,
    /// The options without a token: where connects go when no token can be had.
    tokenless: PgConnectOptions,
    refresher: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A `PgPool` cloned out of the last handle may live on without the task: leave it no
        // token that could expire in its options.
        self.pool.set_connect_options(self.tokenless.clone());
    }
}

impl fmt::Debug for EntraPgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the connect options: they hold the token.
        f.debug_struct("EntraPgPool")
            .field("size", &self.shared.pool.size())
            .field("num_idle", &self.shared.pool.num_idle())
            .field("is_closed", &self.shared.pool.is_closed())
            .field("connector", &self.shared.connector)
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
    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The connector: its token cache, its counters.
    pub fn connector(&self) -> &EntraConnector {
        &self.shared.connector
    }

    /// Why no usable token could be had, while that lasts: sqlx then reports only that a
    /// connect failed or timed out (its connect options hold no token).
    pub fn last_error(&self) -> Option<Arc<postgres_entra::Error>> {
        lock(&self.shared.last_error).clone()
    }

    /// Our typed error behind a failed checkout, where there is one: the token failure when
    /// no usable token could be had ([`EntraPgPool::last_error`]), or a server that declined TLS.
    /// sqlx's own error says the rest (a refused login, an unknown database, the network).
    pub fn explain(&self, error: &sqlx::Error) -> Option<Arc<postgres_entra::Error>> {
        if let sqlx::Error::Tls(tls) = error
            && tls.to_string().contains("does not support TLS")
        {
            return Some(Arc::new(postgres_entra::Error::tls_declined(None)));
        }
        self.last_error()
    }

    /// Whether the task that keeps the connect options current is still running.
    pub fn is_refreshing(&self) -> bool {
        lock(&self.shared.refresher)
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }

    /// A handle that tells whether the refresh task runs, without keeping the pool alive.
    pub fn refresher(&self) -> Refresher {
        Refresher {
            task: lock(&self.shared.refresher).clone(),
        }
    }
}

/// Tells whether an [`EntraPgPool`]'s refresh task runs; does not keep the pool alive.
#[derive(Debug, Clone)]
pub struct Refresher {
    task: Option<tokio::task::AbortHandle>,
}

impl Refresher {
    /// Whether the task has ended (the pool was closed or dropped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pool for `url` (sqlx's `postgres://` URL syntax) with sqlx's default pool options, whose
/// connections log in with tokens from `connector`. Without a user in the URL, the role comes
/// from the connector or the token.
pub async fn connect(url: &str, connector: EntraConnector) -> Result<EntraPgPool, Error> {
    let mut options: PgConnectOptions = url.parse()?;
    let names_user = url
        .split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
        .is_some_and(|authority| authority.contains('@'));
    if !names_user {
        // sqlx would take PGUSER or the operating system's user.
        options = options.username("");
    }
    connect_with(options, PgPoolOptions::new(), connector).await
}

/// The user's `PgConnectOptions` and `PgPoolOptions` as a pool whose connections log in with
/// tokens from `connector`, over TLS verified against the connector's roots (`verify-full`).
///
/// The settings are checked as the other adapters check them: `sslmode=disable` (or `allow`), a
/// Unix socket, or a server in another cloud than the connector's tokens are errors here; any
/// other mode becomes `verify-full`. The role is the connector's role name, else the options'
/// username when not empty (sqlx fills it from `PGUSER` or the operating system's user: set
/// `.username("")` to take the role from the token), else the token's name. One connection is
/// opened now, so that a mistake fails here.
///
/// sqlx's TLS trusts Mozilla's roots (webpki-roots) in addition to the ones given to it, so the
/// trusted set is the connector's roots plus those: narrower trust is not possible through
/// sqlx. The chain and the host name are always verified.
pub async fn connect_with(
    options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: EntraConnector,
) -> Result<EntraPgPool, Error> {
    build(options, pool_options, connector, true).await
}

/// [`connect_with`] without opening a connection now: the token is fetched (a token failure is
/// an error here), connections are opened by the first checkouts.
pub async fn connect_lazy_with(
    options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: EntraConnector,
) -> Result<EntraPgPool, Error> {
    build(options, pool_options, connector, false).await
}

async fn build(
    options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: EntraConnector,
    connect_now: bool,
) -> Result<EntraPgPool, Error> {
    let user = Some(options.get_username().to_owned()).filter(|u| !u.is_empty());
    let base = secure(options, &connector)?;
    let tokenless = base
        .clone()
        .socket("/nonexistent/postgres-entra: no valid token");
    let cache = connector.cache().clone();
    let token = cache.get().await.map_err(postgres_entra::Error::from)?;
    let first = with_token(&base, &connector, user.as_deref(), &token)?;
    let pool = if connect_now {
        pool_options.connect_with(first).await?
    } else {
        pool_options.connect_lazy_with(first)
    };
    let shared = Arc::new(Shared {
        pool,
        connector,
        last_error: Mutex::new(None),
        tokenless,
        refresher: Mutex::new(None),
    });
    let task = tokio::spawn(keep_current(
        Arc::downgrade(&shared),
        shared.pool.close_event(),
        cache,
        base,
        user,
        token,
    ));
    *lock(&shared.refresher) = Some(task.abort_handle());
    Ok(EntraPgPool { shared })
}

/// The checks of the other adapters, and TLS `verify-full` with the connector's roots.
fn secure(
    options: PgConnectOptions,
    connector: &EntraConnector,
) -> Result<PgConnectOptions, Error> {
    use postgres_entra::Error as E;
    if matches!(
        options.get_ssl_mode(),
        PgSslMode::Disable | PgSslMode::Allow
    ) {
        return Err(E::config(
            "sslmode=disable would send the access token in clear text; token login requires TLS (use sslmode=verify-full, or leave it unset)",
        )
        .into());
    }
    if options.get_socket().is_some() {
        return Err(E::config(
            "a Unix-socket host cannot carry TLS; token login needs a TCP host name",
        )
        .into());
    }
    // The core's checks (and the cloud, settled from the host when the connector was not told).
    let mut config = postgres_entra::tokio_postgres::Config::new();
    config
        .host(options.get_host())
        .port(options.get_port())
        .ssl_mode(postgres_entra::tokio_postgres::config::SslMode::Require);
    connector.prepare(&config)?;
    let options = options.ssl_mode(PgSslMode::VerifyFull);
    Ok(match connector.tls_roots() {
        TlsRoots::Azure => {
            let pem: String = AZURE_ROOTS.iter().map(|root| root.pem).collect();
            options.ssl_root_cert_from_pem(pem.into_bytes())
        }
        TlsRoots::CaFile(path) => options.ssl_root_cert(path),
        TlsRoots::CaPem(pem) => options.ssl_root_cert_from_pem(pem.clone().into_bytes()),
        _ => {
            return Err(E::config(
                "sqlx verifies certificates with rustls and its own roots: give the connector TlsRoots::Azure, CaFile or CaPem",
            )
            .into());
        }
    })
}

/// `base` logging in with `token` as the role the connector's rules give.
fn with_token(
    base: &PgConnectOptions,
    connector: &EntraConnector,
    user: Option<&str>,
    token: &Token,
) -> Result<PgConnectOptions, postgres_entra::Error> {
    let (role, _) = connector.login_role(user, token)?;
    Ok(base.clone().username(&role).password(token.secret()))
}

/// When to look at the cache next: at the token's refresh point, then every [`POLL`] until a new
/// token arrives, and never later than the moment the token stops being usable.
fn next_look(token: &Token) -> Duration {
    let now = SystemTime::now();
    let until = |at: SystemTime| at.duration_since(now).unwrap_or_default();
    let refresh = until(token.refresh_at());
    let wait = if refresh.is_zero() { POLL } else { refresh };
    wait.min(until(token.usable_until()))
}

/// The refresh task: puts each new token in the pool's connect options.
async fn keep_current(
    shared: Weak<Shared>,
    closed: sqlx::pool::CloseEvent,
    cache: TokenCache,
    base: PgConnectOptions,
    user: Option<String>,
    mut current: Arc<Token>,
) {
    let mut closed = std::pin::pin!(closed);
    let mut holds_token = true;
    loop {
        tokio::select! {
            () = &mut closed => break,
            () = tokio::time::sleep(next_look(&current).max(Duration::from_millis(10))) => {}
        }
        let Some(shared) = shared.upgrade() else {
            break;
        };
        if holds_token && SystemTime::now() >= current.usable_until() {
            // No new token came in time (the provider is failing): none rather than this one,
            // before waiting for the cache.
            shared.pool.set_connect_options(shared.tokenless.clone());
            holds_token = false;
        }
        match cache.get().await {
            Ok(token) if !holds_token || !Arc::ptr_eq(&token, &current) => {
                match with_token(&base, &shared.connector, user.as_deref(), &token) {
                    Ok(options) => {
                        shared.pool.set_connect_options(options);
                        *lock(&shared.last_error) = None;
                        holds_token = true;
                        tracing::debug!("put a new token in the sqlx pool's connect options");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "the new token cannot log in: keeping the previous one while it lasts");
                        *lock(&shared.last_error) = Some(Arc::new(error));
                    }
                }
                current = token;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "no usable token for the sqlx pool's new connections");
                *lock(&shared.last_error) = Some(Arc::new(error.into()));
                if !holds_token {
                    // The cache decides when to ask the provider again; this only keeps the
                    // task from looping while it backs off.
                    drop(shared);
                    tokio::select! {
                        () = &mut closed => break,
                        () = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        }
    }
    tracing::debug!("the sqlx pool's token refresh task ended");
}
