//! The shared token cache: single-flight fetches, proactive background refresh, backoff on
//! failure, and a guarantee that no expired token is ever handed out.

use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::claims::{RoleNameError, role_name_from_token};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, TokenError, TokenErrorKind};
use crate::scope::{Cloud, validate_scope};
use crate::token::{AccessToken, TokenSource, TokenSourceError};

/// How the cache refreshes, backs off and decides a token is too old to hand out.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CacheOptions {
    /// Refresh this long before expiry, in the background (capped at a quarter of the token's
    /// lifetime, so short-lived tokens refresh at three quarters of their life). Default 15
    /// minutes: Entra tokens live 60-90 minutes, so an identity-provider outage of up to 15
    /// minutes goes unnoticed.
    pub refresh_margin: Duration,
    /// Never hand out a token expiring within this margin (capped at a tenth of its lifetime),
    /// so a login never races the expiry. Default 30 seconds.
    pub expiry_buffer: Duration,
    /// Give up on one request to the identity provider after this long (azure_core credentials
    /// retry internally for up to a minute; this bounds how long a caller without a valid token
    /// can wait). Default 10 seconds.
    pub fetch_timeout: Duration,
    /// First delay after a failed fetch; doubles with each consecutive failure. Default 500 ms.
    pub backoff_initial: Duration,
    /// Longest delay between attempts (before jitter). Default 60 seconds.
    pub backoff_max: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(15 * 60),
            expiry_buffer: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

impl CacheOptions {
    /// Sets [`CacheOptions::refresh_margin`].
    #[must_use]
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.refresh_margin = margin;
        self
    }
    /// Sets [`CacheOptions::expiry_buffer`].
    #[must_use]
    pub fn expiry_buffer(mut self, buffer: Duration) -> Self {
        self.expiry_buffer = buffer;
        self
    }
    /// Sets [`CacheOptions::fetch_timeout`].
    #[must_use]
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }
    /// Sets the backoff's first and longest delay.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// The delay before attempt `failures + 1`: exponential, capped, with jitter in [d/2, d].
    pub(crate) fn backoff_delay(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let delay = self
            .backoff_initial
            .saturating_mul(1 << exponent)
            .min(self.backoff_max);
        delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// A cached access token, as handed out by [`TokenCache::get`]. `Debug` never shows the secret.
pub struct Token {
    access: AccessToken,
    id: u64,
    refresh_at: SystemTime,
    usable_until: SystemTime,
    role: Result<String, RoleNameError>,
}

impl Token {
    /// The token: the PostgreSQL password. Treat it as one.
    pub fn secret(&self) -> &str {
        self.access.secret()
    }

    /// When the token expires.
    pub fn expires_on(&self) -> SystemTime {
        self.access.expires_on()
    }

    /// When the cache starts refreshing it in the background.
    pub fn refresh_at(&self) -> SystemTime {
        self.refresh_at
    }

    /// After this instant the cache no longer hands it out.
    pub fn usable_until(&self) -> SystemTime {
        self.usable_until
    }

    /// The role name read from the token's claims (see [`crate::role_name_from_token`]).
    pub fn role_name(&self) -> Result<&str, &RoleNameError> {
        self.role.as_deref()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"<redacted>")
            .field("expires_on", &self.access.expires_on())
            .field("refresh_at", &self.refresh_at)
            .field("role", &self.role)
            .finish()
    }
}

/// Counters a user can read, e.g. to export as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests made to the token source.
    pub requests: u64,
    /// Requests that produced a usable token.
    pub successes: u64,
    /// Requests that failed (error, timeout, or a token expired on arrival).
    pub failures: u64,
    /// Calls answered from the cache without waiting.
    pub hits: u64,
    /// Calls that had to wait for a fetch.
    pub waits: u64,
    /// Tokens dropped by [`TokenCache::invalidate`].
    pub invalidations: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Time left until the current token expires, if there is one.
    pub expires_in: Option<Duration>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    hits: AtomicU64,
    waits: AtomicU64,
    invalidations: AtomicU64,
}

type FetchResult = Result<Arc<Token>, TokenError>;

#[derive(Default)]
struct State {
    /// The fetch in progress, if any: every caller that misses waits on this one.
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    failures: u32,
    last_error: Option<TokenError>,
    /// No new request before this instant (backoff).
    retry_at: Option<SystemTime>,
    next_id: u64,
}

struct Inner {
    source: Arc<dyn TokenSource>,
    identity: String,
    scope: String,
    options: CacheOptions,
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Token>,
    state: Mutex<State>,
    counters: Counters,
}

/// A shared, cached, self-refreshing source of access tokens for one identity and scope.
///
/// Cheap to clone; clones share everything. Tokens are refreshed in the background before they
/// expire, so in steady state [`TokenCache::get`] never waits on the identity provider. Needs a
/// Tokio runtime.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("identity", &self.inner.identity)
            .field("scope", &self.inner.scope)
            .field("stats", &self.stats())
            .finish()
    }
}

/// (identity, scope) → the cache shared for them.
type Registry = HashMap<(String, String), Weak<Inner>>;

/// Caches shared process-wide, per identity and scope.
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

/// Builds a [`TokenCache`].
#[derive(Debug)]
#[must_use]
pub struct TokenCacheBuilder {
    source: Arc<dyn TokenSource>,
    scope: Option<String>,
    options: CacheOptions,
    clock: Arc<dyn Clock>,
}

impl TokenCacheBuilder {
    /// The scope to request (default: the public cloud's PostgreSQL scope).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Refresh, expiry and backoff settings.
    pub fn options(mut self, options: CacheOptions) -> Self {
        self.options = options;
        self
    }

    /// The clock (tests use a paused Tokio clock to cross expiries without waiting).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn into_inner(self) -> Result<Inner, Error> {
        let scope = self
            .scope
            .unwrap_or_else(|| Cloud::Public.scope().to_owned());
        validate_scope(&scope)?;
        Ok(Inner {
            identity: self.source.identity(),
            source: self.source,
            scope,
            options: self.options,
            clock: self.clock,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            counters: Counters::default(),
        })
    }

    /// A cache of its own, shared with nobody.
    pub fn build(self) -> Result<TokenCache, Error> {
        Ok(TokenCache {
            inner: Arc::new(self.into_inner()?),
        })
    }

    /// The process-wide cache for this source's identity and scope: created on first use, shared
    /// by every later caller while any of them holds it. The first caller's options and clock win.
    pub fn shared(self) -> Result<TokenCache, Error> {
        let inner = self.into_inner()?;
        let key = (inner.identity.clone(), inner.scope.clone());
        let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = registry.get(&key).and_then(Weak::upgrade) {
            return Ok(TokenCache { inner: existing });
        }
        registry.retain(|_, cache| cache.strong_count() > 0);
        let inner = Arc::new(inner);
        registry.insert(key, Arc::downgrade(&inner));
        Ok(TokenCache { inner })
    }
}

impl TokenCache {
    /// Starts building a cache over `source`.
    pub fn builder(source: Arc<dyn TokenSource>) -> TokenCacheBuilder {
        TokenCacheBuilder {
            source,
            scope: None,
            options: CacheOptions::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// A valid token: from the cache when it holds one (no waiting), otherwise from one fetch
    /// shared by all concurrent callers. Never returns a token past its usable lifetime.
    pub async fn get(&self) -> Result<Arc<Token>, TokenError> {
        let now = self.inner.clock.now();
        if let Some(token) = self.inner.current.load().as_ref()
            && now < token.usable_until
        {
            self.inner.counters.hits.fetch_add(1, Relaxed);
            if now >= token.refresh_at {
                // The background timer should be doing this; make sure it happens even if the
                // runtime that owned the timer is gone.
                self.inner.refresh_if_due(false);
            }
            return Ok(token.clone());
        }
        self.inner.counters.waits.fetch_add(1, Relaxed);
        self.inner.fetch_or_wait().await
    }

    /// Drops `token` if it is still the cached one (the server rejected it); the next
    /// [`TokenCache::get`] fetches a new one. Concurrent calls for the same token drop it once.
    pub fn invalidate(&self, token: &Token) {
        let _state = self.inner.lock_state();
        let current = self.inner.current.load();
        if current.as_ref().is_some_and(|t| t.id == token.id) {
            self.inner.current.store(None);
            self.inner.counters.invalidations.fetch_add(1, Relaxed);
            tracing::info!(identity = %self.inner.identity, "cached token invalidated after the server rejected it");
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let now = self.inner.clock.now();
        let state = self.inner.lock_state();
        CacheStats {
            requests: c.requests.load(Relaxed),
            successes: c.successes.load(Relaxed),
            failures: c.failures.load(Relaxed),
            hits: c.hits.load(Relaxed),
            waits: c.waits.load(Relaxed),
            invalidations: c.invalidations.load(Relaxed),
            consecutive_failures: state.failures,
            expires_in: self
                .inner
                .current
                .load()
                .as_ref()
                .and_then(|t| t.expires_on().duration_since(now).ok()),
        }
    }

    /// The identity this cache holds tokens for.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The scope this cache requests.
    pub fn scope(&self) -> &str {
        &self.inner.scope
    }

    /// Whether two handles share one cache.
    pub fn ptr_eq(&self, other: &TokenCache) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Inner {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is a single assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, now: SystemTime) -> Option<Arc<Token>> {
        self.current
            .load_full()
            .filter(|token| now < token.usable_until)
    }

    async fn fetch_or_wait(self: &Arc<Self>) -> Result<Arc<Token>, TokenError> {
        // A fetch may be abandoned (its runtime shut down) or return a token that is already too
        // old by the time we see it; both are rare, so a couple of rounds suffice.
        for _ in 0..3 {
            let mut receiver = {
                let mut state = self.lock_state();
                let now = self.clock.now();
                if let Some(token) = self.usable(now) {
                    return Ok(token);
                }
                match state.inflight.clone().filter(|r| r.has_changed().is_ok()) {
                    Some(receiver) => receiver,
                    None => {
                        if let (Some(error), Some(retry_at)) = (&state.last_error, state.retry_at)
                            && let Ok(wait) = retry_at.duration_since(now)
                        {
                            return Err(error.clone().with_retry_in(wait));
                        }
                        self.start_fetch(&mut state, "caller")
                    }
                }
            };
            let outcome = match receiver.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                Err(_) => continue,
            };
            match outcome {
                Some(Ok(token)) if self.clock.now() < token.usable_until => return Ok(token),
                Some(Ok(_)) | None => continue,
                Some(Err(error)) => return Err(error),
            }
        }
        Err(TokenError::new(
            TokenErrorKind::Cancelled,
            &self.identity,
            &self.scope,
            "the token fetch did not complete",
        ))
    }

    /// Starts a background fetch if the current token is due for refresh (or there is none after
    /// failures) and no fetch or backoff is pending. `blocking`: wait for the state lock (timers)
    /// rather than skip when it is busy (callers on the hot path).
    fn refresh_if_due(self: &Arc<Self>, blocking: bool) {
        let mut state = if blocking {
            self.lock_state()
        } else {
            match self.state.try_lock() {
                Ok(state) => state,
                Err(_) => return,
            }
        };
        if state
            .inflight
            .as_ref()
            .is_some_and(|r| r.has_changed().is_ok())
        {
            return;
        }
        let now = self.clock.now();
        if state.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let due = match self.current.load().as_ref() {
            Some(token) => now >= token.refresh_at,
            None => state.last_error.is_some(),
        };
        if due {
            self.start_fetch(&mut state, "background");
        }
    }

    fn start_fetch(
        self: &Arc<Self>,
        state: &mut State,
        trigger: &'static str,
    ) -> watch::Receiver<Option<FetchResult>> {
        let (sender, receiver) = watch::channel(None);
        state.inflight = Some(receiver.clone());
        self.counters.requests.fetch_add(1, Relaxed);
        let inner = self.clone();
        let span = tracing::debug_span!("entra_token_fetch", identity = %self.identity, scope = %self.scope, trigger);
        tokio::spawn(
            async move {
                tracing::debug!("requesting a token");
                let result = tokio::time::timeout(
                    inner.options.fetch_timeout,
                    inner.source.get_token(&inner.scope),
                )
                .await;
                let outcome = inner.complete(result);
                let _ = sender.send(Some(outcome));
            }
            .instrument(span),
        );
        receiver
    }

    fn complete(
        self: &Arc<Self>,
        result: Result<Result<AccessToken, TokenSourceError>, tokio::time::error::Elapsed>,
    ) -> FetchResult {
        let now = self.clock.now();
        let mut state = self.lock_state();
        state.inflight = None;
        let outcome = match result {
            Ok(Ok(access)) => self.accept(access, now, &mut state),
            Ok(Err(error)) => Err(TokenError::from_source(&self.identity, &self.scope, error)),
            Err(_) => Err(TokenError::new(
                TokenErrorKind::Timeout,
                &self.identity,
                &self.scope,
                format!(
                    "the identity provider did not answer within {:?}",
                    self.options.fetch_timeout
                ),
            )),
        };
        match &outcome {
            Ok(token) => {
                self.counters.successes.fetch_add(1, Relaxed);
                state.failures = 0;
                state.last_error = None;
                state.retry_at = None;
                let expires_in = token.expires_on().duration_since(now).unwrap_or_default();
                tracing::debug!(expires_in_secs = expires_in.as_secs(), "token fetched");
                self.schedule(token.refresh_at);
            }
            Err(error) => {
                self.counters.failures.fetch_add(1, Relaxed);
                state.failures = state.failures.saturating_add(1);
                let mut delay = self.options.backoff_delay(state.failures, fastrand::f64());
                if let Some(asked) = error.provider_retry_after() {
                    delay = delay.max(asked);
                }
                let retry_at = now + delay;
                state.retry_at = Some(retry_at);
                state.last_error = Some(error.clone());
                let serving = self.usable(now).is_some();
                tracing::warn!(
                    error = %error.message(),
                    consecutive_failures = state.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    still_serving_valid_token = serving,
                    "token fetch failed"
                );
                // Keep retrying in the background, so a recovered provider is noticed before the
                // current token runs out (or, with none left, before the next caller arrives).
                self.schedule(retry_at);
            }
        }
        outcome
    }

    /// Checks a fresh token and makes it current.
    fn accept(&self, access: AccessToken, now: SystemTime, state: &mut State) -> FetchResult {
        let expires_on = access.expires_on();
        let lifetime = expires_on.duration_since(now).unwrap_or_default();
        let buffer = self.options.expiry_buffer.min(lifetime / 10);
        let usable_until = expires_on - buffer;
        if lifetime.is_zero() || usable_until <= now {
            return Err(TokenError::new(
                TokenErrorKind::ExpiredOnArrival,
                &self.identity,
                &self.scope,
                "the identity provider returned a token that had already expired",
            ));
        }
        let margin = self.options.refresh_margin.min(lifetime / 4);
        let refresh_at = (expires_on - margin).min(usable_until);
        state.next_id += 1;
        let role = role_name_from_token(access.secret());
        let token = Arc::new(Token {
            access,
            id: state.next_id,
            refresh_at,
            usable_until,
            role,
        });
        self.current.store(Some(token.clone()));
        Ok(token)
    }

    /// Wakes at `at` to refresh or retry if still due then. Holds only a weak reference: a cache
    /// nobody uses any more stops refreshing.
    fn schedule(self: &Arc<Self>, at: SystemTime) {
        let weak = Arc::downgrade(self);
        let wait = at.duration_since(self.clock.now()).unwrap_or_default();
        let sleep = self.clock.sleep(wait);
        tokio::spawn(async move {
            sleep.await;
            if let Some(inner) = weak.upgrade() {
                inner.refresh_if_due(true);
            }
        });
    }
}

#[cfg(test)]
mod tests;
