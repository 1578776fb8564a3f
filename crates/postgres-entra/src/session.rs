//! Sessions bounded by their login token.
//!
//! Azure Database for PostgreSQL checks the Entra token only when a connection logs in: an open
//! session keeps working after its token has expired, so disabling a principal, removing it from
//! a group or dropping its role takes effect on pooled connections only once the pool replaces
//! them. [`TokenBound`] retires a connection once the token it logged in with has expired;
//! [`Sessions`] keeps, for a pool adapter, each open connection's token and retirement time.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

#[cfg(doc)]
use crate::Connection;

/// Retire a connection once the token it logged in with has expired, plus `grace`, plus a share
/// of `jitter` drawn per connection: connections that logged in with the same (shared) token
/// then reconnect spread over the jitter rather than in the same second.
///
/// A connection is never interrupted: the pool adapters retire it when it is idle (at checkout,
/// at recycle, or by a periodic check) or when it is returned. The default is no grace and up to
/// five minutes of jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBound {
    grace: Duration,
    jitter: Duration,
}

impl Default for TokenBound {
    fn default() -> Self {
        Self {
            grace: Duration::ZERO,
            jitter: Duration::from_secs(5 * 60),
        }
    }
}

impl TokenBound {
    /// No grace, up to five minutes of jitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long after its token's expiry a connection may still be used (default none).
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The spread of retirement times after the expiry plus grace (default five minutes).
    #[must_use]
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// When a connection whose token expires at `token_expires_on` is retired: the expiry plus
    /// the grace plus a random share of the jitter.
    pub fn retire_at(&self, token_expires_on: SystemTime) -> SystemTime {
        token_expires_on + self.grace + self.jitter.mul_f64(fastrand::f64())
    }

    /// The latest a connection outlives its token: grace plus jitter.
    pub fn max_overrun(&self) -> Duration {
        self.grace + self.jitter
    }
}

/// The open connections of one pool and the tokens they logged in with: when each is due for
/// retirement under the pool's [`TokenBound`] (if any), and the oldest token still in use.
///
/// For pool adapters: register each new connection with [`Sessions::open`] and keep the
/// returned [`Session`] with it; ask [`Session::is_due`] when the connection is idle or returned,
/// and call [`Session::retired`] when retiring it for that reason. Cheap to clone; clones share.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<SessionsInner>,
}

struct SessionsInner {
    bound: Option<TokenBound>,
    next_id: AtomicU64,
    /// When each open connection's token was received, by session id.
    open: Mutex<HashMap<u64, SystemTime>>,
    retired: AtomicU64,
    #[cfg(feature = "opentelemetry")]
    retired_counter: std::sync::OnceLock<crate::metrics::RetiredCounter>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("bound", &self.inner.bound)
            .field("open", &self.count())
            .field("retired", &self.retired())
            .finish()
    }
}

impl Sessions {
    /// Sessions retired under `bound`, or never when it is `None`.
    pub fn new(bound: Option<TokenBound>) -> Self {
        Self {
            inner: Arc::new(SessionsInner {
                bound,
                next_id: AtomicU64::new(0),
                open: Mutex::new(HashMap::new()),
                retired: AtomicU64::new(0),
                #[cfg(feature = "opentelemetry")]
                retired_counter: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The bound sessions are retired under.
    pub fn bound(&self) -> Option<TokenBound> {
        self.inner.bound
    }

    /// Registers a connection that has just logged in with a token received at
    /// `token_received_at` and expiring at `token_expires_on` (see
    /// [`Connection::token_expires_on`], [`crate::Token::expires_on`]); keep the returned session
    /// with the connection and drop it with it.
    pub fn open(&self, token_received_at: SystemTime, token_expires_on: SystemTime) -> Session {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.lock_open().insert(id, token_received_at);
        Session {
            id,
            token_expires_on,
            retire_at: self
                .inner
                .bound
                .map(|bound| bound.retire_at(token_expires_on)),
            sessions: Arc::downgrade(&self.inner),
        }
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.inner.lock_open().len()
    }

    /// Connections retired so far because their token had expired.
    pub fn retired(&self) -> u64 {
        self.inner.retired.load(Ordering::Relaxed)
    }

    /// How long ago the oldest token still in use by an open connection was received.
    pub fn oldest_token_age(&self) -> Option<Duration> {
        self.inner.oldest_token_age()
    }

    /// Reads [`Sessions::oldest_token_age`] without keeping the sessions alive: `None` once they
    /// are gone.
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn oldest_token_age_reader(
        &self,
    ) -> impl Fn() -> Option<Option<Duration>> + Send + Sync + 'static {
        let inner = Arc::downgrade(&self.inner);
        move || inner.upgrade().map(|inner| inner.oldest_token_age())
    }

    #[cfg(feature = "opentelemetry")]
    pub(crate) fn count_retired_with(&self, counter: crate::metrics::RetiredCounter) {
        let _ = self.inner.retired_counter.set(counter);
    }
}

impl SessionsInner {
    fn oldest_token_age(&self) -> Option<Duration> {
        let oldest = self.lock_open().values().min().copied()?;
        Some(SystemTime::now().duration_since(oldest).unwrap_or_default())
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SystemTime>> {
        // Every update is a single insert or remove: the map stays consistent across a panic.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open connection's login token and retirement time. Dropping it (with its connection)
/// removes it from its [`Sessions`].
pub struct Session {
    id: u64,
    token_expires_on: SystemTime,
    retire_at: Option<SystemTime>,
    sessions: Weak<SessionsInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("token_expires_on", &self.token_expires_on)
            .field("retire_at", &self.retire_at)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// When the token the connection logged in with expires.
    pub fn token_expires_on(&self) -> SystemTime {
        self.token_expires_on
    }

    /// When the connection is due for retirement, if its pool bounds sessions.
    pub fn retire_at(&self) -> Option<SystemTime> {
        self.retire_at
    }

    /// Whether the connection is due for retirement now.
    pub fn is_due(&self) -> bool {
        self.retire_at.is_some_and(|at| at <= SystemTime::now())
    }

    /// Counts the connection as retired because its token expired (drop the session with it).
    pub fn retired(&self) {
        if let Some(sessions) = self.sessions.upgrade() {
            sessions.retired.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "opentelemetry")]
            if let Some(counter) = sessions.retired_counter.get() {
                counter.add();
            }
            tracing::debug!(
                token_expired_secs_ago = SystemTime::now()
                    .duration_since(self.token_expires_on)
                    .unwrap_or_default()
                    .as_secs(),
                "retiring a connection whose login token has expired"
            );
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(sessions) = self.sessions.upgrade() {
            sessions.lock_open().remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn retirement_falls_between_expiry_plus_grace_and_that_plus_jitter() {
        let bound = TokenBound::new().grace(MINUTE).jitter(2 * MINUTE);
        let expiry = SystemTime::now();
        let times: Vec<_> = (0..1000).map(|_| bound.retire_at(expiry)).collect();
        assert!(
            times
                .iter()
                .all(|t| *t >= expiry + MINUTE && *t <= expiry + 3 * MINUTE)
        );
        let (earliest, latest) = (times.iter().min().unwrap(), times.iter().max().unwrap());
        let spread = latest.duration_since(*earliest).unwrap();
        assert!(spread > MINUTE, "drawn per connection: {spread:?}");
        assert_eq!(bound.max_overrun(), 3 * MINUTE);
        assert_eq!(TokenBound::default().max_overrun(), 5 * MINUTE);
    }

    #[test]
    fn sessions_know_their_oldest_token_and_forget_dropped_ones() {
        let sessions = Sessions::new(Some(TokenBound::new().jitter(Duration::ZERO)));
        let now = SystemTime::now();
        let old = sessions.open(now - 10 * MINUTE, now - MINUTE);
        let young = sessions.open(now - MINUTE, now + 59 * MINUTE);
        assert_eq!(sessions.count(), 2);
        let oldest = sessions.oldest_token_age().unwrap();
        assert!(oldest >= 10 * MINUTE && oldest < 11 * MINUTE, "{oldest:?}");
        assert!(old.is_due(), "its token expired a minute ago");
        assert!(!young.is_due());
        old.retired();
        drop(old);
        assert_eq!(sessions.retired(), 1);
        assert_eq!(sessions.count(), 1);
        assert!(sessions.oldest_token_age().unwrap() < 2 * MINUTE);
        drop(young);
        assert_eq!(sessions.oldest_token_age(), None);
    }

    #[test]
    fn without_a_bound_nothing_is_ever_due() {
        let sessions = Sessions::new(None);
        let now = SystemTime::now();
        let session = sessions.open(now - 120 * MINUTE, now - 60 * MINUTE);
        assert_eq!(session.retire_at(), None);
        assert!(!session.is_due());
    }
}
