//! The token cache: single-flight fetches, proactive background refresh, backoff on failure, a
//! guarantee that no expired token is ever handed out, and at most one replacement per token
//! after the server rejects it.
//!
//! A token is refreshed once half of its life has passed (the rule of Google's Cloud SQL
//! connectors, `refreshDuration` in cloud-sql-go-connector's internal/cloudsql/refresh.go). A
//! source whose own cache answers with the token already held (a credential's, a managed-identity
//! endpoint's, a CLI's) is asked again when half of what remains has passed, and that answer is
//! counted apart (`CacheStats::unchanged`), not as a success.
//!
//! Two regimes of retrying after a failure:
//! - while a valid token is still served, refreshes back off exponentially (with jitter, up to
//!   `backoff_max`, never past the moment the token stops being served): nobody waits, so there
//!   is no hurry;
//! - while no usable token is cached, callers that want one make the cache ask again at a steady
//!   rate (`retry_interval`, 800 ms by default, or later if the provider said `Retry-After`), one
//!   request at a time. While the provider is unavailable, a caller that arrives between two
//!   attempts waits for the next one when it falls before the caller's deadline (else, and after
//!   a refusal, it gets the last failure at once), so the first attempt after the provider
//!   answers again serves every caller waiting.

use arc_swap::ArcSwapOption;
use std::fmt;
use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, TokenError, TokenErrorKind, human};
use crate::log::FailureLog;
use crate::scope::{Cloud, validate_scope};
use crate::token::{AccessToken, TokenSource};

mod entry;
mod fetch;
mod options;

#[cfg(test)]
use entry::HIT_SHARDS;
pub use entry::{CacheStats, Entry, Now};
use entry::{Counters, hit_shard};
use fetch::*;
pub use options::CacheOptions;
use options::*;

/// A cached, self-refreshing source of access tokens for one identity and scope.
///
/// Cheap to clone, and clones share everything: to share one cache between connectors, clone it
/// into [`crate::EntraConnector::builder_with_cache`]. Two caches built separately never share.
///
/// Tokens are refreshed in the background before they expire, so in steady state
/// [`TokenCache::get`] never waits on the identity provider. The background work (fetches, the
/// refresh timer) runs on the Tokio runtime of whichever caller needs it; if that runtime shuts
/// down, the next caller, on any runtime, takes over. Needs a Tokio runtime with time enabled.
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

/// Builds a [`TokenCache`].
#[derive(Debug, Clone)]
#[must_use]
pub struct TokenCacheBuilder {
    source: Arc<dyn TokenSource>,
    scope: Option<String>,
    options: CacheOptions,
    clock: Arc<dyn Clock>,
    #[cfg(feature = "opentelemetry_0_33")]
    meter: Option<opentelemetry_0_33::metrics::Meter>,
}

impl TokenCacheBuilder {
    /// The scope to request (default: the public cloud's Azure Database for PostgreSQL scope;
    /// see [`Cloud::scope`]).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Refresh, expiry and retry settings.
    pub fn options(mut self, options: CacheOptions) -> Self {
        self.options = options;
        self
    }

    /// The clock (tests use a paused Tokio clock to cross expiries without waiting).
    #[cfg(any(test, feature = "test-util"))]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The OpenTelemetry meter to record the cache's metrics with (default: the global meter
    /// provider's, as it is when the cache is built).
    #[cfg(feature = "opentelemetry_0_33")]
    pub fn meter(mut self, meter: opentelemetry_0_33::metrics::Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    pub(crate) fn set_clock(mut self, clock: Option<Arc<dyn Clock>>) -> Self {
        if let Some(clock) = clock {
            self.clock = clock;
        }
        self
    }

    pub(crate) fn set_meter(
        self,
        #[cfg(feature = "opentelemetry_0_33")] meter: Option<opentelemetry_0_33::metrics::Meter>,
    ) -> Self {
        #[cfg(feature = "opentelemetry_0_33")]
        if let Some(meter) = meter {
            return self.meter(meter);
        }
        self
    }

    /// Checks the scope and options and builds the cache.
    pub fn build(self) -> Result<TokenCache, Error> {
        let scope = self
            .scope
            .unwrap_or_else(|| Cloud::Public.scope().to_owned());
        validate_scope(&scope)?;
        self.options.validate()?;
        let identity = self.source.identity();
        Ok(TokenCache {
            inner: Arc::new_cyclic(|_cache| Inner {
                #[cfg(feature = "opentelemetry_0_33")]
                metrics: crate::metrics::TokenMetrics::new(
                    &self.meter.unwrap_or_else(crate::metrics::default_meter),
                    &identity,
                    &scope,
                    Inner::reading(_cache.clone()),
                ),
                log: FailureLog::new(format!("token requests for {identity} (scope {scope})")),
                identity,
                source: self.source,
                scope,
                options: self.options,
                clock: self.clock,
                current: ArcSwapOption::empty(),
                state: Mutex::new(State::default()),
                counters: Counters::default(),
            }),
        })
    }
}

/// How a wait for a fetch ended.
enum Waited {
    Done(FetchResult),
    /// The fetch's runtime shut down before it finished.
    Abandoned,
    TimedOut(Duration),
}

impl TokenCache {
    /// Starts building a cache over `source`.
    pub fn builder(source: impl TokenSource + 'static) -> TokenCacheBuilder {
        Self::builder_from(Arc::new(source))
    }

    pub(crate) fn builder_from(source: Arc<dyn TokenSource>) -> TokenCacheBuilder {
        TokenCacheBuilder {
            source,
            scope: None,
            options: CacheOptions::default(),
            clock: Arc::new(SystemClock),
            #[cfg(feature = "opentelemetry_0_33")]
            meter: None,
        }
    }

    /// A valid token: from the cache when it holds one (no waiting), otherwise from one fetch
    /// shared by all concurrent callers, waiting at most the fetch timeout (and a second's
    /// grace). Never returns a token past its usable lifetime. While the provider is failing and
    /// no token is cached, returns the last error at once until the next attempt is due.
    pub async fn get(&self) -> Result<Arc<AccessToken>, TokenError> {
        // The hit path clones the token alone (this thread's copy): one atomic increment per call.
        if let Some(token) = self.hit(|entry, shard| entry.tokens[shard].clone()) {
            return Ok(token);
        }
        self.miss(None)
            .await
            .map(|entry| entry.tokens[hit_shard()].clone())
    }

    /// [`TokenCache::get`], as the cache keeps the token, waiting no later than `deadline`.
    pub(crate) async fn entry(&self, deadline: Option<Instant>) -> Result<Arc<Entry>, TokenError> {
        match self.hit(|entry, _| entry.clone()) {
            Some(entry) => Ok(entry),
            None => self.miss(deadline).await,
        }
    }

    /// `take` of the cached entry and this thread's shard, if the entry is usable now (counted as
    /// a hit).
    #[inline]
    fn hit<T>(&self, take: impl FnOnce(&Arc<Entry>, usize) -> T) -> Option<T> {
        let now = self.inner.now();
        let current = self.inner.current.load();
        let entry = current.as_ref().filter(|entry| entry.is_usable(now))?;
        let shard = hit_shard();
        self.inner.counters.hits[shard].fetch_add(1, Relaxed);
        if entry.refresh_due(now) {
            // The background timer should be doing this; make sure it happens even if the
            // runtime that owned the timer is gone.
            self.inner.refresh_if_due(false);
        }
        Some(take(entry, shard))
    }

    async fn miss(&self, deadline: Option<Instant>) -> Result<Arc<Entry>, TokenError> {
        self.inner.counters.waits.fetch_add(1, Relaxed);
        self.inner.fetch_or_wait(deadline).await
    }

    /// The server rejected the login with `rejected`: a different token to retry with, or `None`
    /// when a different one cannot help or cannot be had (the provider returned the same token,
    /// or `rejected` was itself fetched after a rejection).
    ///
    /// Asks the provider at most once per token for which it answered, however many logins it
    /// failed: a request that failed (the provider unavailable) leaves the next refusal free to
    /// ask again once the provider may be asked. Meanwhile every other caller keeps getting the
    /// current token without waiting (a rejection may say nothing about the token, e.g. a wrong
    /// role name). Waits no later than `deadline`, or the fetch timeout.
    pub(crate) async fn replacement_for(
        &self,
        rejected: &Entry,
        deadline: Option<Instant>,
    ) -> Result<Option<Arc<Entry>>, TokenError> {
        let inner = &self.inner;
        for _ in 0..3 {
            let (receiver, effects) = {
                let mut state = inner.lock_state();
                let now = inner.now();
                let current = inner.usable(now);
                if let Some(current) = &current
                    && current.secret() != rejected.secret()
                {
                    return Ok(Some(current.clone()));
                }
                match state.fetch_in_progress() {
                    Some(receiver) => (receiver, Effects::default()),
                    None => {
                        // What is known of the rejected token: the cache's own entry for it, when
                        // it still holds it (a refresh may have returned it again).
                        let known = current.as_deref().unwrap_or(rejected);
                        if rejected.after_rejection
                            || known.after_rejection
                            || known.replacement_requested.load(SeqCst)
                        {
                            return Ok(None);
                        }
                        if let Some(error) = inner.must_wait(&state, now) {
                            return Err(error);
                        }
                        let (receiver, mut effects) =
                            inner.begin_fetch(&mut state, Trigger::Rejected)?;
                        effects.log = Some(LogLine::Replacing);
                        (receiver, effects)
                    }
                }
            };
            if effects.fetch.is_some() {
                inner.counters.invalidations.fetch_add(1, Relaxed);
                #[cfg(feature = "opentelemetry_0_33")]
                inner.metrics.invalidated();
            }
            inner.run(effects);
            match inner.wait(receiver, deadline).await {
                Waited::Done(Ok(_)) => {
                    // The provider answered after the rejection: if with the same token, asking
                    // again cannot help, for as long as it is the one held.
                    if let Some(current) = inner.usable(inner.now())
                        && current.secret() == rejected.secret()
                    {
                        current.replacement_requested.store(true, SeqCst);
                        return Ok(None);
                    }
                }
                Waited::Abandoned => {}
                Waited::Done(Err(error)) => return Err(error),
                Waited::TimedOut(waited) => return Err(inner.wait_timeout(waited)),
            }
        }
        Ok(None)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let now = self.inner.clock.now();
        let consecutive_failures = self.inner.lock_state().failures;
        CacheStats {
            requests: c.requests.load(Relaxed),
            successes: c.successes.load(Relaxed),
            unchanged: c.unchanged.load(Relaxed),
            failures: c.failures.load(Relaxed),
            hits: c.hits.iter().map(|shard| shard.load(Relaxed)).sum(),
            waits: c.waits.load(Relaxed),
            invalidations: c.invalidations.load(Relaxed),
            consecutive_failures,
            expires_in: self
                .inner
                .current
                .load()
                .as_ref()
                .and_then(|t| t.expires_on().duration_since(now).ok()),
        }
    }

    /// The readable name of the identity this cache holds tokens for.
    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    /// The scope this cache requests.
    pub fn scope(&self) -> &str {
        &self.inner.scope
    }

    /// The time on the cache's clocks.
    pub(crate) fn now(&self) -> Now {
        self.inner.now()
    }

    /// Whether no usable token is cached and none can be had now, short of the provider refusing:
    /// a request is still running (a slow or stalled provider's first request runs up to the
    /// fetch timeout before it fails), or the last one found the provider unavailable
    /// (unreachable, slow, failing, throttling). Nothing could replace a session now.
    pub(crate) fn provider_unavailable(&self) -> bool {
        let now = self.inner.now();
        if self.inner.usable(now).is_some() {
            return false;
        }
        let state = self.inner.lock_state();
        state.fetch_in_progress().is_some()
            || state
                .last_error
                .as_ref()
                .is_some_and(|e| e.kind().is_unavailability())
    }

    /// A token is wanted although no caller waits for one (a pool keeps sessions past their
    /// retirement while the provider is unavailable): asks the provider again, at the steady rate
    /// callers would, so that the sessions are retired soon after it answers again.
    pub(crate) fn wanted(&self) {
        let inner = &self.inner;
        let effects = {
            let Ok(mut state) = inner.state.try_lock() else {
                return;
            };
            let now = inner.now();
            if inner.usable(now).is_some()
                || state.fetch_in_progress().is_some()
                || inner.must_wait(&state, now).is_some()
            {
                return;
            }
            // Outside a Tokio runtime there is no one to run it; the next caller will.
            match inner.begin_fetch(&mut state, Trigger::Caller) {
                Ok((_, effects)) => effects,
                Err(_) => return,
            }
        };
        inner.run(effects);
    }

    /// Why no usable token is cached, if none is: the last failure, or a fetch still running.
    pub(crate) fn failure(&self) -> Option<TokenError> {
        let now = self.inner.now();
        if self.inner.usable(now).is_some() {
            return None;
        }
        let state = self.inner.lock_state();
        if let Some(error) = &state.last_error {
            return Some(error.clone());
        }
        let since = state.inflight_since?;
        Some(
            TokenError::new(
                TokenErrorKind::Timeout,
                format!(
                    "the request to the identity provider has not been answered yet ({} so far)",
                    human(now.mono.saturating_duration_since(since))
                ),
            )
            .for_cache(&self.inner.identity, &self.inner.scope),
        )
    }

    /// Counts a login the server refused, and whether it is retried (metrics).
    pub(crate) fn note_login_rejected(&self, retried: bool) {
        #[cfg(feature = "opentelemetry_0_33")]
        {
            self.inner.metrics.login_rejected();
            if retried {
                self.inner.metrics.login_retried();
            }
        }
        #[cfg(not(feature = "opentelemetry_0_33"))]
        let _ = retried;
    }
}

impl Inner {
    /// What the metrics' gauges read: seconds until the current token stops being handed out (0
    /// once it has, and before the first token), its age (none before the first token), and the
    /// failures since the last success.
    #[cfg(feature = "opentelemetry_0_33")]
    fn reading(cache: std::sync::Weak<Inner>) -> crate::metrics::TokenReading {
        Box::new(move || {
            let inner = cache.upgrade()?;
            let failures = inner.lock_state().failures;
            let now = inner.now();
            let token = inner.current.load_full();
            Some(crate::metrics::Reading {
                time_to_expiry: token
                    .as_ref()
                    .map_or(0.0, |token| token.usable_for(now).as_secs_f64()),
                age: token.map(|token| {
                    now.wall
                        .duration_since(token.received_at)
                        .unwrap_or_default()
                        .as_secs_f64()
                }),
                consecutive_failures: u64::from(failures),
            })
        })
    }

    fn now(&self) -> Now {
        Now {
            wall: self.clock.now(),
            mono: Instant::now(),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere: every update is a single assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable(&self, now: Now) -> Option<Arc<Entry>> {
        self.current
            .load_full()
            .filter(|token| token.is_usable(now))
    }

    /// The last error, if a caller without a token must not start a fetch yet: the provider
    /// failed less than `retry_interval` ago, or asked to wait (`Retry-After`).
    fn must_wait(&self, state: &State, now: Now) -> Option<TokenError> {
        let error = state.last_error.as_ref()?;
        let mut next = state.last_attempt? + self.options.retry_interval;
        if let Some(asked) = state.retry_after_until {
            next = next.max(asked);
        }
        let wait = next.saturating_duration_since(now.mono);
        if wait.is_zero() {
            return None;
        }
        Some(error.clone().with_retry_in(wait))
    }

    fn wait_timeout(&self, waited: Duration) -> TokenError {
        TokenError::new(
            TokenErrorKind::Timeout,
            format!(
                "no token within {}: the request to the identity provider is still running",
                human(waited)
            ),
        )
        .for_cache(&self.identity, &self.scope)
    }

    /// Waits for a fetch, until `deadline` or the fetch timeout and a grace. The fetch ends itself
    /// within the fetch timeout; the grace covers a fetch running on another runtime that is
    /// blocked or shutting down.
    async fn wait(
        &self,
        mut receiver: watch::Receiver<Option<FetchResult>>,
        deadline: Option<Instant>,
    ) -> Waited {
        let started = Instant::now();
        let limit = started + self.options.fetch_timeout_value() + WAIT_GRACE;
        let limit = deadline.map_or(limit, |d| d.min(limit));
        let outcome = tokio::time::timeout_at(limit, receiver.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(result)) => match result.clone() {
                Some(result) => Waited::Done(result),
                None => Waited::Abandoned,
            },
            Ok(Err(_)) => Waited::Abandoned,
            Err(_) => Waited::TimedOut(started.elapsed()),
        }
    }

    async fn fetch_or_wait(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<Arc<Entry>, TokenError> {
        // A fetch may be abandoned (its runtime shut down) or return a token that is already too
        // old by the time we see it; both are rare, so a couple of rounds suffice.
        let mut waited_for_attempt = false;
        let mut round = 0;
        while round < 3 {
            let next = {
                let mut state = self.lock_state();
                let now = self.now();
                if let Some(token) = self.usable(now) {
                    return Ok(token);
                }
                match state.fetch_in_progress() {
                    Some(receiver) => Ok((receiver, Effects::default())),
                    None => match self.must_wait(&state, now) {
                        // The provider is unavailable and the next attempt is due within the
                        // retry interval and before the caller's deadline: wait for it, so that
                        // callers are served as soon as the provider answers again rather than at
                        // their own next try (bb8 retries a failed connect only every 200 ms to
                        // half its timeout).
                        Some(error) if !waited_for_attempt && error.kind().is_unavailability() => {
                            let wait = error.retry_in().unwrap_or_default();
                            let fits = deadline.is_none_or(|d| now.mono + wait < d);
                            if wait > self.options.retry_interval || !fits {
                                return Err(error);
                            }
                            Err(wait)
                        }
                        Some(error) => return Err(error),
                        None => Ok(self.begin_fetch(&mut state, Trigger::Caller)?),
                    },
                }
            };
            let receiver = match next {
                Ok((receiver, effects)) => {
                    self.run(effects);
                    receiver
                }
                Err(wait) => {
                    waited_for_attempt = true;
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            round += 1;
            match self.wait(receiver, deadline).await {
                Waited::Done(Ok(token)) if token.is_usable(self.now()) => {
                    return Ok(token);
                }
                Waited::Done(Ok(_)) | Waited::Abandoned => continue,
                Waited::Done(Err(error)) => return Err(error),
                Waited::TimedOut(waited) => return Err(self.wait_timeout(waited)),
            }
        }
        Err(TokenError::new(
            TokenErrorKind::Cancelled,
            "the token fetch ended without an answer (its Tokio runtime shut down, or its task \
             panicked: in the token source, or in a log sink or meter it wrote to)",
        )
        .for_cache(&self.identity, &self.scope))
    }
}

#[cfg(test)]
mod tests;
