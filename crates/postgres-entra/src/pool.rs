//! What every pool adapter does the same way: which cache and role a pool's logins use, how long
//! a login may wait for a token, refused logins backing off, failures logged once and summarized,
//! the last failure kept for `explain`, and sessions bounded by their login token.
//!
//! Azure Database for PostgreSQL checks the Entra token only when a connection logs in: an open
//! session keeps working after its token has expired, so disabling a principal, removing it from
//! a group or dropping its role takes effect on pooled connections only once the pool replaces
//! them. A [`Session`] is retired once its token has expired (plus grace and jitter), unless the
//! identity provider is unavailable: then nothing could replace it, and it is kept until a token
//! can be had again.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use crate::cache::{Entry, TokenCache};
use crate::connector::EntraConnector;
use crate::error::{Error, LoginRejected, LoginRetry, RoleSource, TokenError, human};
use crate::log::FailureLog;

/// What this library adds to a pool: sessions bounded by their login token, an age limit, the
/// pool's name in metrics. The same options for every adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    token_bound: bool,
    token_grace: Duration,
    retire_jitter: Duration,
    max_age: Option<Duration>,
    max_age_jitter: Duration,
    reap_interval: Duration,
    pool_name: Option<String>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            token_bound: true,
            token_grace: Duration::ZERO,
            retire_jitter: Duration::from_secs(5 * 60),
            max_age: None,
            max_age_jitter: Duration::ZERO,
            reap_interval: Duration::from_secs(30),
            pool_name: None,
        }
    }
}

impl PoolOptions {
    /// Sessions bounded by their login token, no age limit, idle connections checked every 30 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a connection is retired once the token it logged in with has expired (default
    /// `true`): revoking a principal then takes effect on pooled connections within one token
    /// lifetime (plus grace and jitter), for the cost of one reconnect per connection per token
    /// lifetime. Off, sessions outlive their token until the pool drops them.
    ///
    /// A connection is never interrupted: it is retired when it is idle or returned, and a
    /// checkout never fails because of it. While the identity provider is unavailable
    /// (unreachable, slow, failing, throttling) and no token can be had, nothing could replace
    /// a session, so none is retired until a token can be had again; a provider that refuses the
    /// credential, or a server that refuses a fresh token, does not keep them.
    #[must_use]
    pub fn token_bound(mut self, on: bool) -> Self {
        self.token_bound = on;
        self
    }

    /// How long after its token's expiry a connection may still be used (default none).
    #[must_use]
    pub fn token_grace(mut self, grace: Duration) -> Self {
        self.token_grace = grace;
        self
    }

    /// The most a connection's retirement is delayed at random after its token's expiry (plus
    /// grace), drawn per connection so that connections that logged in with one (shared) token do
    /// not all reconnect in the same second. Never more than a tenth of the token's life, so
    /// revocation takes effect within 1.1 token lifetimes (plus grace). Default five minutes.
    #[must_use]
    pub fn retire_jitter(mut self, jitter: Duration) -> Self {
        self.retire_jitter = jitter;
        self
    }

    /// Retire connections older than `max_age` minus up to `jitter`, chosen per connection so
    /// that connections made together do not all go together, on the same terms as the token
    /// bound (idle or returned, kept while the provider is unavailable). `jitter` must not exceed
    /// `max_age`.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration, jitter: Duration) -> Self {
        self.max_age = Some(max_age);
        self.max_age_jitter = jitter;
        self
    }

    /// How often idle connections are checked for retirement, where the pool has no hook that
    /// does it (deadpool; default 30 s).
    #[must_use]
    pub fn reap_interval(mut self, interval: Duration) -> Self {
        self.reap_interval = interval;
        self
    }

    /// The pool's name in its metrics (`db.client.connection.pool.name`) and logs. Default:
    /// `host:port/database`, from the pool's settings.
    #[must_use]
    pub fn pool_name(mut self, name: impl Into<String>) -> Self {
        self.pool_name = Some(name.into());
        self
    }

    fn check(&self) -> Result<(), Error> {
        if self.reap_interval.is_zero() {
            return Err(Error::config(
                "a reap_interval of zero would check the pool without pause",
            ));
        }
        match self.max_age {
            Some(age) if age.is_zero() => Err(Error::config(
                "a max_age of zero would retire every connection at once",
            )),
            Some(age) if self.max_age_jitter > age => Err(Error::config(format!(
                "the max_age jitter ({:?}) exceeds the max_age ({age:?})",
                self.max_age_jitter
            ))),
            _ => Ok(()),
        }
    }
}

/// The longest a pool waits between logins after the server refused one.
const REFUSAL_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The first wait after a refused login.
const REFUSAL_BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// Refused logins back off: after a refusal, the pool does not log in again until the wait is
/// over, and then one login at a time probes whether the refusal still holds.
#[derive(Debug, Default)]
struct Refusals {
    last: Option<LoginRejected>,
    until: Option<Instant>,
    step: u32,
    probing: bool,
}

/// One pool's share of the library: its cache, role, sessions, failures. For the pool adapters.
#[derive(Clone)]
pub struct PoolCore {
    inner: Arc<CoreInner>,
}

struct CoreInner {
    connector: EntraConnector,
    cache: TokenCache,
    configured_user: Option<String>,
    options: PoolOptions,
    name: String,
    create_limit: Option<Duration>,
    open: Mutex<HashMap<u64, SystemTime>>,
    next_id: AtomicU64,
    retired: AtomicU64,
    keeping_logged: AtomicBool,
    refusals: Mutex<Refusals>,
    log: FailureLog,
    last_failure: Mutex<Option<Error>>,
    #[cfg(feature = "opentelemetry_0_33")]
    observed: crate::metrics::Observed,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single assignment, insert or remove: consistent across a panic elsewhere.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl fmt::Debug for PoolCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCore")
            .field("name", &self.inner.name)
            .field("cache", &self.inner.cache)
            .field("options", &self.inner.options)
            .field("open", &lock(&self.inner.open).len())
            .finish_non_exhaustive()
    }
}

/// A short, stable name for the kind of `error`, for the failure log.
fn failure_key(error: &Error) -> String {
    match error {
        Error::Token(e) => format!("token/{}", e.kind().as_str()),
        Error::LoginRejected(_) => "login_rejected".to_owned(),
        Error::Tls { .. } => "tls".to_owned(),
        Error::Config { .. } => "config".to_owned(),
        Error::Connect { .. } => "connect".to_owned(),
        Error::Postgres { code, .. } => format!("postgres/{}", code.as_deref().unwrap_or("-")),
    }
}

impl PoolCore {
    /// A pool whose settings name `hosts` and, explicitly, `configured_user` (not a default such
    /// as the operating system's user), logging in through `connector`. `default_name` names it
    /// when the options do not; `create_limit` is how long the pool lets one connect take (its
    /// create or connection timeout): waits for a token end before it, so that the pool reports
    /// our error rather than its own timeout.
    pub fn new(
        connector: &EntraConnector,
        hosts: &[&str],
        configured_user: Option<&str>,
        options: PoolOptions,
        default_name: String,
        create_limit: Option<Duration>,
    ) -> Result<Self, Error> {
        options.check()?;
        let cache = connector.cache_for(hosts)?;
        let name = options.pool_name.clone().unwrap_or(default_name);
        let inner = Arc::new(CoreInner {
            #[cfg(feature = "opentelemetry_0_33")]
            observed: crate::metrics::Observed::new(&name),
            log: FailureLog::new(format!("connections of pool {name}")),
            connector: connector.clone(),
            cache,
            configured_user: configured_user.filter(|u| !u.is_empty()).map(str::to_owned),
            options,
            name,
            create_limit,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            keeping_logged: AtomicBool::new(false),
            refusals: Mutex::default(),
            last_failure: Mutex::new(None),
        });
        #[cfg(feature = "opentelemetry_0_33")]
        {
            let observed: Arc<dyn crate::metrics::ObservedPool> = inner.clone();
            connector
                .inner
                .telemetry
                .register(Arc::downgrade(&observed));
        }
        Ok(Self { inner })
    }

    /// The token cache this pool's logins use.
    pub fn cache(&self) -> &TokenCache {
        &self.inner.cache
    }

    /// The connector.
    pub fn connector(&self) -> &EntraConnector {
        &self.inner.connector
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether sessions are bounded by their token or an age.
    pub fn retires_sessions(&self) -> bool {
        self.inner.options.token_bound || self.inner.options.max_age.is_some()
    }

    /// How often idle connections are checked for retirement (pools without a hook for it).
    pub fn reap_interval(&self) -> Duration {
        self.inner.options.reap_interval
    }

    /// How long the pool lets one connect take, when it limits it.
    pub fn create_limit(&self) -> Option<Duration> {
        self.inner.create_limit
    }

    /// When a connect starting now must have its token: before the pool's own limit, with room
    /// left for the login itself.
    pub fn deadline(&self) -> Option<Instant> {
        let limit = self.inner.create_limit?;
        let room = (limit / 4).min(Duration::from_secs(2));
        Some(Instant::now() + limit.saturating_sub(room))
    }

    /// A token to log in with, waiting no later than `deadline`; an error at once while refused
    /// logins back off.
    pub async fn token(&self, deadline: Option<Instant>) -> Result<Arc<Entry>, Error> {
        self.refusal_gate()?;
        self.inner.cache.entry(deadline).await.map_err(Error::Token)
    }

    /// The last refusal, while refused logins back off; lets one login through (a probe) once
    /// the wait is over.
    fn refusal_gate(&self) -> Result<(), Error> {
        let mut refusals = lock(&self.inner.refusals);
        let Some(last) = &refusals.last else {
            return Ok(());
        };
        let now = Instant::now();
        let wait = refusals
            .until
            .map(|until| until.saturating_duration_since(now));
        match wait {
            Some(wait) if !wait.is_zero() || refusals.probing => {
                let mut again = last.clone();
                again.next_attempt_in = Some(wait.max(Duration::from_millis(100)));
                Err(Error::from(again))
            }
            _ => {
                refusals.probing = true;
                Ok(())
            }
        }
    }

    /// Whether refused logins are backing off and the login in flight is the one let through
    /// (a probe): it is not retried with another token, so that a revoked principal costs the
    /// server at most one refused login per wait.
    pub fn probing(&self) -> bool {
        lock(&self.inner.refusals).probing
    }

    /// The role a login with `entry` uses.
    pub fn role(&self, entry: &Entry) -> Result<(String, RoleSource), Error> {
        self.inner
            .connector
            .role(self.inner.configured_user.as_deref(), entry.claims())
    }

    /// A different token to retry a refused login with, or `None` when one cannot help.
    pub async fn replacement_for(
        &self,
        rejected: &Entry,
        deadline: Option<Instant>,
    ) -> Result<Option<Arc<Entry>>, TokenError> {
        self.inner.cache.replacement_for(rejected, deadline).await
    }

    /// Counts a refused login, and whether it is retried (metrics).
    pub fn note_refused(&self, retried: bool) {
        self.inner.cache.note_login_rejected(retried);
    }

    /// The error for a login with `entry` as `role` that the server refused with `code` and
    /// `server_message`.
    pub fn rejected(
        &self,
        entry: &Entry,
        (role, role_source): (String, RoleSource),
        code: &str,
        server_message: &str,
        retry: LoginRetry,
    ) -> Error {
        let now = self.inner.cache.now();
        Error::from(LoginRejected {
            role,
            role_source,
            claims: entry.claims().ok().cloned(),
            token_valid_for: entry.expires_on().duration_since(now).unwrap_or_default(),
            code: code.to_owned(),
            server_message: server_message.to_owned(),
            retry,
            next_attempt_in: None,
        })
    }

    /// A connection logged in with `entry`, taking `took`: ends a run of failures and refusals,
    /// and returns its session.
    pub fn opened(&self, entry: &Entry, took: Duration) -> Session {
        let inner = &self.inner;
        self.succeeded();
        #[cfg(feature = "opentelemetry_0_33")]
        inner
            .connector
            .inner
            .telemetry
            .record_create_time(&inner.observed, took);
        #[cfg(not(feature = "opentelemetry_0_33"))]
        let _ = took;
        let (retire_at, age_limit_at) = inner.retirement(
            entry.received_at(),
            entry.expires_on(),
            inner.cache.now(),
            fastrand::f64(),
        );
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&inner.open).insert(id, entry.received_at());
        Session {
            id,
            token_expires_on: entry.expires_on(),
            retire_at,
            age_limit_at,
            core: Arc::downgrade(inner),
        }
    }

    /// Connects work again (for a driver that connects itself: a usable token is in its
    /// settings): ends a run of failures and refused logins.
    pub fn succeeded(&self) {
        let inner = &self.inner;
        inner.log.success();
        *lock(&inner.last_failure) = None;
        let mut refusals = lock(&inner.refusals);
        if refusals.last.is_some() {
            *refusals = Refusals::default();
        }
    }

    /// Whether no usable token can be had now because the provider failed (rather than because
    /// the first request is still running).
    pub fn token_failed(&self) -> bool {
        self.inner.cache.failed_without_token() || lock(&self.inner.last_failure).is_some()
    }

    /// A connect failed with `error`: logged (once per kind, then summarized), kept for
    /// [`PoolCore::explain`], and a refused login makes the pool back off.
    pub fn failed(&self, error: &Error) {
        let inner = &self.inner;
        inner.log.failure(&failure_key(error), error);
        *lock(&inner.last_failure) = Some(error.clone());
        let mut refusals = lock(&inner.refusals);
        match error {
            Error::LoginRejected(rejected) if rejected.next_attempt_in.is_none() => {
                refusals.step = refusals.step.saturating_add(1);
                let delay = REFUSAL_BACKOFF_FIRST
                    .saturating_mul(1 << refusals.step.saturating_sub(1).min(10))
                    .min(REFUSAL_BACKOFF_MAX);
                let delay = delay.mul_f64(0.5 + 0.5 * fastrand::f64());
                refusals.until = Some(Instant::now() + delay);
                refusals.last = Some((**rejected).clone());
                refusals.probing = false;
            }
            // The probe ended otherwise (no token, the network): let the next one through.
            Error::LoginRejected(_) => {}
            _ => refusals.probing = false,
        }
    }

    /// Why the pool's last connect failed, while no connect has succeeded since; else why no
    /// token can be had now, if none can. For explaining a pool's untyped timeout.
    pub fn explain(&self) -> Option<Error> {
        if let Some(error) = lock(&self.inner.last_failure).clone() {
            return Some(error);
        }
        self.inner.cache.failure().map(Error::Token)
    }

    /// Reads the pool's counts for its metrics while `reader` lives (a reader that holds the pool
    /// itself must be kept beside the pool, not in it).
    #[cfg(feature = "opentelemetry_0_33")]
    pub fn observe(&self, reader: Weak<crate::metrics::PoolReader>) {
        self.inner.observed.set_reader(reader);
    }

    /// When a connection made at `created_at`, logged in with a token received at `received_at`
    /// and expiring at `expires_on`, is due for retirement (`jitter`, in 0..1, picks its share of
    /// the jitter): for drivers that keep no data with a connection (sqlx).
    pub fn retire_at(
        &self,
        received_at: SystemTime,
        expires_on: SystemTime,
        created_at: SystemTime,
        jitter: f64,
    ) -> Option<SystemTime> {
        match self
            .inner
            .retirement(received_at, expires_on, created_at, jitter)
        {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a connection due at `retire_at` is to be retired now (not while the identity
    /// provider is unavailable); counts it if so.
    pub fn retire_if_due(&self, retire_at: Option<SystemTime>) -> bool {
        let due = self.inner.is_due(retire_at);
        if due {
            self.inner.count_retired(None);
        }
        due
    }

    /// Connections open now.
    pub fn open_sessions(&self) -> usize {
        lock(&self.inner.open).len()
    }

    /// Connections retired so far because their token expired or they reached their age.
    pub fn retired(&self) -> u64 {
        self.inner.retired.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "opentelemetry_0_33")]
impl crate::metrics::ObservedPool for CoreInner {
    fn observed(&self) -> &crate::metrics::Observed {
        &self.observed
    }

    fn oldest_token_age(&self) -> Option<Duration> {
        CoreInner::oldest_token_age(self)
    }
}

impl CoreInner {
    /// When a connection is due under the token bound, and under the age limit.
    fn retirement(
        &self,
        received_at: SystemTime,
        expires_on: SystemTime,
        created_at: SystemTime,
        jitter: f64,
    ) -> (Option<SystemTime>, Option<SystemTime>) {
        let options = &self.options;
        let retire_at = if options.token_bound {
            // Jitter in proportion to the token's life, so short tokens are retired promptly too.
            let life = expires_on.duration_since(received_at).unwrap_or_default();
            let spread = options.retire_jitter.min(life / 10);
            expires_on
                .checked_add(options.token_grace)
                .and_then(|at| at.checked_add(spread.mul_f64(jitter.clamp(0.0, 1.0))))
        } else {
            None
        };
        let age_limit_at = options.max_age.and_then(|age| {
            created_at
                .checked_add(age.saturating_sub(options.max_age_jitter.mul_f64(fastrand::f64())))
        });
        (retire_at, age_limit_at)
    }

    /// Whether a connection due at `at` is retired now: not while the identity provider is
    /// unavailable and no token can be had, for nothing could replace it.
    fn is_due(&self, at: Option<SystemTime>) -> bool {
        let Some(at) = at else {
            return false;
        };
        if self.cache.now() < at {
            return false;
        }
        if self.cache.provider_unavailable() {
            self.cache.wanted();
            if !self.keeping_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    pool = %self.name,
                    "keeping sessions past their retirement time: the identity provider is unavailable, so no new login could replace them; they are retired once a token can be had again"
                );
            }
            return false;
        }
        self.keeping_logged.store(false, Ordering::Relaxed);
        true
    }

    fn count_retired(&self, token_expires_on: Option<SystemTime>) {
        self.retired.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "opentelemetry_0_33")]
        self.connector
            .inner
            .telemetry
            .record_retired(&self.observed);
        tracing::debug!(
            pool = %self.name,
            token_expired = token_expires_on.map(|at| human(
                self.cache.now().duration_since(at).unwrap_or_default()
            )),
            "retiring a connection whose login token expired or that reached its age limit"
        );
    }

    /// How long ago the oldest token still in use by an open connection was received.
    #[cfg_attr(not(feature = "opentelemetry_0_33"), allow(dead_code))]
    fn oldest_token_age(&self) -> Option<Duration> {
        let oldest = lock(&self.open).values().min().copied()?;
        Some(self.cache.now().duration_since(oldest).unwrap_or_default())
    }
}

/// One open connection's login token and retirement time, kept with the connection. Dropping it
/// (with its connection) forgets it.
pub struct Session {
    id: u64,
    token_expires_on: SystemTime,
    retire_at: Option<SystemTime>,
    age_limit_at: Option<SystemTime>,
    core: Weak<CoreInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token_expires_on", &self.token_expires_on)
            .field("retire_at", &self.retire_at())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// When the token the connection logged in with expires.
    pub fn token_expires_on(&self) -> SystemTime {
        self.token_expires_on
    }

    /// When the connection is due for retirement, if its pool retires sessions.
    pub fn retire_at(&self) -> Option<SystemTime> {
        match (self.retire_at, self.age_limit_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the connection is due for retirement now. A due connection is kept while the
    /// identity provider is unavailable and no token can be had: nothing could replace it.
    pub fn is_due(&self) -> bool {
        self.core
            .upgrade()
            .is_some_and(|core| core.is_due(self.retire_at()))
    }

    /// Counts the connection as retired (drop the session with it).
    pub fn retired(&self) {
        if let Some(core) = self.core.upgrade() {
            core.count_retired(Some(self.token_expires_on));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            lock(&core.open).remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenFuture;
    use crate::token::TokenSource;

    #[derive(Debug)]
    struct Never;

    impl TokenSource for Never {
        fn get_token<'a>(&'a self, _: &'a str) -> TokenFuture<'a> {
            Box::pin(async {
                Err(TokenError::new(
                    crate::error::TokenErrorKind::Other,
                    "never",
                ))
            })
        }
        fn identity(&self) -> String {
            "never".to_owned()
        }
    }

    fn core(options: PoolOptions) -> PoolCore {
        let connector = EntraConnector::builder(Never).build().unwrap();
        PoolCore::new(
            &connector,
            &["localhost"],
            None,
            options,
            "p".to_owned(),
            None,
        )
        .unwrap()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn jitter_is_a_tenth_of_the_token_life_at_most_and_never_overflows() {
        let core = core(PoolOptions::new());
        let received = SystemTime::now();
        // A 60 s token: retired within 6 s of its expiry, whatever the configured 5 minutes.
        let expires = received + MINUTE;
        for jitter in [0.0, 0.5, 1.0] {
            let at = core.retire_at(received, expires, received, jitter).unwrap();
            assert!(
                at >= expires && at <= expires + Duration::from_secs(6),
                "{jitter}"
            );
        }
        // A day-long token: at most the configured 5 minutes.
        let day = received + 24 * 60 * MINUTE;
        assert_eq!(
            core.retire_at(received, day, received, 1.0),
            Some(day + 5 * MINUTE)
        );
        // A grace that overflows `SystemTime` is never due, not a panic.
        let huge = self::core(PoolOptions::new().token_grace(Duration::MAX));
        assert_eq!(huge.retire_at(received, expires, received, 1.0), None);
        let ageless = self::core(PoolOptions::new().max_age(Duration::MAX, Duration::ZERO));
        assert!(
            ageless
                .retire_at(received, expires, received, 0.0)
                .is_some_and(|at| at <= expires + Duration::from_secs(6))
        );
    }

    #[test]
    fn without_a_bound_nothing_is_due_and_options_that_cannot_work_are_refused() {
        let unbounded = core(PoolOptions::new().token_bound(false));
        let now = SystemTime::now();
        assert_eq!(
            unbounded.retire_at(now - MINUTE, now - MINUTE / 2, now, 1.0),
            None
        );
        assert!(!unbounded.retire_if_due(None));
        assert!(!unbounded.retires_sessions());
        let connector = EntraConnector::builder(Never).build().unwrap();
        for (options, says) in [
            (
                PoolOptions::new().reap_interval(Duration::ZERO),
                "reap_interval",
            ),
            (
                PoolOptions::new().max_age(Duration::ZERO, Duration::ZERO),
                "max_age",
            ),
            (PoolOptions::new().max_age(MINUTE, 2 * MINUTE), "jitter"),
        ] {
            let error =
                PoolCore::new(&connector, &["h"], None, options, "p".to_owned(), None).unwrap_err();
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    #[test]
    fn a_refused_login_reads_the_same_whenever_it_is_displayed() {
        let rejected = LoginRejected {
            role: "orders-api".to_owned(),
            role_source: RoleSource::ConnectionConfig,
            claims: None,
            token_valid_for: Duration::from_secs(42),
            code: "28000".to_owned(),
            server_message: "LDAP authentication failed".to_owned(),
            retry: LoginRetry::FreshTokenRefused,
            next_attempt_in: Some(Duration::from_secs(3)),
        };
        let first = rejected.to_string();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(rejected.to_string(), first, "Display reads no clock");
        assert!(first.contains("valid for another 42 s"), "{first}");
        assert!(first.contains("logs in again in 3 s"), "{first}");
    }
}
