//! Logging in: TLS forced, user and password from the token cache, one retry with a fresh token
//! when the server rejects the login.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::cache::{CacheOptions, Token, TokenCache};
use crate::clock::Clock;
use crate::error::Error;
use crate::scope::{Cloud, check_cloud};
use crate::tls::{TlsRoots, tls_config};
use crate::token::TokenSource;

/// The TLS stream type of connections made by [`EntraConnector`].
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// Opens PostgreSQL connections that log in with Entra ID access tokens.
///
/// Cheap to clone; clones share the token cache and TLS configuration.
#[derive(Clone)]
pub struct EntraConnector {
    cache: TokenCache,
    role_name: Option<String>,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for EntraConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnector")
            .field("cache", &self.cache)
            .field("role_name", &self.role_name)
            .finish_non_exhaustive()
    }
}

/// Builds an [`EntraConnector`].
#[must_use]
pub struct EntraConnectorBuilder {
    source: Arc<dyn TokenSource>,
    role_name: Option<String>,
    scope: Option<String>,
    cloud: Option<Cloud>,
    host: Option<String>,
    tls_roots: TlsRoots,
    options: CacheOptions,
    clock: Option<Arc<dyn Clock>>,
    private_cache: bool,
}

impl fmt::Debug for EntraConnectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnectorBuilder")
            .field("source", &self.source)
            .field("role_name", &self.role_name)
            .field("scope", &self.scope)
            .field("cloud", &self.cloud)
            .field("host", &self.host)
            .field("tls_roots", &self.tls_roots)
            .finish_non_exhaustive()
    }
}

impl EntraConnectorBuilder {
    /// The PostgreSQL role to log in as. Needed for service principals (their display name);
    /// otherwise the user in the connection's config, or else the token's claims, decide.
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

    /// The server's host name, to infer the cloud (and so the scope) from its suffix.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Which CAs to trust (default: the Azure roots only).
    pub fn tls_roots(mut self, roots: TlsRoots) -> Self {
        self.tls_roots = roots;
        self
    }

    /// Refresh, expiry and backoff settings of the token cache.
    pub fn cache_options(mut self, options: CacheOptions) -> Self {
        self.options = options;
        self
    }

    /// The clock of the token cache (tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Use a cache of its own instead of the process-wide one for this identity and scope.
    pub fn private_cache(mut self) -> Self {
        self.private_cache = true;
        self
    }

    /// The scope this builder will use.
    fn resolved_scope(&self) -> String {
        if let Some(scope) = &self.scope {
            return scope.clone();
        }
        let cloud = self
            .cloud
            .or_else(|| self.host.as_deref().map(Cloud::from_host))
            .unwrap_or_default();
        cloud.scope().to_owned()
    }

    /// Builds the connector, joining (or creating) the shared token cache.
    pub fn build(self) -> Result<EntraConnector, Error> {
        if self.role_name.as_ref().is_some_and(|r| r.trim().is_empty()) {
            return Err(Error::config(
                "the role name is empty; leave it unset to take it from the token or the connection's user",
            ));
        }
        let tls = MakeRustlsConnect::new(tls_config(&self.tls_roots)?);
        let mut cache = TokenCache::builder(self.source.clone())
            .scope(self.resolved_scope())
            .options(self.options);
        if let Some(clock) = self.clock {
            cache = cache.clock(clock);
        }
        let cache = if self.private_cache {
            cache.build()?
        } else {
            cache.shared()?
        };
        Ok(EntraConnector {
            cache,
            role_name: self.role_name,
            tls,
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

fn classify(error: tokio_postgres::Error, role: &str) -> Error {
    if let Some(db) = error.as_db_error().filter(|_| is_rejected_login(&error)) {
        return Error::LoginRejected {
            role: role.to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
        };
    }
    // tokio-postgres's Display omits the cause; the chain says what happened.
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text = format!("{text}: {e}");
        cause = e.source();
    }
    let message = if let Some(tls) = rustls_cause(&error) {
        Some(format!(
            "{tls}; the server's certificate must chain to a trusted root (TlsRoots) and name the host you connect to"
        ))
    } else if text.contains("server does not support TLS") {
        Some("the server declined TLS; token login needs a server with TLS enabled".to_owned())
    } else if text.starts_with("error performing TLS handshake") {
        Some(text)
    } else {
        None
    };
    match message {
        Some(message) => Error::Tls {
            message,
            source: Some(Box::new(error)),
        },
        None => Error::Postgres(error),
    }
}

impl EntraConnector {
    /// Starts building a connector whose tokens come from `source`.
    pub fn builder(source: Arc<dyn TokenSource>) -> EntraConnectorBuilder {
        EntraConnectorBuilder {
            source,
            role_name: None,
            scope: None,
            cloud: None,
            host: None,
            tls_roots: TlsRoots::default(),
            options: CacheOptions::default(),
            clock: None,
            private_cache: false,
        }
    }

    /// The token cache this connector takes tokens from.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Checks `config` can carry a token safely and returns it with TLS required: `sslmode=disable`
    /// is an error, `prefer` (tokio-postgres's default) becomes `require`, which with rustls
    /// verifies the chain and the host name.
    pub fn secure_config(config: &Config) -> Result<Config, Error> {
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

    fn role_for(&self, config: &Config, token: &Token) -> Result<String, Error> {
        if let Some(role) = self.role_name.as_deref().or(config.get_user()) {
            return Ok(role.to_owned());
        }
        token
            .role_name()
            .map(str::to_owned)
            .map_err(|e| Error::config(e.to_string()))
    }

    /// Opens a connection: TLS required, user and password from the token cache. When the server
    /// rejects the login, the token is invalidated and the login retried once with a fresh one.
    ///
    /// Spawn the returned connection (it drives the socket), as with `tokio_postgres::connect`.
    pub async fn connect(
        &self,
        config: &Config,
    ) -> Result<(Client, Connection<Socket, TlsStream>), Error> {
        let mut config = Self::secure_config(config)?;
        for host in config.get_hosts() {
            if let Host::Tcp(name) = host {
                check_cloud(name, self.cache.scope())?;
            }
        }
        let token = self.cache.get().await?;
        let role = self.role_for(&config, &token)?;
        config.user(&role).password(token.secret());
        let error = match config.connect(self.tls.clone()).await {
            Ok(connected) => return Ok(connected),
            Err(error) if is_rejected_login(&error) => error,
            Err(error) => return Err(classify(error, &role)),
        };
        tracing::info!(
            role = %role,
            code = error.as_db_error().map(|db| db.code().code()).unwrap_or_default(),
            "login rejected; retrying once with a fresh token"
        );
        self.cache.invalidate(&token);
        let token = self.cache.get().await?;
        config.password(token.secret());
        config
            .connect(self.tls.clone())
            .await
            .map_err(|error| classify(error, &role))
    }
}
