//! How the cache refreshes, retries and ages tokens: [`CacheOptions`].

use std::time::Duration;

use crate::error::Error;

/// How the cache refreshes, retries and decides a token is too old to hand out. Checked when
/// the cache is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    pub(super) expiry_buffer: Duration,
    pub(super) fetch_timeout: Duration,
    pub(super) backoff_initial: Duration,
    pub(super) backoff_max: Duration,
    pub(super) retry_interval: Duration,
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
pub(super) const WAIT_GRACE: Duration = Duration::from_secs(1);

/// The shortest retry delay: anything shorter makes a tight loop against the provider.
pub(super) const MIN_RETRY: Duration = Duration::from_millis(10);

/// The shortest wait before asking again a source that answered with the token already held:
/// halving what remains would otherwise ask in a tight loop near the end of a token whose source
/// never renews it early.
pub(super) const MIN_REASK: Duration = Duration::from_secs(1);

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
