//! Fetching: one request at a time, its outcome accepted or counted as a failure, the
//! background refresh and its timer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use arc_swap::ArcSwapOption;
use std::sync::Mutex;

use super::entry::{Counters, Entry, Now, copies};
use super::options::{CacheOptions, MIN_REASK};
use crate::clock::Clock;
use crate::error::{Report, TokenError, TokenErrorKind, human};
use crate::log::FailureLog;
use crate::token::{AccessToken, TokenSource};

pub(super) type FetchResult = Result<Arc<Entry>, TokenError>;

/// Why a fetch was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// A caller found no usable token.
    Caller,
    /// The refresh point passed, or a retry after a failure.
    Background,
    /// The server rejected the current token.
    Rejected,
}

impl Trigger {
    pub(super) fn as_str(self) -> &'static str {
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
pub(super) struct State {
    /// The fetch in progress, if any: every caller that misses waits on this one.
    pub(super) inflight: Option<watch::Receiver<Option<FetchResult>>>,
    /// When the fetch in progress started.
    pub(super) inflight_since: Option<Instant>,
    pub(super) failures: u32,
    pub(super) last_error: Option<TokenError>,
    /// When the last fetch started.
    pub(super) last_attempt: Option<Instant>,
    /// The provider asked not to be called before this (`Retry-After`).
    pub(super) retry_after_until: Option<Instant>,
    /// The next background retry (exponential backoff).
    pub(super) background_at: Option<Instant>,
    /// The one pending wake-up (refresh or retry).
    pub(super) timer: Option<AbortHandle>,
    /// Bumped by every schedule: a timer started for an older one is stale.
    pub(super) timer_generation: u64,
}

/// What a change of [`State`] needs done once its mutex is released.
#[derive(Default)]
#[must_use]
pub(super) struct Effects {
    pub(super) fetch: Option<Fetch>,
    /// A wake-up to start (its generation, and when), and the one it replaces, to abort.
    pub(super) timer: Option<(u64, Instant)>,
    pub(super) abort: Option<AbortHandle>,
    pub(super) log: Option<LogLine>,
}

/// A line to log once the state's mutex is released.
pub(super) enum LogLine {
    Fetched { expires_in: Duration },
    Unchanged { again_in: Duration },
    Failed { key: String, message: String },
    Replacing,
}

/// A fetch the state records as in progress, to be spawned once the mutex is released.
pub(super) struct Fetch {
    pub(super) sender: watch::Sender<Option<FetchResult>>,
    pub(super) trigger: Trigger,
    pub(super) runtime: tokio::runtime::Handle,
}

impl State {
    pub(super) fn fetch_in_progress(&self) -> Option<watch::Receiver<Option<FetchResult>>> {
        // A fetch whose runtime shut down dropped its sender: it is not in progress any more.
        self.inflight
            .clone()
            .filter(|receiver| receiver.has_changed().is_ok())
    }
}

pub(super) struct Inner {
    #[cfg(feature = "opentelemetry_0_33")]
    pub(super) metrics: crate::metrics::TokenMetrics,
    pub(super) source: Arc<dyn TokenSource>,
    pub(super) identity: String,
    pub(super) scope: String,
    pub(super) options: CacheOptions,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) current: ArcSwapOption<Entry>,
    pub(super) state: Mutex<State>,
    pub(super) counters: Counters,
    pub(super) log: FailureLog,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
    }
}

impl Inner {
    /// Starts a background fetch if the current token is due for refresh (or there is none left
    /// after failures) and no fetch or backoff is pending. `blocking`: wait for the state lock
    /// (timers) rather than skip when it is busy (callers on the hot path).
    pub(super) fn refresh_if_due(self: &Arc<Self>, blocking: bool) {
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
    pub(super) fn begin_fetch(
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

    /// Does what a change of state left to do, with the state's mutex released: aborts a
    /// replaced wake-up, starts a fetch and a wake-up, and logs last, so that a log sink that
    /// fails (panics) cannot keep a refresh from being scheduled.
    pub(super) fn run(self: &Arc<Self>, effects: Effects) {
        let Effects {
            fetch,
            timer,
            abort,
            log,
        } = effects;
        if let Some(abort) = abort {
            abort.abort();
        }
        if let Some((generation, at)) = timer {
            self.start_timer(generation, at);
        }
        if let Some(fetch) = fetch {
            self.spawn_fetch(fetch);
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
    }

    pub(super) fn spawn_fetch(self: &Arc<Self>, fetch: Fetch) {
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
    pub(super) async fn request(self: &Arc<Self>) -> Result<AccessToken, TokenError> {
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
    pub(super) fn complete(
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
    pub(super) fn accept(
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
    pub(super) fn schedule(&self, state: &mut State, at: Instant, effects: &mut Effects) {
        state.timer_generation = state.timer_generation.wrapping_add(1);
        effects.abort = state.timer.take();
        effects.timer = Some((state.timer_generation, at));
    }

    /// Starts the wake-up of generation `generation`, unless a newer one was arranged meanwhile.
    /// Holds only a weak reference, and is aborted when the cache is dropped.
    pub(super) fn start_timer(self: &Arc<Self>, generation: u64, at: Instant) {
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
