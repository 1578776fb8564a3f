//! Time, injectable so tests can cross token expiries without waiting (public with the
//! `test-util` feature).
#![cfg_attr(not(feature = "test-util"), allow(unreachable_pub, dead_code))]

use std::fmt;
use std::time::SystemTime;

/// The cache's wall clock: token expiries are wall-clock times. Every wait, deadline and retry
/// runs on Tokio's monotonic clock (`tokio::time::Instant`), which a wall clock stepped back or
/// ahead does not move; tests pause and advance that one.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The real clock: `SystemTime::now()`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock driven by Tokio's time, which tests can pause and advance
/// (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`): wall-clock time is a fixed
/// start plus the Tokio time elapsed since the clock was made. Read from a thread outside the
/// runtime (e.g. a metrics reader's), it reads the time of the runtime it was made in.
#[derive(Debug, Clone)]
pub struct TokioClock {
    start: SystemTime,
    origin: tokio::time::Instant,
    runtime: Option<tokio::runtime::Handle>,
}

impl TokioClock {
    /// A clock reading `start` now.
    pub fn new(start: SystemTime) -> Self {
        Self {
            start,
            origin: tokio::time::Instant::now(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        let _entered = match &self.runtime {
            Some(runtime) if tokio::runtime::Handle::try_current().is_err() => {
                Some(runtime.enter())
            }
            _ => None,
        };
        self.start + self.origin.elapsed()
    }
}
