//! One open connection's session: when it is due for retirement, and whether it may go now.

use std::fmt;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use super::core::{CoreInner, lock};
use crate::cache::{Entry, Now};
use crate::error::human;

/// When a session is due for retirement: on the wall clock (token expiries are wall-clock times)
/// and, from its login, on the monotonic clock; due once either says so.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retirement {
    pub(super) at: SystemTime,
    pub(super) deadline: Instant,
}

impl CoreInner {
    /// When a connection that logged in with `entry` at `now` is due: the earlier of the token
    /// bound (its expiry plus grace plus `token_jitter`'s share of the jitter) and the age limit
    /// (minus `age_jitter`'s share), decided once, when it logs in.
    pub(super) fn retirement(
        &self,
        entry: &Entry,
        now: Now,
        token_jitter: f64,
        age_jitter: f64,
    ) -> Option<Retirement> {
        let options = &self.options;
        let token_bound = if options.token_bound {
            // Jitter in proportion to the token's life, so short tokens are retired promptly too.
            let life = entry
                .expires_on()
                .duration_since(entry.received_at())
                .unwrap_or_default();
            let spread = options.retire_jitter.min(life / 10);
            entry
                .expires_on()
                .checked_add(options.token_grace)
                .and_then(|at| at.checked_add(spread.mul_f64(token_jitter.clamp(0.0, 1.0))))
                .map(|at| at.duration_since(now.wall).unwrap_or_default())
        } else {
            None
        };
        let age_limit = options.max_age.map(|age| {
            age.saturating_sub(options.max_age_jitter.mul_f64(age_jitter.clamp(0.0, 1.0)))
        });
        let after = match (token_bound, age_limit) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Retirement {
            at: now.wall.checked_add(after)?,
            deadline: now.mono.checked_add(after)?,
        })
    }

    pub(super) fn may_retire(&self) -> bool {
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

    pub(super) fn count_retired(&self, token_expires_on: SystemTime) {
        self.retired.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "opentelemetry_0_33")]
        self.connector
            .inner
            .telemetry
            .record_retired(&self.observed);
        tracing::debug!(
            pool = %self.name,
            token_expired = human(
                self.cache.now().wall.duration_since(token_expires_on).unwrap_or_default()
            ),
            "retiring a connection whose login token expired or that reached its age limit"
        );
    }

    /// How long ago the oldest token still in use by an open connection was received.
    #[cfg_attr(not(feature = "opentelemetry_0_33"), allow(dead_code))]
    pub(super) fn oldest_token_age(&self) -> Option<Duration> {
        let oldest = lock(&self.open).values().min().copied()?;
        Some(
            self.cache
                .now()
                .wall
                .duration_since(oldest)
                .unwrap_or_default(),
        )
    }
}

/// One open connection's login token and retirement time, decided once when it logged in and kept
/// with the connection. Dropping it (with its connection) forgets it.
pub struct Session {
    pub(super) id: u64,
    pub(super) token_expires_on: SystemTime,
    pub(super) retire: Option<Retirement>,
    pub(super) core: Weak<CoreInner>,
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
        self.retire.map(|r| r.at)
    }

    /// Whether the connection's retirement time has passed at `now` ([`PoolCore::now`]): reads
    /// nothing but the session, so a pool may call it under its own lock (then retire the session
    /// only if [`PoolCore::may_retire`], asked before, allowed it).
    pub fn is_past_due(&self, now: Now) -> bool {
        self.retire
            .is_some_and(|r| now.wall >= r.at || now.mono >= r.deadline)
    }

    /// Whether the connection is due for retirement now. A due connection is kept while the
    /// identity provider is unavailable and no token can be had: nothing could replace it. May log
    /// and start a token request: not for a pool's own lock (see [`Session::is_past_due`]).
    pub fn is_due(&self) -> bool {
        let Some(core) = self.core.upgrade() else {
            return false;
        };
        self.is_past_due(core.cache.now()) && core.may_retire()
    }

    /// Counts the connection as retired (drop the session with it).
    pub fn retired(&self) {
        if let Some(core) = self.core.upgrade() {
            core.count_retired(self.token_expires_on);
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
