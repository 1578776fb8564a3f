//! Logs an operator can read during an outage: the first failure of a kind is logged at `warn`
//! with its cause, repeats are counted and summarized at most every 30 seconds, and recovery is
//! logged once at `info` with how long the failures lasted.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::human;

/// How often repeats of a failure are summarized, and how long a kind of failure, once logged,
/// is only counted.
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The failure log of one cache or pool.
#[derive(Debug)]
pub(crate) struct FailureLog {
    /// What fails, for the message: `token requests for <identity>`, `connections of pool <name>`.
    subject: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    /// Failures in the current run.
    failures: u64,
    /// Whether a line was logged about the current run (so its end is worth a line too).
    announced: bool,
    /// Failures counted but not yet in any line.
    unreported: u64,
    /// When the last line about failures was logged.
    last_line: Option<Instant>,
    /// When each kind of failure was last logged on its own.
    logged: Vec<(String, Instant)>,
}

impl FailureLog {
    pub(crate) fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update keeps the state consistent: a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A failure of kind `key` (a short, stable name: `token/server_error`, `login_rejected`).
    /// The line, if any, is written after the state's lock is released: a slow log writer holds
    /// up only the caller writing, and nothing a subscriber does can wait on this lock.
    pub(crate) fn failure(&self, key: &str, error: &dyn fmt::Display) {
        let now = Instant::now();
        let line = {
            let mut state = self.lock();
            if state.failing_since.is_none() {
                state.failing_since = Some(now);
                state.failures = 0;
                state.announced = false;
            }
            state.failures += 1;
            let recently_logged = state
                .logged
                .iter()
                .any(|(k, at)| k == key && now.duration_since(*at) < SUMMARY_EVERY);
            if recently_logged {
                state.unreported += 1;
                let quiet_for = state
                    .last_line
                    .map_or(SUMMARY_EVERY, |at| now.duration_since(at));
                if quiet_for >= SUMMARY_EVERY {
                    state.announced = true;
                    state.last_line = Some(now);
                    Some(Line::Summary {
                        count: std::mem::take(&mut state.unreported),
                        quiet_for,
                    })
                } else {
                    None
                }
            } else {
                state.logged.retain(|(k, _)| k != key);
                state.logged.push((key.to_owned(), now));
                state.announced = true;
                state.last_line = Some(now);
                Some(Line::First {
                    earlier: std::mem::take(&mut state.unreported),
                })
            }
        };
        match line {
            Some(Line::First { earlier: 0 }) => {
                tracing::warn!(kind = key, "{}: {error}", self.subject);
            }
            Some(Line::First { earlier }) => tracing::warn!(
                kind = key,
                "{}: {error} ({earlier} earlier failures not logged one by one)",
                self.subject
            ),
            Some(Line::Summary { count, quiet_for }) => tracing::warn!(
                kind = key,
                failures = count,
                "{}: {count} more failures in the last {}; the latest: {error}",
                self.subject,
                human(quiet_for)
            ),
            None => {}
        }
    }

    /// A success: ends the current run of failures, with a line if the run was logged.
    pub(crate) fn success(&self) {
        let (lasted, failures, unreported) = {
            let mut state = self.lock();
            let Some(since) = state.failing_since.take() else {
                return;
            };
            if !state.announced {
                return;
            }
            state.last_line = Some(Instant::now());
            (
                since.elapsed(),
                state.failures,
                std::mem::take(&mut state.unreported),
            )
        };
        tracing::info!(
            failures,
            outage_secs = lasted.as_secs_f64(),
            "{}: working again after {} of failures ({failures} failures, {unreported} of them not logged one by one)",
            self.subject,
            human(lasted)
        );
    }
}

/// A line [`FailureLog::failure`] writes.
enum Line {
    /// The first failure of its kind in a summary period, with how many went unlogged before it.
    First { earlier: u64 },
    /// Failures of a kind already logged, counted over `quiet_for`.
    Summary { count: u64, quiet_for: Duration },
}
