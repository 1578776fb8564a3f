//! A token as the cache keeps it, the time on both clocks, and the counters.

use crossbeam_utils::CachePadded;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use crate::claims::{ClaimsError, TokenClaims};
use crate::token::AccessToken;

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
    pub(super) tokens: [Arc<AccessToken>; HIT_SHARDS],
    pub(super) received_at: SystemTime,
    pub(super) refresh_at: SystemTime,
    pub(super) usable_until: SystemTime,
    pub(super) refresh_deadline: Instant,
    pub(super) usable_deadline: Instant,
    pub(super) claims: Result<TokenClaims, ClaimsError>,
    /// Fetched because the server rejected the token before it.
    pub(super) after_rejection: bool,
    /// A replacement was asked for after the server rejected this token.
    pub(super) replacement_requested: AtomicBool,
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

    pub(super) fn refresh_due(&self, now: Now) -> bool {
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
    pub(super) fn usable_deadline_at(&self, now: Now) -> Instant {
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
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) successes: AtomicU64,
    pub(super) unchanged: AtomicU64,
    pub(super) failures: AtomicU64,
    /// Written on every hit: spread over cache lines of their own, one per thread (modulo
    /// [`HIT_SHARDS`]), so that threads counting hits on several cores do not take one line from
    /// each other, nor the line the next reader of the current token needs.
    pub(super) hits: [CachePadded<AtomicU64>; HIT_SHARDS],
    pub(super) waits: AtomicU64,
    pub(super) invalidations: AtomicU64,
}

/// How many counters the hits are spread over.
pub(super) const HIT_SHARDS: usize = 8;

/// `token` once per hit shard, each copy its own allocation.
pub(super) fn copies(token: AccessToken) -> [Arc<AccessToken>; HIT_SHARDS] {
    std::array::from_fn(|_| Arc::new(token.clone()))
}

/// This thread's hit counter and token copy: threads take the shards in turn.
pub(super) fn hit_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % HIT_SHARDS;
    }
    SHARD.with(|shard| *shard)
}
