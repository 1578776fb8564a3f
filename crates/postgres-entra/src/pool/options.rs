//! What this library adds to a pool: [`SessionOptions`].

use std::time::Duration;

use crate::error::Error;

/// What this library adds to a pool: sessions bounded by their login token, an age limit, the
/// pool's name in metrics. The same options for every adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionOptions {
    pub(super) token_bound: bool,
    pub(super) token_grace: Duration,
    pub(super) retire_jitter: Duration,
    pub(super) max_age: Option<Duration>,
    pub(super) max_age_jitter: Duration,
    pub(super) reap_interval: Duration,
    pub(super) pool_name: Option<String>,
}

impl Default for SessionOptions {
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

impl SessionOptions {
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

    pub(super) fn check(&self) -> Result<(), Error> {
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
