//! Logging in: TLS forced, user and password from the token cache, one retry with a different
//! token when the server rejects the login and a different token can help.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::SystemTime;
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Config, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::cache::{CacheOptions, Token, TokenCache, TokenCacheBuilder};
use crate::clock::Clock;
use crate::error::{Error, LoginRejected, LoginRetry, RoleSource, chain};
use crate::scope::{Cloud, check_cloud};
use crate::tls::{TlsRoots, tls_config};
use crate::token::TokenSource;

/// tokio-postgres-rustls's stream type (it keeps the type itself private).
type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// The connection half of a login made by [`EntraConnector::connect`]: it drives the socket and
/// must be spawned (or polled), as with `tokio_postgres::connect`. Resolves when the connection
/// closes. It also tells which token the connection logged in with (when that token was received
/// and when it expires), so that a pool can retire the session once the token has expired (see
/// [`crate::Sessions`]).
pub struct Connection {
    inner: tokio_postgres::Connection<Socket, TlsStream>,
    token_received_at: SystemTime,
    token_expires_on: SystemTime,
}

impl Connection {
    /// When the token this connection logged in with expires. The server checks the token only
    /// at login: the session itself outlives it unless something retires it.
    pub fn token_expires_on(&self) -> SystemTime {
        self.token_expires_on
    }

    /// When the token cache received the token this connection logged in with.
    pub fn token_received_at(&self) -> SystemTime {
        self.token_received_at
    }

    /// Polls for asynchronous messages from the server (notices, `NOTIFY`), as
    /// `tokio_postgres::Connection::poll_message` does.
    pub fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        self.inner.poll_message(cx)
    }
}

impl Future for Connection {
    type Output = Result<(), tokio_postgres::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

/// How the token scope was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScopeChoice {
    /// Given with `.scope`, `.cloud` or `.host`, or by the shared cache.
    Explicit,
    /// Taken from the first server the connector meets.
    FirstServer,
}

struct ConnectorInner {
    role_name: Option<String>,
    tls: MakeRustlsConnect,
    tls_roots: TlsRoots,
    scope_choice: ScopeChoice,
    cache: OnceLock<TokenCache>,
    /// How to build the cache once the scope is settled (`None` when it was built up front).
    pending: Option<TokenCacheBuilder>,
    settle: Mutex<()>,
    /// The host that settled the scope, for messages.
    settled_by: OnceLock<String>,
    /// The meter for the metrics of pools built on this connector.
    #[cfg(feature = "opentelemetry")]
    meter: opentelemetry::metrics::Meter,
}

/// Opens PostgreSQL connections that log in with Entra ID access tokens.
///
/// Cheap to clone; clones share the token cache and TLS configuration: clone one connector into
/// every pool that logs in as the same identity, and they share one token.
#[derive(Clone)]
pub struct EntraConnector {
    inner: Arc<ConnectorInner>,
}

impl fmt::Debug for EntraConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnector")
            .field("cache", &self.inner.cache.get())
            .field("role_name", &self.inner.role_name)
            .finish_non_exhaustive()
    }
}

/// Where the connector's tokens come from.
enum Tokens {
    Source(Arc<dyn TokenSource>),
    Cache(TokenCache),
}

/// Builds an [`EntraConnector`].
#[must_use]
pub struct EntraConnectorBuilder {
    tokens: Tokens,
    role_name: Option<String>,
    scope: Option<String>,
    cloud: Option<Cloud>,
    host: Option<String>,
    tls_roots: TlsRoots,
    options: Option<CacheOptions>,
    clock: Option<Arc<dyn Clock>>,
    #[cfg(feature = "opentelemetry")]
    meter: Option<opentelemetry::metrics::Meter>,
}

impl fmt::Debug for EntraConnectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tokens: &dyn fmt::Debug = match &self.tokens {
            Tokens::Source(source) => source,
            Tokens::Cache(cache) => cache,
        };
        f.debug_struct("EntraConnectorBuilder")
            .field("tokens", tokens)
            .field("role_name", &self.role_name)
            .field("scope", &self.scope)
            .field("cloud", &self.cloud)
            .field("host", &self.host)
            .field("tls_roots", &self.tls_roots)
            .finish_non_exhaustive()
    }
}

impl EntraConnectorBuilder {
    /// The PostgreSQL role to log in as, overriding the connection's user. Needed for service
    /// principals (their display name) when the connection settings name no user; otherwise the
    /// connection's user, or else the token's claims, decide.
    pub fn role_name(mut self, role: impl Into<String>) -> Self {
        self.role_name = Some(role.into());
        self
    }

    /// The token scope, overriding the one inferred from the cloud or host.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The Azure cloud (decides the scope) when the host name does not tell.
    pub fn cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = Some(cloud);
        self
    }

    /// The server's host name, to infer the cloud (and so the scope) from its suffix now rather
    /// than from the first server the connector meets.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Which CAs to trust (default: the roots Azure Database for PostgreSQL uses).
    pub fn tls_roots(mut self, roots: TlsRoots) -> Self {
        self.tls_roots = roots;
        self
    }

    /// Refresh, expiry and backoff settings of the token cache.
    pub fn cache_options(mut self, options: CacheOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The clock of the token cache (tests).
    #[cfg(feature = "test-util")]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The OpenTelemetry meter to record metrics with (feature `opentelemetry`): the token
    /// cache's, and those of the pools built on this connector. Default: the meter of the global
    /// provider installed when the connector is built. A connector over a shared [`TokenCache`]
    /// uses the cache's meter unless given one here (the cache's metrics stay with the cache's).
    #[cfg(feature = "opentelemetry")]
    pub fn meter(mut self, meter: opentelemetry::metrics::Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// The scope given explicitly, if any.
    fn explicit_scope(&self) -> Option<String> {
        if let Some(scope) = &self.scope {
            return Some(scope.clone());
        }
        self.cloud
            .or_else(|| self.host.as_deref().map(Cloud::from_host))
            .map(|cloud| cloud.scope().to_owned())
    }

    /// Checks the settings and builds the connector. Without a scope, cloud or host, the scope is
    /// settled by the first server the connector meets (a pool's host, or the first connect).
    pub fn build(self) -> Result<EntraConnector, Error> {
        if self.role_name.as_ref().is_some_and(|r| r.trim().is_empty()) {
            return Err(Error::config(
                "the role name is empty; leave it unset to take it from the connection's user or the token",
            ));
        }
        let tls = MakeRustlsConnect::new(tls_config(&self.tls_roots)?);
        let explicit = self.explicit_scope();
        let (cache, pending, scope_choice) = match self.tokens {
            Tokens::Cache(cache) => {
                if self.options.is_some() || self.clock.is_some() {
                    return Err(Error::config(
                        "cache options belong to the shared TokenCache, not to a connector built over it",
                    ));
                }
                if let Some(scope) = explicit.filter(|s| s != cache.scope()) {
                    return Err(Error::config(format!(
                        "the shared TokenCache requests {}, but the connector was asked for {scope}",
                        cache.scope()
                    )));
                }
                (Some(cache), None, ScopeChoice::Explicit)
            }
            Tokens::Source(source) => {
                let builder = TokenCache::builder(source)
                    .options(self.options.unwrap_or_default())
                    .set_clock(self.clock);
                #[cfg(feature = "opentelemetry")]
                let builder = match &self.meter {
                    Some(meter) => builder.meter(meter.clone()),
                    None => builder,
                };
                match explicit {
                    Some(scope) => (
                        Some(builder.scope(scope).build()?),
                        None,
                        ScopeChoice::Explicit,
                    ),
                    None => {
                        // Check the options now, not when the first server settles the scope.
                        builder.check_options()?;
                        (None, Some(builder), ScopeChoice::FirstServer)
                    }
                }
            }
        };
        if let (Some(cache), Some(host)) = (&cache, &self.host) {
            check_cloud(host, cache.scope())?;
        }
        #[cfg(feature = "opentelemetry")]
        let meter = match (self.meter, &cache) {
            (Some(meter), _) => meter,
            (None, Some(cache)) => cache.meter().clone(),
            (None, None) => crate::metrics::default_meter(),
        };
        let inner = ConnectorInner {
            role_name: self.role_name,
            tls,
            tls_roots: self.tls_roots,
            scope_choice,
            cache: OnceLock::new(),
            pending,
            settle: Mutex::new(()),
            settled_by: OnceLock::new(),
            #[cfg(feature = "opentelemetry")]
            meter,
        };
        if let Some(cache) = cache {
            let _ = inner.cache.set(cache);
        }
        Ok(EntraConnector {
            inner: Arc::new(inner),
        })
    }
}

fn is_rejected_login(error: &tokio_postgres::Error) -> bool {
    error
        .as_db_error()
        .is_some_and(|db| matches!(db.code().code(), "28000" | "28P01"))
}

/// Finds a rustls error in `error`'s source chain.
fn rustls_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// `host:port` for every host of `config`, for messages.
fn targets(config: &Config) -> String {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sorts a failed connect that was not a refused login into TLS, network or other.
fn classify(error: tokio_postgres::Error, config: &Config) -> Error {
    if error.as_db_error().is_some() {
        return Error::Postgres(error);
    }
    let text = chain(&error);
    if text.contains("server does not support TLS") {
        return Error::tls_declined(Some(Box::new(error)));
    }
    let tls = if let Some(tls) = rustls_cause(&error) {
        Some(format!(
            "{tls}; the server's certificate must chain to a trusted root (TlsRoots) and name the host you connect to"
        ))
    } else if text.starts_with("error performing TLS handshake") {
        Some(text.clone())
    } else {
        None
    };
    if let Some(message) = tls {
        return Error::Tls {
            message,
            source: Some(Box::new(error)),
        };
    }
    // tokio-postgres has no public error kind; these are its messages for a connection that
    // could not be made, or broke before the login finished.
    const NETWORK: [&str; 4] = [
        "error connecting to server",
        "timeout waiting for server",
        "error communicating with the server",
        "connection closed",
    ];
    if NETWORK.iter().any(|prefix| text.starts_with(prefix)) {
        let reason = text
            .split_once(": ")
            .map_or(text.as_str(), |(_, cause)| cause)
            .to_owned();
        return Error::Connect {
            target: targets(config),
            reason,
            source: error,
        };
    }
    Error::Postgres(error)
}

/// The login `error` refused, described with what the token says.
fn rejected(
    error: &tokio_postgres::Error,
    role: String,
    role_source: RoleSource,
    token: &Token,
    retry: LoginRetry,
) -> Error {
    let db = error.as_db_error();
    Error::LoginRejected(Box::new(LoginRejected {
        role,
        role_source,
        claims: token.claims().ok().cloned(),
        token_expires_on: token.expires_on(),
        code: db.map(|db| db.code().code().to_owned()).unwrap_or_default(),
        server_message: db.map(|db| db.message().to_owned()).unwrap_or_default(),
        retry,
    }))
}

/// Checks `config` can carry a token safely and returns it with TLS required: `sslmode=disable`
/// is an error, `prefer` (tokio-postgres's default) becomes `require`, which with rustls verifies
/// the chain and the host name.
fn secure_config(config: &Config) -> Result<Config, Error> {
    let mut config = config.clone();
    match config.get_ssl_mode() {
        SslMode::Disable => {
            return Err(Error::config(
                "sslmode=disable would send the access token in clear text; token login requires TLS (use sslmode=require)",
            ));
        }
        SslMode::Prefer => {
            config.ssl_mode(SslMode::Require);
        }
        _ => {}
    }
    if config.get_hosts().is_empty() {
        return Err(Error::config(
            "no host to connect to; set the server's host name",
        ));
    }
    if config
        .get_hosts()
        .iter()
        .any(|h| !matches!(h, Host::Tcp(_)))
    {
        return Err(Error::config(
            "a Unix-socket host cannot carry TLS; token login needs a TCP host name",
        ));
    }
    if config.get_channel_binding() == ChannelBinding::Require {
        return Err(Error::config(
            "channel_binding=require cannot work with token login (the token is sent as a cleartext password inside TLS); use prefer or disable",
        ));
    }
    Ok(config)
}

fn tcp_hosts(config: &Config) -> impl Iterator<Item = &str> {
    config.get_hosts().iter().filter_map(|host| match host {
        Host::Tcp(name) => Some(name.as_str()),
        #[cfg(unix)]
        Host::Unix(_) => None,
    })
}

impl EntraConnector {
    /// Starts building a connector whose tokens come from `source`, through a token cache of its
    /// own (shared by the connector's clones).
    pub fn builder(source: Arc<dyn TokenSource>) -> EntraConnectorBuilder {
        Self::builder_for(Tokens::Source(source))
    }

    /// Starts building a connector that takes its tokens from `cache`, which other connectors
    /// (e.g. with another role name) may share. The cache decides the scope and its options.
    pub fn builder_with_cache(cache: TokenCache) -> EntraConnectorBuilder {
        Self::builder_for(Tokens::Cache(cache))
    }

    fn builder_for(tokens: Tokens) -> EntraConnectorBuilder {
        EntraConnectorBuilder {
            tokens,
            role_name: None,
            scope: None,
            cloud: None,
            host: None,
            tls_roots: TlsRoots::default(),
            options: None,
            clock: None,
            #[cfg(feature = "opentelemetry")]
            meter: None,
        }
    }

    /// The CAs this connector trusts. For adapters whose driver does its own TLS (sqlx).
    pub fn tls_roots(&self) -> &TlsRoots {
        &self.inner.tls_roots
    }

    /// The meter for the metrics of pools built on this connector.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn meter(&self) -> &opentelemetry::metrics::Meter {
        &self.inner.meter
    }

    /// The token cache this connector takes tokens from. If the connector was given no scope,
    /// cloud or host and has not met a server yet, this settles it on the public cloud.
    pub fn cache(&self) -> &TokenCache {
        match self.settled_cache(None) {
            Ok(cache) => cache,
            Err(_) => unreachable!("the options were checked when the connector was built"),
        }
    }

    /// Checks that `config` can carry a token (TLS, a TCP host, no channel binding, a server in
    /// the cloud the tokens are for) and settles the token scope from its host when the connector
    /// was not told it. The pool adapters call this when a pool is created, so that a mistake
    /// fails there rather than at the first connect.
    pub fn prepare(&self, config: &Config) -> Result<(), Error> {
        self.cache_for(&secure_config(config)?).map(|_| ())
    }

    fn cache_for(&self, config: &Config) -> Result<&TokenCache, Error> {
        let mut cache = None;
        for host in tcp_hosts(config) {
            cache = Some(self.settled_cache(Some(host))?);
        }
        match cache {
            Some(cache) => Ok(cache),
            None => self.settled_cache(None),
        }
    }

    /// The cache, built for `host`'s cloud if this is the first server the connector meets; an
    /// error if `host` is plainly in another cloud than the cache's tokens.
    fn settled_cache(&self, host: Option<&str>) -> Result<&TokenCache, Error> {
        let inner = &self.inner;
        let cache = match inner.cache.get() {
            Some(cache) => cache,
            None => {
                let _settling = inner.settle.lock().unwrap_or_else(|e| e.into_inner());
                if inner.cache.get().is_none() {
                    let cloud = host.and_then(Cloud::from_server_name).unwrap_or_default();
                    let builder = inner
                        .pending
                        .clone()
                        .expect("a connector without a cache has a pending one");
                    let _ = inner.cache.set(builder.scope(cloud.scope()).build()?);
                    let _ = inner
                        .settled_by
                        .set(host.unwrap_or("a call to cache()").to_owned());
                }
                inner.cache.get().expect("set above")
            }
        };
        if let Some(host) = host
            && let Err(error) = check_cloud(host, cache.scope())
        {
            return Err(match (inner.scope_choice, inner.settled_by.get()) {
                (ScopeChoice::FirstServer, Some(first)) => Error::config(format!(
                    "{}; this connector took its cloud from the first server it met ({first}): use one connector per cloud",
                    chain(&error)
                )),
                _ => error,
            });
        }
        Ok(cache)
    }

    fn role_for(&self, config: &Config, token: &Token) -> Result<(String, RoleSource), Error> {
        self.login_role(config.get_user(), token)
    }

    /// The role a login with `token` uses: the connector's role name, else `configured_user`
    /// (the connection settings' user) when not empty, else the name the token carries. For
    /// adapters whose driver logs in itself (sqlx).
    pub fn login_role(
        &self,
        configured_user: Option<&str>,
        token: &Token,
    ) -> Result<(String, RoleSource), Error> {
        if let Some(role) = &self.inner.role_name {
            return Ok((role.clone(), RoleSource::Connector));
        }
        if let Some(user) = configured_user.filter(|u| !u.is_empty()) {
            return Ok((user.to_owned(), RoleSource::ConnectionConfig));
        }
        let from_token = token
            .claims()
            .map_err(Clone::clone)
            .and_then(|claims| claims.role_name())
            .map_err(|e| Error::config(e.to_string()))?;
        Ok((from_token.name, RoleSource::TokenClaim(from_token.claim)))
    }

    async fn login(
        &self,
        config: &mut Config,
        role: &str,
        token: &Token,
    ) -> Result<(Client, Connection), tokio_postgres::Error> {
        config.user(role).password(token.secret());
        let (client, inner) = config.connect(self.inner.tls.clone()).await?;
        Ok((
            client,
            Connection {
                inner,
                token_received_at: token.received_at(),
                token_expires_on: token.expires_on(),
            },
        ))
    }

    /// Opens a connection: TLS required, user and password from the token cache. When the server
    /// rejects the login, it is retried once with a different token if one can be had (see
    /// [`TokenCache::replacement_for`]); otherwise [`Error::LoginRejected`] says what to fix.
    ///
    /// Spawn the returned [`Connection`] (it drives the socket), as with `tokio_postgres::connect`.
    /// The user in `config`, if any and not empty, is the role, unless the connector names one.
    pub async fn connect(&self, config: &Config) -> Result<(Client, Connection), Error> {
        let mut config = secure_config(config)?;
        let cache = self.cache_for(&config)?;
        let token = cache.get().await?;
        let (role, role_source) = self.role_for(&config, &token)?;
        let first = match self.login(&mut config, &role, &token).await {
            Ok(connected) => return Ok(connected),
            Err(error) if is_rejected_login(&error) => error,
            Err(error) => return Err(classify(error, &config)),
        };
        tracing::info!(
            role = %role,
            code = first.as_db_error().map(|db| db.code().code()).unwrap_or_default(),
            "login rejected; retrying once if a different token can be had"
        );
        let replacement = cache.replacement_for(&token).await;
        cache.note_login_rejected(matches!(replacement, Ok(Some(_))));
        let fresh = match replacement {
            Ok(Some(fresh)) => fresh,
            Ok(None) => {
                let retry = if token.after_rejection() {
                    LoginRetry::AlreadyReplaced
                } else {
                    LoginRetry::SameTokenReturned
                };
                return Err(rejected(&first, role, role_source, &token, retry));
            }
            Err(error) => {
                let retry = LoginRetry::NoNewToken(error.to_string());
                return Err(rejected(&first, role, role_source, &token, retry));
            }
        };
        let (role, role_source) = self.role_for(&config, &fresh)?;
        match self.login(&mut config, &role, &fresh).await {
            Ok(connected) => Ok(connected),
            Err(error) if is_rejected_login(&error) => {
                cache.note_login_rejected(false);
                Err(rejected(
                    &error,
                    role,
                    role_source,
                    &fresh,
                    LoginRetry::FreshTokenRefused,
                ))
            }
            Err(error) => Err(classify(error, &config)),
        }
    }
}
