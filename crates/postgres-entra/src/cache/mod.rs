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
use crossbeam_utils::CachePadded;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::claims::{ClaimsError, TokenClaims};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Report, TokenError, TokenErrorKind, human};
use crate::log::FailureLog;
use crate::scope::{Cloud, validate_scope};
use crate::token::{AccessToken, TokenSource};

/// How the cache refreshes, retries and decides a token is too old to hand out. Checked when
/// the cache is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    expiry_buffer: Duration,
    fetch_timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    retry_interval: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            expiry_buffer: Duration::from_secs(30),
            fetch_timeout: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            retry_interval: Duration::from_millis(800),
        }
    }
}

/// How much longer than the fetch timeout a caller waits for a fetch another caller started.
const WAIT_GRACE: Duration = Duration::from_secs(1);

/// The shortest retry delay: anything shorter makes a tight loop against the provider.
const MIN_RETRY: Duration = Duration::from_millis(10);

/// The shortest wait before asking again a source that answered with the token already held:
/// halving what remains would otherwise ask in a tight loop near the end of a token whose source
/// never renews it early.
const MIN_REASK: Duration = Duration::from_secs(1);

impl CacheOptions {
    /// Never hand out a token expiring within this margin (capped at a tenth of its lifetime),
    /// so a login never races the expiry. Default 30 seconds.
    #[must_use]
    pub fn expiry_buffer(mut self, buffer: Duration) -> Self {
        self.expiry_buffer = buffer;
        self
    }

    /// Give up on one request to the identity provider after this long; it also bounds how long
    /// any caller waits for a token. Default 10 seconds. Must not be zero.
    #[must_use]
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// While a valid token is still served, a failed refresh is retried after `initial` (at
    /// least 10 ms), doubling with each consecutive failure up to `max`, with jitter; a
    /// `Retry-After` from the provider is honoured up to `max`. Defaults 500 ms and 60 seconds.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// While no usable token is cached, callers that want one make the cache ask the provider
    /// again at most this often (at least 10 ms), or after the provider's `Retry-After` (up to the
    /// longest backoff). While the provider is unavailable, callers between two attempts wait for
    /// the next one (within their deadline), so an outage ends for the pools within about this
    /// long of the provider answering again. Default 800 ms: the first checkout after the
    /// provider recovers succeeds within a second, and the provider hears about one request a
    /// second meanwhile (1.25 at most).
    #[must_use]
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        let problem = if self.fetch_timeout.is_zero() {
            Some("fetch_timeout is zero: no fetch could ever finish".to_owned())
        } else if self.backoff_initial < MIN_RETRY || self.retry_interval < MIN_RETRY {
            Some(format!(
                "the first backoff delay ({:?}) or the retry interval ({:?}) is under {MIN_RETRY:?}: a failing identity provider would be asked in a tight loop",
                self.backoff_initial, self.retry_interval
            ))
        } else if self.backoff_max < self.backoff_initial {
            Some(format!(
                "the longest backoff delay ({:?}) is shorter than the first ({:?})",
                self.backoff_max, self.backoff_initial
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => Err(Error::config(format!("cache options: {problem}"))),
            None => Ok(()),
        }
    }

    pub(crate) fn fetch_timeout_value(&self) -> Duration {
        self.fetch_timeout
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

/// A token as the cache keeps it: the token, when it was received, when it is refreshed and
/// until when it is handed out, and what it says.
///
/// Each moment is kept on the wall clock (token expiries are wall-clock times) and, from the
/// moment the token was received, on the monotonic clock: a token is handed out only while both
/// say it is usable, and refreshed as soon as either says it is due, so that a wall clock stepped
/// back (NTP, a restored VM) neither keeps a token longer nor delays a refresh, and one that jumps
/// ahead (a resumed VM) retires it at once.
pub struct Entry {
    /// The token, one copy per hit shard: a hit clones its thread's copy, so that threads on
    /// several cores do not share one reference count.
    tokens: [Arc<AccessToken>; HIT_SHARDS],
    received_at: SystemTime,
    refresh_at: SystemTime,
    usable_until: SystemTime,
    refresh_deadline: Instant,
    usable_deadline: Instant,
    claims: Result<TokenClaims, ClaimsError>,
    /// Fetched because the server rejected the token before it.
    after_rejection: bool,
    /// A replacement was asked for after the server rejected this token.
    replacement_requested: AtomicBool,
}

impl Entry {
    /// The token.
    pub fn token(&self) -> &AccessToken {
        &self.tokens[0]
    }

    /// The token itself: the PostgreSQL password.
    pub fn secret(&self) -> &str {
        self.tokens[0].secret()
    }

    /// When the token expires.
    pub fn expires_on(&self) -> SystemTime {
        self.tokens[0].expires_on()
    }

    /// When the cache received it.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    /// Until when the cache hands it out.
    pub fn usable_until(&self) -> SystemTime {
        self.usable_until
    }

    /// When the cache starts refreshing it.
    pub fn refresh_at(&self) -> SystemTime {
        self.refresh_at
    }

    /// Its claims, or why they could not be read.
    pub fn claims(&self) -> Result<&TokenClaims, &ClaimsError> {
        self.claims.as_ref()
    }

    /// Whether it was fetched because the server rejected the token before it.
    pub fn after_rejection(&self) -> bool {
        self.after_rejection
    }

    /// Whether it may be handed out at `now`.
    pub(crate) fn is_usable(&self, now: Now) -> bool {
        now.wall < self.usable_until && now.mono < self.usable_deadline
    }

    fn refresh_due(&self, now: Now) -> bool {
        now.wall >= self.refresh_at || now.mono >= self.refresh_deadline
    }

    /// An entry for `secret`, received at `received_at` and expiring at `expires_on`, as if the
    /// monotonic clock read now when it was received.
    #[cfg(test)]
    pub(crate) fn for_test(secret: &str, received_at: SystemTime, expires_on: SystemTime) -> Self {
        let mono = Instant::now();
        let after = |at: SystemTime| mono + at.duration_since(received_at).unwrap_or_default();
        Entry {
            tokens: copies(AccessToken::new(secret, expires_on)),
            received_at,
            refresh_at: expires_on,
            usable_until: expires_on,
            refresh_deadline: after(expires_on),
            usable_deadline: after(expires_on),
            claims: AccessToken::new(secret, expires_on).claims(),
            after_rejection: false,
            replacement_requested: AtomicBool::new(false),
        }
    }

    /// How long until it stops being handed out, by whichever clock says sooner.
    pub(crate) fn usable_for(&self, now: Now) -> Duration {
        self.usable_until
            .duration_since(now.wall)
            .unwrap_or_default()
            .min(self.usable_deadline.saturating_duration_since(now.mono))
    }

    /// When it stops being handed out, on the monotonic clock (whichever clock says sooner).
    fn usable_deadline_at(&self, now: Now) -> Instant {
        now.mono + self.usable_for(now)
    }
}

/// The time on both clocks: the wall clock (as the cache's clock reads it) for token expiries, and
/// Tokio's monotonic clock for every wait and deadline.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub(crate) wall: SystemTime,
    pub(crate) mono: Instant,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("token", &self.tokens[0])
            .field("refresh_at", &self.refresh_at)
            .field("usable_until", &self.usable_until)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// Counters a user can read, e.g. to export as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests made to the token source.
    pub requests: u64,
    /// Requests that produced a new usable token.
    pub successes: u64,
    /// Requests answered with the token already held (the source's own cache answered: a
    /// credential's, a managed-identity endpoint's, a developer tool's); neither a success nor a
    /// failure.
    pub unchanged: u64,
    /// Requests that failed (error, timeout, panic, or a token expired on arrival).
    pub failures: u64,
    /// Calls answered from the cache without waiting.
    pub hits: u64,
    /// Calls that had to wait for a fetch (or were told the provider is failing).
    pub waits: u64,
    /// Rejected tokens for which the cache asked the provider for a different one.
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
    unchanged: AtomicU64,
    failures: AtomicU64,
    /// Written on every hit: spread over cache lines of their own, one per thread (modulo
    /// [`HIT_SHARDS`]), so that threads counting hits on several cores do not take one line from
    /// each other, nor the line the next reader of the current token needs.
    hits: [CachePadded<AtomicU64>; HIT_SHARDS],
    waits: AtomicU64,
    invalidations: AtomicU64,
}

/// How many counters the hits are spread over.
const HIT_SHARDS: usize = 8;

/// `token` once per hit shard, each copy its own allocation.
fn copies(token: AccessToken) -> [Arc<AccessToken>; HIT_SHARDS] {
    std::array::from_fn(|_| Arc::new(token.clone()))
}

/// This thread's hit counter and token copy: threads take the shards in turn.
fn hit_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % HIT_SHARDS;
    }
    SHARD.with(|shard| *shard)
}

type FetchResult = Result<Arc<Entry>, TokenError>;

/// Why a fetch was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A caller found no usable token.
    Caller,
    /// The refresh point passed, or a retry after a failure.
    Background,
    /// The server rejected the current token.
    Rejected,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Caller => "caller",
            Trigger::Background => "background",
            Trigger::Rejected => "rejected",
        }
    }
}

/// The cache's bookkeeping, under its mutex. Every time in it is monotonic. Nothing is logged,
/// spawned, aborted or called back while the mutex is held: what a change needs done outside is
/// returned as [`Effects`].
#[derive(Default)]
struct State {
    /// The fetch in progress, if any: every caller that misses waits on this one.
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    /// When the fetch in progress started.
    inflight_since: Option<Instant>,
    failures: u32,
    last_error: Option<TokenError>,
    /// When the last fetch started.
    last_attempt: Option<Instant>,
    /// The provider asked not to be called before this (`Retry-After`).
    retry_after_until: Option<Instant>,
    /// The next background retry (exponential backoff).
    background_at: Option<Instant>,
    /// The one pending wake-up (refresh or retry).
    timer: Option<AbortHandle>,
    /// Bumped by every schedule: a timer started for an older one is stale.
    timer_generation: u64,
}

/// What a change of [`State`] needs done once its mutex is released.
#[derive(Default)]
#[must_use]
struct Effects {
    fetch: Option<Fetch>,
    /// A wake-up to start (its generation, and when), and the one it replaces, to abort.
    timer: Option<(u64, Instant)>,
    abort: Option<AbortHandle>,
    log: Option<LogLine>,
}

/// A line to log once the state's mutex is released.
enum LogLine {
    Fetched { expires_in: Duration },
    Unchanged { again_in: Duration },
    Failed { key: String, message: String },
    Replacing,
}

/// A fetch the state records as in progress, to be spawned once the mutex is released.
struct Fetch {
    sender: watch::Sender<Option<FetchResult>>,
    trigger: Trigger,
    runtime: tokio::runtime::Handle,
}

impl State {
    fn fetch_in_progress(&self) -> Option<watch::Receiver<Option<FetchResult>>> {
        // A fetch whose runtime shut down dropped its sender: it is not in progress any more.
        self.inflight
            .clone()
            .filter(|receiver| receiver.has_changed().is_ok())
    }
}

struct Inner {
    #[cfg(feature = "opentelemetry_0_33")]
    metrics: crate::metrics::TokenMetrics,
    source: Arc<dyn TokenSource>,
    identity: String,
    scope: String,
    options: CacheOptions,
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Entry>,
    state: Mutex<State>,
    counters: Counters,
    log: FailureLog,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
    }
}

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
        // The hit path clones the token alone: one atomic increment per call.
        if let Some(token) = self.hit(|entry| entry.tokens[hit_shard()].clone()) {
            return Ok(token);
        }
        self.miss(None)
            .await
            .map(|entry| entry.tokens[hit_shard()].clone())
    }

    /// [`TokenCache::get`], as the cache keeps the token, waiting no later than `deadline`.
    pub(crate) async fn entry(&self, deadline: Option<Instant>) -> Result<Arc<Entry>, TokenError> {
        match self.hit(Arc::clone) {
            Some(entry) => Ok(entry),
            None => self.miss(deadline).await,
        }
    }

    /// `take` of the cached entry if it is usable now (counted as a hit).
    #[inline]
    fn hit<T>(&self, take: impl FnOnce(&Arc<Entry>) -> T) -> Option<T> {
        let now = self.inner.now();
        let current = self.inner.current.load();
        let entry = current.as_ref().filter(|entry| entry.is_usable(now))?;
        self.inner.counters.hits[hit_shard()].fetch_add(1, Relaxed);
        if entry.refresh_due(now) {
            // The background timer should be doing this; make sure it happens even if the
            // runtime that owned the timer is gone.
            self.inner.refresh_if_due(false);
        }
        Some(take(entry))
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
            "the token fetch did not complete (its Tokio runtime shut down)",
        )
        .for_cache(&self.identity, &self.scope))
    }

    /// Starts a background fetch if the current token is due for refresh (or there is none left
    /// after failures) and no fetch or backoff is pending. `blocking`: wait for the state lock
    /// (timers) rather than skip when it is busy (callers on the hot path).
    fn refresh_if_due(self: &Arc<Self>, blocking: bool) {
        let effects = {
            let mut state = if blocking {
                self.lock_state()
            } else {
                match self.state.try_lock() {
                    Ok(state) => state,
                    Err(_) => return,
                }
            };
            if state.fetch_in_progress().is_some() {
                return;
            }
            let now = self.now();
            if state.background_at.is_some_and(|at| now.mono < at) {
                return;
            }
            let due = match self.current.load().as_ref() {
                Some(token) => token.refresh_due(now),
                None => state.last_error.is_some(),
            };
            if !due {
                return;
            }
            // After a failure, never before the retry interval since the last attempt (perhaps a
            // caller's): a failing provider hears at most one request per interval. (A
            // `Retry-After` is already in the retry's time, up to the end of the token served.)
            let spaced = state
                .last_attempt
                .filter(|_| state.last_error.is_some())
                .map(|at| at + self.options.retry_interval)
                .filter(|at| *at > now.mono);
            if let Some(at) = spaced {
                if !blocking {
                    return;
                }
                let mut effects = Effects::default();
                self.schedule(&mut state, at, &mut effects);
                effects
            } else {
                // Outside a Tokio runtime there is no one to run it; the next caller will.
                match self.begin_fetch(&mut state, Trigger::Background) {
                    Ok((_, effects)) => effects,
                    Err(_) => return,
                }
            }
        };
        self.run(effects);
    }

    /// Records a fetch as in progress (callers from now on wait for it); the fetch itself is
    /// spawned by [`Inner::run`] once the state's mutex is released.
    fn begin_fetch(
        &self,
        state: &mut State,
        trigger: Trigger,
    ) -> Result<(watch::Receiver<Option<FetchResult>>, Effects), TokenError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            TokenError::new(
                TokenErrorKind::Other,
                "the token cache needs a Tokio runtime (with time enabled) to fetch tokens",
            )
            .for_cache(&self.identity, &self.scope)
        })?;
        let (sender, receiver) = watch::channel(None);
        let now = Instant::now();
        state.inflight = Some(receiver.clone());
        state.inflight_since = Some(now);
        state.last_attempt = Some(now);
        self.counters.requests.fetch_add(1, Relaxed);
        let effects = Effects {
            fetch: Some(Fetch {
                sender,
                trigger,
                runtime,
            }),
            ..Effects::default()
        };
        Ok((receiver, effects))
    }

    /// Does what a change of state left to do, with the state's mutex released: logs, aborts a
    /// replaced wake-up, starts a fetch and a wake-up.
    fn run(self: &Arc<Self>, effects: Effects) {
        let Effects {
            fetch,
            timer,
            abort,
            log,
        } = effects;
        if let Some(abort) = abort {
            abort.abort();
        }
        match log {
            Some(LogLine::Fetched { expires_in }) => {
                tracing::debug!(expires_in_secs = expires_in.as_secs(), "token fetched");
                self.log.success();
            }
            Some(LogLine::Unchanged { again_in }) => tracing::debug!(
                again_in_secs = again_in.as_secs(),
                "the token source answered with the token already held (its own cache); asking again later"
            ),
            Some(LogLine::Failed { key, message }) => self.log.failure(&key, &message),
            Some(LogLine::Replacing) => tracing::info!(
                identity = %self.identity,
                "the server rejected a token; asking the identity provider for a different one"
            ),
            None => {}
        }
        if let Some((generation, at)) = timer {
            self.start_timer(generation, at);
        }
        if let Some(fetch) = fetch {
            self.spawn_fetch(fetch);
        }
    }

    fn spawn_fetch(self: &Arc<Self>, fetch: Fetch) {
        let Fetch {
            sender,
            trigger,
            runtime,
        } = fetch;
        let inner = self.clone();
        runtime.spawn(async move {
            let span = tracing::debug_span!(
                "entra_token_fetch",
                identity = %inner.identity,
                scope = %inner.scope,
                trigger = trigger.as_str()
            );
            async {
                tracing::debug!("requesting a token");
                #[cfg(feature = "opentelemetry_0_33")]
                let started = Instant::now();
                let result = inner.request().await;
                let (outcome, unchanged, effects) = inner.complete(result, trigger);
                #[cfg(feature = "opentelemetry_0_33")]
                inner.metrics.request_done(
                    trigger.as_str(),
                    started.elapsed(),
                    match &outcome {
                        Ok(_) if unchanged => crate::metrics::Answer::Unchanged,
                        Ok(_) => crate::metrics::Answer::Token,
                        Err(error) => crate::metrics::Answer::Failure(error.kind()),
                    },
                );
                #[cfg(not(feature = "opentelemetry_0_33"))]
                let _ = unchanged;
                // Waiters first: nothing a log sink does holds them up.
                let _ = sender.send(Some(outcome));
                inner.run(effects);
            }
            .instrument(span)
            .await;
        });
    }

    /// One request to the token source, within the fetch timeout. The source runs in a task of
    /// its own, so that a source that panics is a failure like any other (counted, backed off),
    /// not a fetch that silently vanishes.
    async fn request(self: &Arc<Self>) -> Result<AccessToken, TokenError> {
        let inner = self.clone();
        let mut call = tokio::spawn(async move { inner.source.get_token(&inner.scope).await });
        let timeout = self.options.fetch_timeout_value();
        let outcome = match tokio::time::timeout(timeout, &mut call).await {
            Ok(Ok(result)) => result,
            Ok(Err(failed)) if failed.is_panic() => Err(TokenError::new(
                TokenErrorKind::Cancelled,
                "the token source panicked",
            )),
            Ok(Err(_)) => Err(TokenError::new(
                TokenErrorKind::Cancelled,
                "the token request was cancelled",
            )),
            Err(_) => {
                call.abort();
                Err(TokenError::new(
                    TokenErrorKind::Timeout,
                    format!(
                        "no answer from the identity provider within {}",
                        human(timeout)
                    ),
                ))
            }
        };
        outcome.map_err(|e| e.for_cache(&self.identity, &self.scope))
    }

    /// Records the outcome of a fetch; what it leaves to do (a line, a wake-up) is returned.
    fn complete(
        self: &Arc<Self>,
        result: Result<AccessToken, TokenError>,
        trigger: Trigger,
    ) -> (FetchResult, bool, Effects) {
        let now = self.now();
        {
            let mut state = self.lock_state();
            state.inflight = None;
            state.inflight_since = None;
            let (outcome, unchanged) =
                match result.and_then(|access| self.accept(access, now, trigger)) {
                    Ok((token, unchanged)) => (Ok(token), unchanged),
                    Err(error) => (Err(error), false),
                };
            let mut effects = Effects::default();
            match &outcome {
                Ok(token) if unchanged => {
                    // Neither a success (nothing new was had) nor a failure: the failures so far,
                    // if any, still stand.
                    self.counters.unchanged.fetch_add(1, Relaxed);
                    state.background_at = None;
                    effects.log = Some(LogLine::Unchanged {
                        again_in: token.refresh_deadline.saturating_duration_since(now.mono),
                    });
                    self.schedule(&mut state, token.refresh_deadline, &mut effects);
                }
                Ok(token) => {
                    self.counters.successes.fetch_add(1, Relaxed);
                    state.failures = 0;
                    state.last_error = None;
                    state.retry_after_until = None;
                    state.background_at = None;
                    effects.log = Some(LogLine::Fetched {
                        expires_in: token
                            .expires_on()
                            .duration_since(now.wall)
                            .unwrap_or_default(),
                    });
                    self.schedule(&mut state, token.refresh_deadline, &mut effects);
                }
                Err(error) => {
                    self.counters.failures.fetch_add(1, Relaxed);
                    state.failures = state.failures.saturating_add(1);
                    let mut delay = self.options.backoff_delay(state.failures, fastrand::f64());
                    let asked = error
                        .provider_retry_after()
                        .map(|asked| asked.min(self.options.backoff_max));
                    if let Some(asked) = asked {
                        delay = delay.max(asked);
                    }
                    state.retry_after_until = asked.map(|asked| now.mono + asked);
                    let serving = self.usable(now);
                    let mut retry_at = now.mono + delay;
                    if let Some(token) = &serving {
                        // Try again no later than the current token stops being handed out.
                        retry_at = retry_at.min(token.usable_deadline_at(now));
                    }
                    state.background_at = Some(retry_at);
                    state.last_error = Some(error.clone());
                    effects.log = Some(match &serving {
                        Some(token) => LogLine::Failed {
                            key: format!("refresh/{}", error.kind().as_str()),
                            message: format!(
                                "refreshing the token failed; the current one is still handed out for {}: {}",
                                human(token.usable_for(now)),
                                Report(error)
                            ),
                        },
                        None => LogLine::Failed {
                            key: format!("no_token/{}", error.kind().as_str()),
                            message: format!(
                                "{} (callers make the cache ask again every {})",
                                Report(error),
                                human(self.options.retry_interval)
                            ),
                        },
                    });
                    // Keep retrying in the background, so a recovered provider is noticed before
                    // the current token runs out (or, with none left, before the next caller).
                    self.schedule(&mut state, retry_at, &mut effects);
                }
            }
            (outcome, unchanged, effects)
        }
    }

    /// Checks a token from the source and makes it current; with `true` when it is the token
    /// already held (the source's own cache answered).
    fn accept(
        &self,
        access: AccessToken,
        now: Now,
        trigger: Trigger,
    ) -> Result<(Arc<Entry>, bool), TokenError> {
        let expired = |what: &str| {
            Err(
                TokenError::new(TokenErrorKind::ExpiredOnArrival, what.to_owned())
                    .for_cache(&self.identity, &self.scope),
            )
        };
        let held = self
            .current
            .load_full()
            .filter(|t| t.secret() == access.secret());
        if let Some(held) = held {
            // What is known about the token stays (when it was received, until when it is handed
            // out, a rejection); the cache asks again once half of what remains has passed.
            if !held.is_usable(now) {
                return expired(
                    "the token source answered with the token already held, which is past its usable life",
                );
            }
            let left = held.usable_for(now);
            let again = (left / 2).max(MIN_REASK).min(left);
            let token = Arc::new(Entry {
                tokens: held.tokens.clone(),
                received_at: held.received_at,
                refresh_at: now.wall + again,
                usable_until: held.usable_until,
                refresh_deadline: now.mono + again,
                usable_deadline: held.usable_deadline,
                claims: held.claims.clone(),
                after_rejection: held.after_rejection,
                replacement_requested: AtomicBool::new(held.replacement_requested.load(SeqCst)),
            });
            self.current.store(Some(token.clone()));
            return Ok((token, true));
        }
        let expires_on = access.expires_on();
        let lifetime = expires_on.duration_since(now.wall).unwrap_or_default();
        let buffer = self.options.expiry_buffer.min(lifetime / 10);
        let usable_until = expires_on - buffer;
        if lifetime.is_zero() || usable_until <= now.wall {
            return expired("the identity provider returned a token that had already expired");
        }
        let refresh_at = (now.wall + lifetime / 2).min(usable_until);
        let on_mono = |at: SystemTime| now.mono + at.duration_since(now.wall).unwrap_or_default();
        let claims = access.claims();
        let token = Arc::new(Entry {
            tokens: copies(access),
            received_at: now.wall,
            refresh_at,
            usable_until,
            refresh_deadline: on_mono(refresh_at),
            usable_deadline: on_mono(usable_until),
            claims,
            after_rejection: trigger == Trigger::Rejected,
            replacement_requested: AtomicBool::new(false),
        });
        self.current.store(Some(token.clone()));
        Ok((token, false))
    }

    /// Arranges a wake-up at `at` to refresh or retry if still due then, replacing any earlier
    /// one (started and aborted by [`Inner::run`]).
    fn schedule(&self, state: &mut State, at: Instant, effects: &mut Effects) {
        state.timer_generation = state.timer_generation.wrapping_add(1);
        effects.abort = state.timer.take();
        effects.timer = Some((state.timer_generation, at));
    }

    /// Starts the wake-up of generation `generation`, unless a newer one was arranged meanwhile.
    /// Holds only a weak reference, and is aborted when the cache is dropped.
    fn start_timer(self: &Arc<Self>, generation: u64, at: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let timer = runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(inner) = weak.upgrade() {
                inner.refresh_if_due(true);
            }
        });
        let stale = {
            let mut state = self.lock_state();
            if state.timer_generation == generation {
                state.timer = Some(timer.abort_handle());
                None
            } else {
                Some(timer)
            }
        };
        if let Some(stale) = stale {
            stale.abort();
        }
    }
}

#[cfg(test)]
mod tests;
