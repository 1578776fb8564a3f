//! Logs an operator can read during an outage: the first failure of a kind is logged at `warn`
//! with its cause; repeats of that kind are counted and summarized 30 seconds after its last line,
//! on a timer (a summary is written even when no failure follows the repeats); and the end of
//! every run of failures that was logged is logged once at `info`, with how long it lasted.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::time::Instant;

use crate::error::human;

/// How long after a line about a kind of failure its repeats are summarized.
const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The failure log of one cache or pool.
#[derive(Debug)]
pub(crate) struct FailureLog {
    /// What fails, for the message: `token requests for <identity>`, `connections of pool <name>`.
    subject: Arc<str>,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// The current run of failures, from the first failure after a success.
    run: Option<Run>,
    /// Each kind of failure met, with what is not logged of it yet.
    kinds: Vec<Kind>,
    /// Whether the summary timer is running.
    timer: bool,
}

#[derive(Debug)]
struct Run {
    since: Instant,
    failures: u64,
    /// Failures of the run counted in no line yet.
    unreported: u64,
    /// Whether a line told of the run (so its end gets one too).
    announced: bool,
}

#[derive(Debug)]
struct Kind {
    key: String,
    /// When a line about this kind was last written.
    last_line: Instant,
    /// Failures of this kind since that line.
    unreported: u64,
    /// The latest of them, as it read.
    latest: String,
}

/// A line to write once the state's lock is released.
enum Line {
    /// The first failure of its kind in a summary period, with how many of its kind went unlogged
    /// before it.
    First { earlier: u64 },
    /// Failures of a kind counted since its last line, `quiet_for` ago.
    Summary {
        key: String,
        count: u64,
        quiet_for: Duration,
        latest: String,
    },
    /// A logged run of failures ended.
    Recovered {
        lasted: Duration,
        failures: u64,
        unreported: u64,
    },
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update keeps the state consistent: a panic elsewhere leaves it usable.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FailureLog {
    pub(crate) fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: Arc::from(subject.into()),
            state: Arc::default(),
        }
    }

    /// A failure of kind `key` (a short, stable name: `token/server_error`, `login_rejected`).
    /// Lines are written after the state's lock is released: a slow log writer holds up only the
    /// caller writing, and nothing a subscriber does can wait on this lock.
    pub(crate) fn failure(&self, key: &str, error: &dyn fmt::Display) {
        let now = Instant::now();
        let (line, start_timer) = {
            let mut state = lock(&self.state);
            let run = state.run.get_or_insert(Run {
                since: now,
                failures: 0,
                unreported: 0,
                announced: false,
            });
            run.failures += 1;
            let position = state.kinds.iter().position(|k| k.key == key);
            let due = position.is_none_or(|i| now - state.kinds[i].last_line >= SUMMARY_EVERY);
            if due {
                let earlier = match position {
                    Some(i) => {
                        let kind = &mut state.kinds[i];
                        kind.last_line = now;
                        std::mem::take(&mut kind.unreported)
                    }
                    None => {
                        state.kinds.push(Kind {
                            key: key.to_owned(),
                            last_line: now,
                            unreported: 0,
                            latest: String::new(),
                        });
                        0
                    }
                };
                let run = state.run.as_mut().expect("a run begun above");
                run.announced = true;
                run.unreported = 0;
                (Some(Line::First { earlier }), false)
            } else {
                let i = position.expect("a kind met before");
                let kind = &mut state.kinds[i];
                kind.unreported += 1;
                kind.latest = error.to_string();
                state.run.as_mut().expect("a run begun above").unreported += 1;
                let start = !state.timer;
                state.timer = true;
                (None, start)
            }
        };
        if let Some(line) = line {
            self.write(key, &line, Some(error));
        }
        if start_timer {
            self.start_timer();
        }
    }

    /// A success: ends the current run of failures, with a line if a line told of the run. A run
    /// no line told of (its failures all repeats of kinds logged less than 30 s before) ends
    /// silently: its failures are in the next summary.
    pub(crate) fn success(&self) {
        let line = {
            let mut state = lock(&self.state);
            match state.run.take() {
                Some(run) if run.announced => Line::Recovered {
                    lasted: run.since.elapsed(),
                    failures: run.failures,
                    unreported: run.unreported,
                },
                _ => return,
            }
        };
        self.write("", &line, None);
    }

    /// Writes the summaries due, on the Tokio runtime of the caller (none: the summaries are
    /// written by the next failure of their kind past the period instead, as its first line).
    fn start_timer(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lock(&self.state).timer = false;
            return;
        };
        let (state, subject) = (Arc::downgrade(&self.state), self.subject.clone());
        runtime.spawn(summarize(state, subject));
    }

    fn write(&self, key: &str, line: &Line, error: Option<&dyn fmt::Display>) {
        write(&self.subject, key, line, error);
    }
}

/// The timer: writes each kind's summary once its period is over, until nothing is left to
/// summarize (or the log is gone).
async fn summarize(state: Weak<Mutex<State>>, subject: Arc<str>) {
    loop {
        let next = {
            let Some(state) = state.upgrade() else {
                return;
            };
            let state = lock(&state);
            state
                .kinds
                .iter()
                .filter(|k| k.unreported > 0)
                .map(|k| k.last_line + SUMMARY_EVERY)
                .min()
        };
        let Some(next) = next else {
            if let Some(state) = state.upgrade() {
                let mut state = lock(&state);
                // A failure counted since the look above would have found the timer running.
                if state.kinds.iter().all(|k| k.unreported == 0) {
                    state.timer = false;
                    return;
                }
            }
            continue;
        };
        tokio::time::sleep_until(next).await;
        let lines = {
            let Some(state) = state.upgrade() else {
                return;
            };
            let mut state = lock(&state);
            let now = Instant::now();
            let mut lines = Vec::new();
            for kind in &mut state.kinds {
                if kind.unreported > 0 && now - kind.last_line >= SUMMARY_EVERY {
                    lines.push(Line::Summary {
                        key: kind.key.clone(),
                        count: std::mem::take(&mut kind.unreported),
                        quiet_for: now - kind.last_line,
                        latest: std::mem::take(&mut kind.latest),
                    });
                    kind.last_line = now;
                }
            }
            if let Some(run) = state.run.as_mut().filter(|_| !lines.is_empty()) {
                run.announced = true;
                run.unreported = 0;
            }
            lines
        };
        for line in &lines {
            write(&subject, "", line, None);
        }
    }
}

/// Writes `line` through the application's subscriber. One that panics loses that line only: the
/// panic is not let into the caller (a pool's login, the summary timer, which would end and leave
/// the failures after it unsummarized); the panic hook has reported it.
fn write(subject: &str, key: &str, line: &Line, error: Option<&dyn fmt::Display>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_line(subject, key, line, error);
    }));
}

fn write_line(subject: &str, key: &str, line: &Line, error: Option<&dyn fmt::Display>) {
    match (line, error) {
        (Line::First { earlier: 0 }, Some(error)) => {
            tracing::warn!(kind = key, "{subject}: {error}");
        }
        (Line::First { earlier }, Some(error)) => tracing::warn!(
            kind = key,
            "{subject}: {error} ({earlier} earlier failures of this kind not logged one by one)"
        ),
        (
            Line::Summary {
                key,
                count,
                quiet_for,
                latest,
            },
            _,
        ) => tracing::warn!(
            kind = key.as_str(),
            failures = count,
            "{subject}: {count} more failures in the last {}; the latest: {latest}",
            human(*quiet_for)
        ),
        (
            Line::Recovered {
                lasted,
                failures,
                unreported,
            },
            _,
        ) => tracing::info!(
            failures,
            outage_secs = lasted.as_secs_f64(),
            "{subject}: working again after {} of failures ({failures} failures, {unreported} of them since the last line about them)",
            human(*lasted)
        ),
        (Line::First { .. }, None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Log lines written on this thread, as text.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Clone)]
    struct PanickingOnce {
        lines: Lines,
        needle: &'static str,
        panicked: Arc<AtomicBool>,
    }

    impl Write for PanickingOnce {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let text = String::from_utf8_lossy(buf);
            if text.contains(self.needle) && !self.panicked.swap(true, Ordering::SeqCst) {
                panic!("the application's log layer failed on: {text}");
            }
            self.lines.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn take(&self) -> Vec<String> {
            let text = String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap();
            text.lines().map(str::to_owned).collect()
        }
    }

    /// Captures what this (current-thread) test logs.
    fn capture() -> (Lines, tracing::subscriber::DefaultGuard) {
        capture_panicking_once_on("")
    }

    /// [`capture`], with a writer that panics, once, instead of writing the first line that
    /// contains `needle` (none if empty): an application's log layer that fails.
    fn capture_panicking_once_on(
        needle: &'static str,
    ) -> (Lines, tracing::subscriber::DefaultGuard) {
        let lines = Lines::default();
        let panicked = Arc::new(AtomicBool::new(needle.is_empty()));
        let writer = PanickingOnce {
            lines: lines.clone(),
            needle,
            panicked,
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        (lines, tracing::subscriber::set_default(subscriber))
    }

    /// Lets `time` pass on the paused clock, every timer due meanwhile firing on time.
    async fn pass(time: Duration) {
        tokio::time::sleep(time).await;
    }

    /// The numbers in the summary lines among `lines`.
    fn summarized(lines: &[String]) -> Vec<u64> {
        lines
            .iter()
            .filter_map(|l| {
                l.split(" more failures")
                    .next()?
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// A failure every 0.7 s for 70 s: its first line, then a summary 30 s after each line,
    /// written by the timer (at 30 s, 60 s, and at 90 s though no failure follows the last one, at
    /// 69.3 s); one line for the recovery. Every failure is in a line.
    #[tokio::test(start_paused = true)]
    async fn repeats_are_summarized_every_30_s_on_a_timer_and_the_recovery_once() {
        let (lines, _guard) = capture();
        let log = FailureLog::new("token requests for x");
        let start = Instant::now();
        for _ in 0..100 {
            log.failure("token/server_error", &"HTTP 500");
            pass(Duration::from_millis(700)).await;
        }
        let during = lines.take();
        assert_eq!(during.len(), 3, "{during:#?}");
        assert!(during[0].contains("WARN") && during[0].contains("HTTP 500"));
        assert!(
            during[1..].iter().all(|l| l.contains("in the last 30 s")),
            "{during:#?}"
        );
        pass(Duration::from_secs(91) - (Instant::now() - start)).await;
        let after = lines.take();
        assert_eq!(after.len(), 1, "{after:#?}");
        let counts = summarized(&[during, after].concat());
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert_eq!(1 + counts.iter().sum::<u64>(), 100, "{counts:?}");

        log.success();
        let recovered = lines.take();
        assert_eq!(recovered.len(), 1, "{recovered:#?}");
        assert!(recovered[0].contains("INFO"), "{}", recovered[0]);
        assert!(
            recovered[0].contains("(100 failures, 0 of them since the last line about them)"),
            "{}",
            recovered[0]
        );
    }

    /// A failure every 13 s, a success 7 s after each: the first run is logged, with its end; the
    /// runs after it (repeats within 30 s of the kind's last line) are counted and summarized by
    /// the timer; the run in progress when a summary is written ends with a line too, the others
    /// silently.
    #[tokio::test(start_paused = true)]
    async fn short_runs_between_successes_are_summarized_and_every_logged_run_ends_with_a_line() {
        let (lines, _guard) = capture();
        let log = FailureLog::new("connections of pool p");
        for _ in 0..7 {
            log.failure("login/timeout", &"timed out");
            pass(Duration::from_secs(7)).await;
            log.success();
            pass(Duration::from_secs(6)).await;
        }
        pass(Duration::from_secs(30)).await;
        let written = lines.take();
        let firsts = written
            .iter()
            .filter(|l| l.contains("timed out") && !l.contains("more failures"))
            .count();
        let recoveries = written
            .iter()
            .filter(|l| l.contains("working again"))
            .count();
        assert_eq!(firsts, 1, "{written:#?}");
        // At 30 s (the failures at 13 and 26 s), 60 s (39, 52) and 90 s (65, 78).
        assert_eq!(summarized(&written), [2, 2, 2], "{written:#?}");
        // The first run (0-7 s), and the one the summary at 30 s was written in (26-33 s).
        assert_eq!(recoveries, 2, "{written:#?}");
    }

    /// Kinds are logged and summarized apart.
    #[tokio::test(start_paused = true)]
    async fn each_kind_of_failure_has_its_own_first_line_and_summary() {
        let (lines, _guard) = capture();
        let log = FailureLog::new("token requests for x");
        for _ in 0..3 {
            log.failure("token/server_error", &"HTTP 500");
            log.failure("token/timeout", &"no answer");
            pass(Duration::from_secs(1)).await;
        }
        pass(Duration::from_secs(30)).await;
        let written = lines.take();
        assert_eq!(written.len(), 4, "{written:#?}");
        assert!(written.iter().any(|l| l.contains("kind=\"token/server_error\"") && l.contains("2 more failures")), "{written:#?}");
        assert!(
            written
                .iter()
                .any(|l| l.contains("kind=\"token/timeout\"") && l.contains("2 more failures")),
            "{written:#?}"
        );
    }

    /// A log layer that panics on a summary loses that line only: the timer goes on, and the
    /// failures after it are summarized 30 s after that line (a timer that died with the panic
    /// left them unsummarized until the next failure).
    #[tokio::test(start_paused = true)]
    async fn a_log_layer_that_panics_on_a_summary_loses_that_line_only() {
        let (lines, _guard) = capture_panicking_once_on("more failures");
        let log = FailureLog::new("token requests for x");
        for _ in 0..4 {
            log.failure("token/server_error", &"HTTP 500");
            pass(Duration::from_secs(1)).await;
        }
        pass(Duration::from_secs(30)).await;
        let before = lines.take();
        assert_eq!(
            before.len(),
            1,
            "the first line, the summary lost: {before:#?}"
        );
        for _ in 0..2 {
            log.failure("token/server_error", &"HTTP 500");
            pass(Duration::from_secs(1)).await;
        }
        pass(Duration::from_secs(30)).await;
        let after = lines.take();
        // The lost line may come back with it: tracing-subscriber's fmt layer keeps the text it
        // was writing in its buffer when the writer panics.
        assert_eq!(summarized(&after).last(), Some(&2), "{after:#?}");
    }
}
