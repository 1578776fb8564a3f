//! What every pool needs to log in: tokens for the right scope, the role rule, the trusted roots.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::cache::{CacheOptions, TokenCache, TokenCacheBuilder};
use crate::clock::Clock;
use crate::error::{Error, RoleSource};
use crate::host::{ALLOWED_HOSTS_VARIABLE, AllowedHosts, check_host};
use crate::scope::{Cloud, other_cloud, validate_scope};
use crate::tls::{TlsRoots, client_config};
use crate::token::TokenSource;

/// How the token scope is chosen for a pool.
#[derive(Debug, Clone)]
enum Scope {
    /// One scope for every pool: given with `.scope`, `.cloud` or `.host`, or the shared cache's.
    Fixed(TokenCache),
    /// Each pool's host decides: a cache per cloud, built when the first pool of that cloud is.
    FromHost(TokenCacheBuilder),
}

pub(crate) struct ConnectorInner {
    scope: Scope,
    /// The caches of a connector whose pools' hosts decide the scope, one per cloud.
    by_cloud: Mutex<Vec<(Cloud, TokenCache)>>,
    pub(crate) role_name: Option<String>,
    allowed_hosts: AllowedHosts,
    pub(crate) tls_roots: TlsRoots,
    pub(crate) tls_config: Arc<rustls::ClientConfig>,
    #[cfg(feature = "opentelemetry_0_33")]
    pub(crate) telemetry: crate::metrics::PoolTelemetry,
}

/// What the pools of one identity log in with: one token cache per scope, shared by every pool
/// built on this connector or its clones; the role rule; the trusted TLS roots.
///
/// Cheap to clone; clones share the caches: clone one connector into every pool that logs in as
/// the same identity, and they share one token. Two connectors built separately never share.
///
/// Without `.scope(..)`, `.cloud(..)` or `.host(..)`, each pool's host decides the token scope
/// (`*.postgres.database.usgovcloudapi.net` gets US Government tokens, a name that is not Azure's
/// the public cloud's), with one cache per cloud; with one of them, every pool gets that scope and
/// a pool whose host is plainly in another cloud is refused when it is created.
///
/// A token for Azure Database for PostgreSQL is accepted by every server of the tenant where the
/// principal has a role, so a pool is refused when it is created unless each of its hosts is a
/// server name of the token's cloud (`*.postgres.database.azure.com`, its `privatelink.` names,
/// ...), loopback, or allowed with [`EntraConnectorBuilder::allow_host`]. With a custom scope
/// (`.scope("api://...")`) the host is only checked to be one DNS name or IP address.
#[derive(Clone)]
pub struct EntraConnector {
    pub(crate) inner: Arc<ConnectorInner>,
}

impl fmt::Debug for EntraConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("EntraConnector");
        match &self.inner.scope {
            Scope::Fixed(cache) => debug.field("cache", cache),
            Scope::FromHost(_) => debug.field("caches", &*self.lock_caches()),
        };
        debug
            .field("role_name", &self.inner.role_name)
            .field("tls_roots", &self.inner.tls_roots)
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
    allowed_hosts: Vec<String>,
    tls_roots: TlsRoots,
    options: Option<CacheOptions>,
    clock: Option<Arc<dyn Clock>>,
    #[cfg(feature = "opentelemetry_0_33")]
    meter: Option<opentelemetry_0_33::metrics::Meter>,
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
            .field("allowed_hosts", &self.allowed_hosts)
            .field("tls_roots", &self.tls_roots)
            .finish_non_exhaustive()
    }
}

impl EntraConnectorBuilder {
    /// The PostgreSQL role to log in as, for every pool of this connector. Needed for service
    /// principals (their display name) when the pool's settings name no user; otherwise the
    /// pool's user, or else the token's claims, decide. A pool whose settings name another user
    /// is refused when it is made (a token logs in as one role): nothing is overridden silently.
    pub fn role_name(mut self, role: impl Into<String>) -> Self {
        self.role_name = Some(role.into());
        self
    }

    /// The token scope for every pool (e.g. an `api://` scope behind a custom gateway).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The Azure cloud (and so the scope) for every pool: needed when the servers are reached
    /// under names that are not Azure's (a custom domain, an address).
    pub fn cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = Some(cloud);
        self
    }

    /// A server's host name: its cloud, from its suffix, decides the scope for every pool.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Lets tokens go to `pattern`, a host that is not a server name of the token's cloud nor
    /// loopback: a host name (`db.internal`, a Docker or CI service name, a self-hosted pooler, a
    /// custom domain), an IP address (`fd00::5`), or every name under a domain
    /// (`*.corp.example.com`). Call it once per pattern; a pattern that is none of these (or a
    /// bare `*`) is refused by [`build`](Self::build).
    pub fn allow_host(mut self, pattern: impl Into<String>) -> Self {
        self.allowed_hosts.push(pattern.into());
        self
    }

    /// [`allow_host`](Self::allow_host) for each pattern in the environment variable
    /// `POSTGRES_ENTRA_ALLOWED_HOSTS` (separated by commas or whitespace), as the `postgres-entra`
    /// tool reads it; nothing when it is unset. Whoever sets the environment decides where tokens
    /// may go: call it only where that is the deployment's own configuration.
    pub fn allow_hosts_from_env(mut self) -> Self {
        if let Some(list) = std::env::var_os(ALLOWED_HOSTS_VARIABLE) {
            self.allowed_hosts.push(list.to_string_lossy().into_owned());
        }
        self
    }

    /// Which CAs to trust (default: the roots Microsoft documents for Azure Database for
    /// PostgreSQL).
    pub fn tls_roots(mut self, roots: TlsRoots) -> Self {
        self.tls_roots = roots;
        self
    }

    /// Refresh, expiry and retry settings of the token caches.
    pub fn cache_options(mut self, options: CacheOptions) -> Self {
        self.options = Some(options);
        self
    }

    /// The clock of the token caches (tests).
    #[cfg(feature = "test-util")]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The OpenTelemetry meter to record metrics with: the token caches' and those of the pools
    /// built on this connector. Default: the meter of the global provider installed when the
    /// connector is built. A connector over a shared [`TokenCache`] records its pools with this
    /// meter; the cache keeps its own.
    #[cfg(feature = "opentelemetry_0_33")]
    pub fn meter(mut self, meter: opentelemetry_0_33::metrics::Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// The scope given explicitly, if any; an error when two settings disagree.
    fn explicit_scope(&self) -> Result<Option<String>, Error> {
        let from_host = self
            .host
            .as_deref()
            .map(|host| (host, Cloud::from_host(host)));
        if let (Some((host, server)), Some(cloud)) = (from_host, self.cloud)
            && Cloud::from_server_name(host).is_some()
            && server != cloud
        {
            return Err(Error::config(format!(
                "the connector was given `.host(\"{host}\")`, a server of {server}, and `.cloud(Cloud::{cloud:?})`: drop `.cloud(..)` (the host decides), or correct it to `.cloud(Cloud::{server:?})`"
            )));
        }
        let cloud_scope = self
            .cloud
            .or(from_host.map(|(_, cloud)| cloud))
            .map(|cloud| cloud.scope().to_owned());
        match (&self.scope, cloud_scope) {
            (Some(scope), Some(cloud_scope)) if *scope != cloud_scope => {
                Err(Error::config(format!(
                    "the connector was given `.scope(\"{scope}\")` and a cloud (with `.cloud` or `.host`) whose scope is {cloud_scope}: give one of them"
                )))
            }
            (Some(scope), _) => Ok(Some(scope.clone())),
            (None, cloud_scope) => Ok(cloud_scope),
        }
    }

    /// Checks the settings and builds the connector: the role name, the scope, the cache
    /// options, the trusted roots (a CA file is read now).
    pub fn build(self) -> Result<EntraConnector, Error> {
        if self.role_name.as_ref().is_some_and(|r| r.trim().is_empty()) {
            return Err(Error::config(
                "the role name is empty; leave it unset to take it from the pool's user or the token",
            ));
        }
        let mut allowed_hosts = AllowedHosts::default();
        for list in &self.allowed_hosts {
            allowed_hosts.add_list(list)?;
        }
        let tls_config = Arc::new(client_config(&self.tls_roots)?);
        let explicit = self.explicit_scope()?;
        let scope = match self.tokens {
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
                Scope::Fixed(cache)
            }
            Tokens::Source(source) => {
                let options = self.options.unwrap_or_default();
                options.validate()?;
                let builder = TokenCache::builder_from(source)
                    .options(options)
                    .set_clock(self.clock)
                    .set_meter(
                        #[cfg(feature = "opentelemetry_0_33")]
                        self.meter.clone(),
                    );
                match explicit {
                    Some(scope) => Scope::Fixed(builder.scope(scope).build()?),
                    None => Scope::FromHost(builder),
                }
            }
        };
        if let (Scope::Fixed(cache), Some(host)) = (&scope, &self.host) {
            validate_scope(cache.scope())?;
            if let Some((server, token)) = other_cloud(host, cache.scope()) {
                return Err(Error::config(format!(
                    "`{host}` is a server of {server} but the tokens are requested for {token} ({}): drop or correct `.scope(..)`",
                    cache.scope()
                )));
            }
        }
        Ok(EntraConnector {
            inner: Arc::new(ConnectorInner {
                #[cfg(feature = "opentelemetry_0_33")]
                telemetry: crate::metrics::PoolTelemetry::new(
                    self.meter.unwrap_or_else(crate::metrics::default_meter),
                ),
                scope,
                by_cloud: Mutex::new(Vec::new()),
                role_name: self.role_name,
                allowed_hosts,
                tls_roots: self.tls_roots,
                tls_config,
            }),
        })
    }
}

impl EntraConnector {
    /// Starts building a connector whose tokens come from `source`, through token caches of its
    /// own (shared by the connector's clones).
    pub fn builder(source: impl TokenSource + 'static) -> EntraConnectorBuilder {
        Self::builder_for(Tokens::Source(Arc::new(source)))
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
            allowed_hosts: Vec::new(),
            tls_roots: TlsRoots::default(),
            options: None,
            clock: None,
            #[cfg(feature = "opentelemetry_0_33")]
            meter: None,
        }
    }

    fn lock_caches(&self) -> std::sync::MutexGuard<'_, Vec<(Cloud, TokenCache)>> {
        // Every update is one push: the list stays consistent across a panic elsewhere.
        self.inner
            .by_cloud
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The token cache of this connector's logins to `host` (reached at `address`, when given),
    /// once a token may go there: an error, before any token is fetched, when `host` is not one DNS
    /// name or IP address, is plainly in another cloud than the connector's tokens, or is neither a
    /// server name of the token's cloud, loopback, nor allowed with
    /// [`EntraConnectorBuilder::allow_host`]. For a driver of your own; the adapters do this when a
    /// pool is created.
    pub fn token_cache_for(
        &self,
        host: &str,
        address: Option<IpAddr>,
    ) -> Result<TokenCache, Error> {
        self.cache_for(&[(host, address)])
    }

    /// The cache for a pool whose settings name `hosts` (each reached at its address, when
    /// given): the connector's one scope (an error if a host is plainly in another cloud), or the
    /// cache of the hosts' cloud; an error for any host a token may not go to.
    pub(crate) fn cache_for(&self, hosts: &[(&str, Option<IpAddr>)]) -> Result<TokenCache, Error> {
        if hosts.is_empty() {
            return Err(Error::config(
                "no host to connect to; set the server's host name",
            ));
        }
        let cache = match &self.inner.scope {
            Scope::Fixed(cache) => {
                for (host, _) in hosts {
                    if let Some((server, token)) = other_cloud(host, cache.scope()) {
                        return Err(Error::config(format!(
                            "`{host}` is a server of {server} but this connector requests tokens for {token} ({}); build the connector with `.cloud(Cloud::{server:?})`, or without `.cloud`, `.host` and `.scope` so that each pool's host decides, or use one connector per cloud",
                            cache.scope()
                        )));
                    }
                }
                self.check_hosts(hosts, cache.scope())?;
                cache.clone()
            }
            Scope::FromHost(builder) => {
                let clouds: Vec<Cloud> = hosts.iter().map(|(h, _)| Cloud::from_host(h)).collect();
                let cloud = clouds[0];
                if let Some(other) = clouds.iter().find(|c| **c != cloud) {
                    let names: Vec<&str> = hosts.iter().map(|(h, _)| *h).collect();
                    return Err(Error::config(format!(
                        "the pool's hosts ({}) are in different clouds ({cloud} and {other}); one pool's tokens serve one cloud",
                        names.join(", ")
                    )));
                }
                self.check_hosts(hosts, cloud.scope())?;
                let mut caches = self.lock_caches();
                if let Some((_, cache)) = caches.iter().find(|(c, _)| *c == cloud) {
                    return Ok(cache.clone());
                }
                let cache = builder.clone().scope(cloud.scope()).build()?;
                caches.push((cloud, cache.clone()));
                cache
            }
        };
        Ok(cache)
    }

    fn check_hosts(&self, hosts: &[(&str, Option<IpAddr>)], scope: &str) -> Result<(), Error> {
        hosts.iter().try_for_each(|(host, address)| {
            check_host(host, *address, scope, &self.inner.allowed_hosts)
        })
    }

    /// The role a login with a token carrying `claims` uses: the connector's role name, else
    /// `configured_user` (the user the pool's settings name explicitly) when not empty, else the
    /// name the token carries.
    pub(crate) fn role(
        &self,
        configured_user: Option<&str>,
        claims: Result<&crate::claims::TokenClaims, &crate::claims::ClaimsError>,
    ) -> Result<(String, RoleSource), Error> {
        if let Some(role) = &self.inner.role_name {
            return Ok((role.clone(), RoleSource::Connector));
        }
        if let Some(user) = configured_user.filter(|u| !u.is_empty()) {
            return Ok((user.to_owned(), RoleSource::ConnectionConfig));
        }
        let claims = claims.map_err(|e| {
            Error::config(format!(
                "no role name can be read from the access token ({e}); set the pool's user or the connector's role_name"
            ))
        })?;
        match claims.role_name() {
            Some((name, claim)) => Ok((name.to_owned(), RoleSource::TokenClaim(claim))),
            None if claims.is_app_only() => Err(Error::config(format!(
                "the access token is app-only (service principal, appid {}) and carries no role name; set the pool's user (or the connector's role_name) to the service principal's display name, as created in PostgreSQL",
                claims.app_id().unwrap_or("unknown")
            ))),
            None => Err(Error::config(
                "the access token has no xms_mirid, upn, preferred_username or unique_name claim; set the pool's user or the connector's role_name",
            )),
        }
    }
}
