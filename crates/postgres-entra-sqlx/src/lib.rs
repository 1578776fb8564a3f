#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(unix))]
compile_error!(
    "postgres-entra-sqlx logs sqlx's connections in through a Unix socket of the process: it builds on Unix-like systems (Linux, macOS) only"
);

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{Connection as _, PgPool};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use postgres_entra::__private::{PoolCore, config_error, connect_error, flatten, postgres_error};

mod relay;

use crate::relay::{MARKER, Relay, RetireAt, Upstream};

// The public interface is:
/// The core crate, for what the adapters share: a token source of your own, its tokens and
/// errors, all with this one dependency.
///
/// ```no_run
/// use postgres_entra_sqlx::EntraConnector;
/// use postgres_entra_sqlx::postgres_entra::{AccessToken, TokenError, TokenErrorKind, TokenFuture, TokenSource};
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
/// # Ok::<(), postgres_entra_sqlx::Error>(())
/// ```
pub use postgres_entra;
#[cfg(feature = "opentelemetry_0_33")]
pub use postgres_entra::opentelemetry_0_33;
#[cfg(feature = "azure")]
pub use postgres_entra::{AzureTokenSource, azure_core, azure_identity};
pub use postgres_entra::{
    CacheOptions, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache,
};
pub use sqlx;

/// A `sqlx::PgPool` whose new connections log in with Entra ID access tokens.
///
/// It dereferences to the `PgPool`: `pool.acquire()`, `pool.begin()` and functions taking a
/// `&PgPool` work as before; where sqlx wants an executor, pass `&*pool`
/// (`sqlx::query("select 1").fetch_one(&*pool)`). Cheap to clone; clones share the pool.
///
/// sqlx opens its connections to a private socket of this process, where this crate logs each one
/// in as the other adapters do: a token from the connector's cache, TLS to the server verified
/// against the connector's roots, one retry with a different token after a refused login, refused
/// logins backing off. sqlx's connect options hold no token (`PgPool::connect_options()` names the
/// socket), and sqlx's own TLS and trust roots are not used. The socket is served for as long as
/// the sqlx pool lives.
#[derive(Clone)]
pub struct EntraPgPool {
    shared: Arc<Shared>,
}

struct Shared {
    pool: PgPool,
    core: PoolCore,
    #[cfg(feature = "opentelemetry_0_33")]
    _reader: Arc<postgres_entra::__private::PoolReader>,
}

impl fmt::Debug for EntraPgPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    /// Opens one connection with the pool's settings and closes it: a startup check that reports
    /// a permanent mistake at once, typed (an untrusted certificate, a missing role, a credential
    /// the provider refuses).
    pub async fn check(&self) -> Result<(), Error> {
        let options = self.shared.pool.connect_options();
        match sqlx::PgConnection::connect_with(&options).await {
            Ok(connection) => {
                let _ = connection.close().await;
                Ok(())
            }
            Err(error) => Err(self
                .explain(&error)
                .unwrap_or_else(|| postgres_error(None, flatten(&error), None))),
        }
    }

    /// Our error behind a failed checkout or query, where there is one: a failed login (sqlx
    /// reports it as the server's error, its message starting `postgres-entra: `, or as
    /// `PoolTimedOut`): why no token could be had, a refused login with what the token says, a
    /// server that declined TLS or a certificate that did not verify, a server that could not be
    /// reached. `None` for errors that are not about connecting (a failed query).
    pub fn explain(&self, error: &sqlx::Error) -> Option<Error> {
        let shared = &self.shared;
        match error {
            sqlx::Error::Database(db) if db.message().starts_with(MARKER) => shared.core.explain(),
            sqlx::Error::PoolTimedOut => shared.core.explain(),
            sqlx::Error::Io(io) => Some(connect_error(
                shared.core.targets(),
                std::io::Error::new(io.kind(), io.to_string()),
            )),
            _ => None,
        }
    }

    /// The token cache this pool's logins use (its counters: [`TokenCache::stats`]).
    pub fn token_cache(&self) -> &TokenCache {
        self.shared.core.cache()
    }
}

/// A pool for `url` (sqlx's `postgres://` URL syntax) whose connections log in with tokens from
/// `connector`; see [`connect_with`]. The pool has sqlx's default options but for its own
/// `max_lifetime` (30 minutes) and `idle_timeout` (10 minutes), which are off: sessions end with
/// their token instead ([`SessionOptions::token_bound`]), and are kept while the identity provider
/// is unavailable, when nothing could replace them. Without a user in the URL
/// (`postgres://user@host/db` or `?user=`) or in `PGUSER`, the role comes from the connector or
/// the token.
pub async fn connect(
    url: &str,
    connector: &EntraConnector,
    options: SessionOptions,
) -> Result<EntraPgPool, Error> {
    let connect_options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| config_error(format!("the URL: {}", flatten(&e))))?;
    let pool_options = PgPoolOptions::new().max_lifetime(None).idle_timeout(None);
    connect_with(connect_options, pool_options, connector, options).await
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
/// from `connector`, over TLS verified against the connector's roots. One connection is opened
/// now, so that a mistake fails here.
///
/// The settings are checked as the other adapters check them: `sslmode=disable` (or `allow`), a
/// Unix socket, a host a token may not go to, or a server in another cloud than the connector's
/// tokens are errors; TLS is always verified in full. The role is the connector's role name, else
/// the options' user when it is named (not sqlx's fallback to the operating system's user), else
/// the token's name.
///
/// With [`SessionOptions::token_bound`] (the default) or an age limit, a connection due for
/// retirement is closed at sqlx's ping before its next checkout (`test_before_acquire`, sqlx's
/// default; without it, at the ping when it is given back, which sqlx logs as a warning). Your
/// pool options are used as given: your `before_acquire`, `after_release` and `after_connect` run,
/// and sqlx's own `max_lifetime` and `idle_timeout` apply. Call it within a Tokio runtime.
pub async fn connect_with(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: SessionOptions,
) -> Result<EntraPgPool, Error> {
    let pool = build(connect_options, pool_options, connector, options)?;
    pool.check().await?;
    Ok(pool)
}

/// [`connect_with`] without opening a connection now: the first checkouts open them. Call it
/// within a Tokio runtime (an error otherwise).
pub fn connect_lazy_with(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: SessionOptions,
) -> Result<EntraPgPool, Error> {
    build(connect_options, pool_options, connector, options)
}

fn build(
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    connector: &EntraConnector,
    options: SessionOptions,
) -> Result<EntraPgPool, Error> {
    let user = configured_user(&connect_options);
    check_settings(&connect_options)?;
    let upstream = Upstream {
        host: connect_options.get_host().to_owned(),
        port: connect_options.get_port(),
    };
    let name = format!(
        "{}:{}/{}",
        upstream.host,
        upstream.port,
        connect_options.get_database().unwrap_or("postgres")
    );
    let core = PoolCore::new(
        connector,
        &[(upstream.host.as_str(), None, upstream.port)],
        user.as_deref(),
        options,
        name,
        Some(pool_options.get_acquire_timeout()),
    )?;
    // Without a ping before each checkout, a session can end only at the ping made when a
    // connection is given back.
    let retire_at = if pool_options.get_test_before_acquire() {
        RetireAt::AcquirePing
    } else {
        RetireAt::AnyPing
    };
    let relay = Relay::start(&core, upstream, retire_at)?;
    let pool = pool_options.connect_lazy_with(relay.options(&connect_options));
    relay.stop_on(pool.close_event());
    #[cfg(feature = "opentelemetry_0_33")]
    let reader: Arc<postgres_entra::__private::PoolReader> = {
        let pool = pool.clone();
        Arc::new(move || {
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
    Ok(EntraPgPool {
        shared: Arc::new(Shared {
            pool,
            core,
            #[cfg(feature = "opentelemetry_0_33")]
            _reader: reader,
        }),
    })
}

/// The checks of the other adapters: TLS required, a TCP host.
fn check_settings(options: &PgConnectOptions) -> Result<(), Error> {
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
    Ok(())
}
