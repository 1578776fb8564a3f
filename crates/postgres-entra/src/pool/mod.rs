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
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

pub use crate::cache::Now;
use crate::cache::{Entry, TokenCache};
use crate::connector::EntraConnector;
use crate::error::{Error, LoginRejected, LoginRetry, Report, RoleSource, human};
use crate::log::FailureLog;

mod core;
mod options;
mod session;

use core::{CoreInner, Refusals, lock};

pub use options::SessionOptions;
pub use session::Session;

/// The longest a pool waits between logins after the server refused one.
const REFUSAL_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The first wait after a refused login.
const REFUSAL_BACKOFF_FIRST: Duration = Duration::from_secs(1);

/// A login's admission past the refusal backoff. A probe's admission holds the pool's one probe
/// for as long as it lives: however the login ends (an outcome, an error, or its future dropped by
/// a timeout or a cancelled checkout), dropping it lets the next login through, so no login can
/// leave the pool waiting for a probe that will never report.
struct Admission<'a> {
    refusals: &'a Mutex<Refusals>,
    probe: Option<u64>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.probe {
            let mut refusals = lock(self.refusals);
            if refusals.probe == Some(id) {
                refusals.probe = None;
            }
        }
    }
}

/// What a driver's login attempt came to: see [`PoolCore::login`].
#[derive(Debug)]
pub enum Attempt<T> {
    /// Logged in: the driver's connection.
    LoggedIn(T),
    /// The server refused the login (SQLSTATE 28000 or 28P01), with its message.
    Refused {
        /// The SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// Any other failure (TLS, network, server), classified.
    Failed(Error),
}

/// One host of a pool's settings: its name, the address it is reached at when the settings give
/// one (instead of resolving the name), and its port.
pub type PoolHost<'a> = (&'a str, Option<IpAddr>, u16);

/// One pool's share of the library: its cache, role, sessions, failures. For the pool adapters.
#[derive(Clone)]
pub struct PoolCore {
    inner: Arc<CoreInner>,
}

/// How long a login waits for a token while the identity provider is unavailable, when its pool
/// sets no limit of its own (bb8's connects, deadpool without a create timeout): bb8's default
/// connection timeout, so that a bb8 connect failing after it has no backoff left to serve.
pub(crate) const OUTAGE_WAIT: Duration = Duration::from_secs(30);

/// The shortest pause between two waits for a token.
const MIN_PAUSE: Duration = Duration::from_millis(20);

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
    /// as the operating system's user), logging in through `connector`: an error, before any token
    /// is fetched, when a token may not go to one of the hosts (see [`EntraConnector`]).
    /// `default_name` names it when the options do not; `create_limit` is how long the pool lets
    /// one connect take (its create or connection timeout): logins end before it, so that the pool
    /// reports our error rather than its own timeout.
    pub fn new(
        connector: &EntraConnector,
        hosts: &[PoolHost<'_>],
        configured_user: Option<&str>,
        options: SessionOptions,
        default_name: String,
        create_limit: Option<Duration>,
    ) -> Result<Self, Error> {
        options.check()?;
        let configured_user = configured_user.filter(|u| !u.is_empty());
        if let (Some(role), Some(user)) = (&connector.inner.role_name, configured_user)
            && role != user
        {
            return Err(Error::config(format!(
                "the connector's role_name is `{role}` and the pool's settings name the user `{user}`: a token logs in as one role, so name it once (remove the user from the settings, or role_name from the connector)"
            )));
        }
        let names: Vec<(&str, Option<IpAddr>)> = hosts.iter().map(|(h, a, _)| (*h, *a)).collect();
        let cache = connector.cache_for(&names)?;
        let targets = hosts
            .iter()
            .map(|(host, _, port)| format!("{host}:{port}"))
            .collect::<Vec<_>>()
            .join(", ");
        let name = options.pool_name.clone().unwrap_or(default_name);
        let inner = Arc::new(CoreInner {
            #[cfg(feature = "opentelemetry_0_33")]
            observed: crate::metrics::Observed::new(&name),
            log: FailureLog::new(format!("connections of pool {name}")),
            connector: connector.clone(),
            cache,
            configured_user: configured_user.map(str::to_owned),
            options,
            name,
            targets,
            create_limit: Mutex::new(create_limit),
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

    /// `host:port` of each of the pool's hosts.
    pub fn targets(&self) -> &str {
        &self.inner.targets
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
        *lock(&self.inner.create_limit)
    }

    /// Sets how long the pool lets one connect take, once the pool's final settings are known.
    pub fn set_create_limit(&self, limit: Option<Duration>) {
        *lock(&self.inner.create_limit) = limit;
    }

    /// When a connect starting now must have its token: before the pool's own limit, with room
    /// left for the login itself.
    fn deadline(&self) -> Option<Instant> {
        let limit = self.create_limit()?;
        let room = (limit / 4).min(Duration::from_secs(2));
        Some(Instant::now() + limit.saturating_sub(room))
    }

    /// A login, written once for every driver: a token from the cache (waiting no later than the
    /// pool's limit allows), the role, `attempt` with them; when the server refuses, one retry with
    /// a different token if one can help; a session for the connection. Refused logins back off
    /// (an error at once meanwhile, then one probe at a time); every failure is logged once and
    /// kept for [`PoolCore::explain`]. The whole login ends within the pool's create limit.
    ///
    /// `attempt` gets the role and the token entry (its secret is the password) and logs in; it
    /// may be called twice. Dropping the returned future at any point leaves nothing held: the
    /// next login is admitted as if this one had never started.
    pub async fn login<T, F, Fut>(&self, mut attempt: F) -> Result<(T, Session), Error>
    where
        F: FnMut(String, Arc<Entry>) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let started = std::time::Instant::now();
        let admission = match self.admit() {
            Ok(admission) => admission,
            Err(error) => {
                self.failed(&error);
                return Err(error);
            }
        };
        match self
            .within_limit(self.login_admitted(&admission, &mut attempt))
            .await
        {
            Ok((connection, entry)) => Ok((connection, self.opened(&entry, started.elapsed()))),
            Err(error) => {
                self.refused(&error, &admission);
                self.failed(&error);
                Err(error)
            }
        }
    }

    /// `login`, ended within the pool's create limit (when it has one), so that the pool reports
    /// our error rather than its own timeout.
    async fn within_limit<T>(
        &self,
        login: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let Some(limit) = self.create_limit() else {
            return login.await;
        };
        let limit = limit.saturating_sub(Duration::from_millis(100).min(limit / 10));
        tokio::time::timeout(limit, login)
            .await
            .unwrap_or_else(|_| {
                Err(Error::connect(
                    self.inner.targets.clone(),
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no connection within {} (the pool's create or connection timeout)",
                            human(limit)
                        ),
                    ),
                ))
            })
    }

    async fn login_admitted<T, F, Fut>(
        &self,
        admission: &Admission<'_>,
        attempt: &mut F,
    ) -> Result<(T, Arc<Entry>), Error>
    where
        F: FnMut(String, Arc<Entry>) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let deadline = self.deadline();
        let cache = &self.inner.cache;
        let entry = self.token(deadline).await?;
        let role = self.role(&entry)?;
        let (code, message) = match attempt(role.0.clone(), entry.clone()).await {
            Attempt::LoggedIn(connection) => return Ok((connection, entry)),
            Attempt::Failed(error) => return Err(error),
            Attempt::Refused { code, message } => (code, message),
        };
        // What the token says, names included: at debug only (the error, logged at warn, keeps
        // to ids).
        tracing::debug!(
            role = %role.0,
            code,
            token = %entry.claims().map_or_else(|e| e.to_string(), ToString::to_string),
            "login refused"
        );
        if admission.probe.is_some() {
            cache.note_login_rejected(false);
            return Err(self.rejected(&entry, role, &code, &message, LoginRetry::NotRetried));
        }
        let replacement = cache.replacement_for(&entry, deadline).await;
        cache.note_login_rejected(matches!(replacement, Ok(Some(_))));
        let fresh = match replacement {
            Ok(Some(fresh)) => fresh,
            Ok(None) => {
                let retry = if entry.after_rejection() {
                    LoginRetry::AlreadyReplaced
                } else {
                    LoginRetry::SameTokenReturned
                };
                return Err(self.rejected(&entry, role, &code, &message, retry));
            }
            Err(error) => {
                let retry = LoginRetry::NoNewToken(error);
                return Err(self.rejected(&entry, role, &code, &message, retry));
            }
        };
        let role = self.role(&fresh)?;
        match attempt(role.0.clone(), fresh.clone()).await {
            Attempt::LoggedIn(connection) => Ok((connection, fresh)),
            Attempt::Refused { code, message } => {
                cache.note_login_rejected(false);
                Err(self.rejected(&fresh, role, &code, &message, LoginRetry::FreshTokenRefused))
            }
            Attempt::Failed(error) => Err(error),
        }
    }

    /// A token for a login that must have it by `deadline` (the pool's limit), or within
    /// [`OUTAGE_WAIT`] when the pool sets none: while the identity provider is unavailable and no
    /// token is cached, the login waits for the cache's next attempts (one per retry interval, or
    /// as the provider asked) rather than failing at once, so that it goes ahead as soon as the
    /// provider answers again. bb8 needs this: it backs off after each failed connect (up to half
    /// its connection timeout), which would delay the recovery by as much. A refusal, or any
    /// failure that is not the provider's unavailability, ends the wait at once.
    async fn token(&self, deadline: Option<Instant>) -> Result<Arc<Entry>, Error> {
        let give_up = deadline.unwrap_or_else(|| Instant::now() + OUTAGE_WAIT);
        loop {
            match self.inner.cache.entry(Some(give_up)).await {
                Ok(entry) => return Ok(entry),
                Err(error)
                    if error.kind().is_unavailability() && Instant::now() + MIN_PAUSE < give_up =>
                {
                    // The cache paces its requests itself; this pause only keeps a wait that the
                    // provider asked for (Retry-After) from spinning.
                    let pause = error.retry_in().unwrap_or_default().max(MIN_PAUSE);
                    tokio::time::sleep_until((Instant::now() + pause).min(give_up)).await;
                }
                Err(error) => return Err(Error::Token(error)),
            }
        }
    }

    /// Admits a login: an error at once while refused logins back off; once the wait is over, one
    /// login at a time is let through as a probe.
    fn admit(&self) -> Result<Admission<'_>, Error> {
        let refusals_lock = &self.inner.refusals;
        let mut refusals = lock(refusals_lock);
        let Some(last) = &refusals.last else {
            return Ok(Admission {
                refusals: refusals_lock,
                probe: None,
            });
        };
        let wait = refusals
            .until
            .map(|until| until.saturating_duration_since(Instant::now()));
        match wait {
            Some(wait) if !wait.is_zero() || refusals.probe.is_some() => {
                let mut again = last.clone();
                again.next_attempt_in = Some(wait.max(Duration::from_millis(100)));
                Err(Error::from(again))
            }
            _ => {
                refusals.probes = refusals.probes.wrapping_add(1);
                let id = refusals.probes;
                refusals.probe = Some(id);
                Ok(Admission {
                    refusals: refusals_lock,
                    probe: Some(id),
                })
            }
        }
    }

    /// The role a login with `entry` uses.
    fn role(&self, entry: &Entry) -> Result<(String, RoleSource), Error> {
        self.inner
            .connector
            .role(self.inner.configured_user.as_deref(), entry.claims())
    }

    /// The error for a login with `entry` as `role` that the server refused with `code` and
    /// `server_message`.
    fn rejected(
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
            token_valid_for: entry
                .expires_on()
                .duration_since(now.wall)
                .unwrap_or_default(),
            code: code.to_owned(),
            server_message: server_message.to_owned(),
            retry,
            next_attempt_in: None,
        })
    }

    /// A connection logged in with `entry`, taking `took`: ends a run of failures and refusals,
    /// and returns its session.
    fn opened(&self, entry: &Entry, took: Duration) -> Session {
        let inner = &self.inner;
        inner.log.success();
        *lock(&inner.last_failure) = None;
        {
            let mut refusals = lock(&inner.refusals);
            if refusals.last.is_some() {
                *refusals = Refusals::default();
            }
        }
        #[cfg(feature = "opentelemetry_0_33")]
        inner
            .connector
            .inner
            .telemetry
            .record_create_time(&inner.observed, took);
        #[cfg(not(feature = "opentelemetry_0_33"))]
        let _ = took;
        let retire = inner.retirement(entry, inner.cache.now(), fastrand::f64(), fastrand::f64());
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&inner.open).insert(id, entry.received_at());
        Session {
            id,
            token_expires_on: entry.expires_on(),
            retire,
            core: Arc::downgrade(inner),
        }
    }

    /// A refused login makes the pool back off (the login that failed with `error` was admitted
    /// with `admission`).
    fn refused(&self, error: &Error, admission: &Admission<'_>) {
        let Error::LoginRejected(rejected) = error else {
            return;
        };
        let mut refusals = lock(&self.inner.refusals);
        refusals.step = refusals.step.saturating_add(1);
        let delay = REFUSAL_BACKOFF_FIRST
            .saturating_mul(1 << refusals.step.saturating_sub(1).min(10))
            .min(REFUSAL_BACKOFF_MAX);
        let delay = delay.mul_f64(0.5 + 0.5 * fastrand::f64());
        refusals.until = Some(Instant::now() + delay);
        refusals.last = Some((**rejected).clone());
        if refusals.probe == admission.probe {
            refusals.probe = None;
        }
    }

    /// A connect failed with `error`: logged (once per kind, then summarized) and kept for
    /// [`PoolCore::explain`].
    fn failed(&self, error: &Error) {
        let inner = &self.inner;
        inner.log.failure(&failure_key(error), &Report(error));
        *lock(&inner.last_failure) = Some(error.clone());
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
    pub fn observe(&self, reader: std::sync::Weak<crate::metrics::PoolReader>) {
        self.inner.observed.set_reader(reader);
    }

    /// Whether sessions past their retirement time may be retired now: not while the identity
    /// provider is unavailable and no token can be had, for nothing could replace them (then the
    /// provider is asked again, and the first time this is said it is logged). Call it before
    /// taking a pool's own lock: it may log and start a request.
    pub fn may_retire(&self) -> bool {
        self.inner.may_retire()
    }

    /// The time on the pool's clocks, for [`Session::is_past_due`].
    pub fn now(&self) -> Now {
        self.inner.cache.now()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TokenError;
    use crate::token::{AccessToken, TokenFuture, TokenSource};
    use std::sync::atomic::AtomicU32;
    use std::time::SystemTime;

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

    fn core(options: SessionOptions) -> PoolCore {
        try_core(options).unwrap()
    }

    fn try_core(options: SessionOptions) -> Result<PoolCore, Error> {
        core_over(Never, None, options)
    }

    /// A pool on localhost whose logins take tokens from `source`, as `user`.
    fn core_over(
        source: impl TokenSource + 'static,
        user: Option<&str>,
        options: SessionOptions,
    ) -> Result<PoolCore, Error> {
        let connector = EntraConnector::builder(source).build().unwrap();
        PoolCore::new(
            &connector,
            &[("localhost", None, 5432)],
            user,
            options,
            "p".to_owned(),
            None,
        )
    }

    const MINUTE: Duration = Duration::from_secs(60);

    /// When a session of `core` that logged in at `now` with a token received then, living
    /// `life`, is due, with `jitter` as both shares of jitter.
    fn due_after(core: &PoolCore, life: Duration, jitter: f64) -> Option<Duration> {
        let now = core.now();
        let entry = Entry::for_test("t", now.wall, now.wall + life);
        let retire = core.inner.retirement(&entry, now, jitter, jitter)?;
        let after = retire.deadline - now.mono;
        assert_eq!(retire.at, now.wall + after, "both clocks say the same");
        Some(after)
    }

    #[test]
    fn jitter_is_a_tenth_of_the_token_life_at_most_and_never_overflows() {
        let _runtime = tokio::runtime::Runtime::new().unwrap().enter();
        let core = core(SessionOptions::new());
        // A 60 s token: retired within 6 s of its expiry, whatever the configured 5 minutes.
        for jitter in [0.0, 0.5, 1.0] {
            let after = due_after(&core, MINUTE, jitter).unwrap();
            assert!(
                after >= MINUTE && after <= MINUTE + Duration::from_secs(6),
                "{jitter}"
            );
        }
        // A day-long token: at most the configured 5 minutes.
        let day = 24 * 60 * MINUTE;
        assert_eq!(due_after(&core, day, 1.0), Some(day + 5 * MINUTE));
        // A grace that overflows `SystemTime` is never due, not a panic.
        let huge = self::core(SessionOptions::new().token_grace(Duration::MAX));
        assert_eq!(due_after(&huge, MINUTE, 1.0), None);
        let ageless = self::core(SessionOptions::new().max_age(Duration::MAX, Duration::ZERO));
        assert!(due_after(&ageless, MINUTE, 0.0).is_some_and(|d| d <= MINUTE));
        // The age limit, less its jitter, when it comes first.
        let aged = self::core(SessionOptions::new().max_age(MINUTE, MINUTE / 2));
        assert_eq!(due_after(&aged, 24 * 60 * MINUTE, 1.0), Some(MINUTE / 2));
    }

    #[test]
    fn without_a_bound_nothing_is_due_and_options_that_cannot_work_are_refused() {
        let _runtime = tokio::runtime::Runtime::new().unwrap().enter();
        let unbounded = core(SessionOptions::new().token_bound(false));
        assert_eq!(due_after(&unbounded, MINUTE, 1.0), None);
        assert!(!unbounded.retires_sessions());
        for (options, says) in [
            (
                SessionOptions::new().reap_interval(Duration::ZERO),
                "reap_interval",
            ),
            (
                SessionOptions::new().max_age(Duration::ZERO, Duration::ZERO),
                "max_age",
            ),
            (SessionOptions::new().max_age(MINUTE, 2 * MINUTE), "jitter"),
        ] {
            let error = try_core(options).unwrap_err();
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

    /// A provider that takes 5 ms to answer with a new hour-long token.
    #[derive(Debug, Default)]
    struct Fresh(AtomicU32);

    impl TokenSource for Fresh {
        fn get_token<'a>(&'a self, _: &'a str) -> TokenFuture<'a> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = self.0.fetch_add(1, Ordering::SeqCst);
                Ok(AccessToken::new(
                    format!("token-{n}"),
                    SystemTime::now() + 60 * MINUTE,
                ))
            })
        }
        fn identity(&self) -> String {
            "fresh".to_owned()
        }
    }

    /// A login attempt taking 10 ms, refused while `refusing` holds.
    async fn attempt(refusing: Arc<AtomicBool>) -> Attempt<()> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if refusing.load(Ordering::SeqCst) {
            Attempt::Refused {
                code: "28000".to_owned(),
                message: "role does not exist".to_owned(),
            }
        } else {
            Attempt::LoggedIn(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_dropped_at_any_point_leaves_nothing_held_and_the_next_one_is_admitted() {
        let core = core_over(Fresh::default(), Some("app"), SessionOptions::new()).unwrap();
        let refusing = Arc::new(AtomicBool::new(true));
        let login = || {
            let refusing = refusing.clone();
            core.login(move |_, _| attempt(refusing.clone()))
        };
        let error = login().await.unwrap_err();
        assert!(matches!(error, Error::LoginRejected(_)), "{error}");

        // Probes dropped at every millisecond of a login: waiting for the admission's token,
        // in the first attempt, waiting for a replacement, in the retry.
        for after in 0..40 {
            tokio::time::advance(REFUSAL_BACKOFF_MAX + Duration::from_secs(1)).await;
            let dropped = tokio::time::timeout(Duration::from_millis(after), login()).await;
            if let Ok(outcome) = dropped {
                assert!(outcome.is_err(), "still refused");
            }
            // Whatever became of it, the next login past the wait is admitted.
            tokio::time::advance(REFUSAL_BACKOFF_MAX + Duration::from_secs(1)).await;
            assert!(
                core.admit().is_ok(),
                "a login {after} ms in left its probe behind"
            );
        }

        // Once the role exists, the next login past the wait logs in.
        refusing.store(false, Ordering::SeqCst);
        tokio::time::advance(REFUSAL_BACKOFF_MAX + Duration::from_secs(1)).await;
        let (_, session) = login().await.expect("logged in after the refusal cleared");
        assert_eq!(core.open_sessions(), 1);
        drop(session);
        assert_eq!(core.open_sessions(), 0);
    }
    /// A source failing with `failing` (none: answering) until told otherwise, counting calls.
    #[derive(Debug, Clone, Default)]
    struct Switched {
        failing: Arc<Mutex<Option<crate::error::TokenErrorKind>>>,
        calls: Arc<AtomicU32>,
    }

    impl TokenSource for Switched {
        fn get_token<'a>(&'a self, _: &'a str) -> TokenFuture<'a> {
            let failing = *lock(&self.failing);
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match failing {
                    Some(kind) => Err(TokenError::new(kind, "switched off")),
                    None => Ok(AccessToken::new("token", SystemTime::now() + 60 * MINUTE)),
                }
            })
        }
        fn identity(&self) -> String {
            "switched".to_owned()
        }
    }

    /// A login with no limit from its pool waits out an unavailable provider (for up to
    /// `OUTAGE_WAIT`) and goes ahead within a retry interval of its answering again, asking it
    /// at the cache's steady rate meanwhile; a refusal ends the wait at once.
    #[tokio::test(start_paused = true)]
    async fn a_login_waits_out_an_unavailable_provider_and_not_a_refusing_one() {
        use crate::error::TokenErrorKind::{CredentialRejected, ServerError};
        let source = Switched::default();
        *lock(&source.failing) = Some(ServerError);
        let core = core_over(source.clone(), Some("app"), SessionOptions::new()).unwrap();
        let login = core.login(|_, _| async { Attempt::LoggedIn(()) });
        tokio::pin!(login);
        let answered = tokio::select! {
            _ = &mut login => panic!("logged in while the provider failed"),
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                *lock(&source.failing) = None;
                Instant::now()
            }
        };
        let (_, session) = login.await.expect("logged in once the provider answered");
        assert!(Instant::now() - answered <= Duration::from_millis(800));
        let calls = source.calls.load(Ordering::SeqCst);
        assert!((12..=15).contains(&calls), "{calls} requests in 10 s");
        drop(session);

        // Never answering: the login ends after the wait, with the provider's error.
        let never = Switched::default();
        *lock(&never.failing) = Some(ServerError);
        let core = core_over(never, Some("app"), SessionOptions::new()).unwrap();
        let started_again = Instant::now();
        let error = core
            .login(|_, _| async { Attempt::LoggedIn(()) })
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Token(_)), "{error}");
        let waited = Instant::now() - started_again;
        assert!(
            waited >= OUTAGE_WAIT - Duration::from_secs(1) && waited <= OUTAGE_WAIT,
            "{waited:?}"
        );

        // A refused credential: at once.
        let refusing = Switched::default();
        *lock(&refusing.failing) = Some(CredentialRejected);
        let core = core_over(refusing, Some("app"), SessionOptions::new()).unwrap();
        let at = Instant::now();
        core.login(|_, _| async { Attempt::LoggedIn(()) })
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), at);
    }
}
