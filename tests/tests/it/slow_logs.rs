//! A slow log sink holds up only the thread writing to it: no log line is written under a lock
//! another caller needs (the deadpool reaper's case is in `deadpool_only`).

use postgres_entra::{TokenCache, TokenError, TokenErrorKind};
use postgres_entra_testkit::{FnTokenSource, StuckSink};
use std::time::Duration;

/// While the line about a failed token request is stuck in a slow log sink, another caller of the
/// cache is answered at once.
#[test]
fn a_stuck_log_sink_holds_up_no_other_caller_of_the_cache() {
    let sink = StuckSink::new("callers make the cache ask again");
    sink.arm();
    let runtime = sink.runtime(tracing::Level::TRACE);
    // A refused credential: callers are answered with the failure at once, without a timer.
    let source = FnTokenSource::new("test-identity", |_| async {
        Err(TokenError::new(TokenErrorKind::CredentialRejected, "bad secret").with_http_status(401))
    });
    let cache = runtime.block_on(async { TokenCache::builder(source).build().unwrap() });

    // A first caller's failure: its line gets stuck in the sink.
    let first = {
        let cache = cache.clone();
        runtime.spawn(async move { cache.get().await })
    };
    assert!(
        sink.wait_stuck(Duration::from_secs(20)),
        "the failure was logged"
    );

    // Another caller, on a thread of its own, is answered while the line is stuck.
    let (answered_tx, answered_rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn({
        let cache = cache.clone();
        let handle = runtime.handle().clone();
        move || {
            let outcome = handle.block_on(async { cache.get().await.map(drop) });
            let _ = answered_tx.send(outcome);
        }
    });
    let answered = answered_rx.recv_timeout(Duration::from_secs(10));
    sink.release();
    let answered = answered.expect("another caller waited for a log line");
    assert_eq!(
        answered.unwrap_err().kind(),
        TokenErrorKind::CredentialRejected
    );
    other.join().unwrap();
    runtime.block_on(first).unwrap().unwrap_err();
}

/// A log sink that panics while the cache's fetch writes its lines: the line before the request
/// fails that fetch and the next caller's fetch runs; the line after the answer leaves the waiters
/// their token and the refresh scheduled. No caller waits for ever, the cache is never stuck.
#[test]
fn a_panicking_log_sink_leaves_no_caller_waiting_nor_the_cache_stuck() {
    const LIFETIME: Duration = Duration::from_secs(4);
    for needle in ["requesting a token", "token fetched"] {
        let runtime = postgres_entra_testkit::panicking_log_runtime(needle, tracing::Level::TRACE);
        let source = FnTokenSource::new("test-identity", |_| async {
            Ok(postgres_entra::AccessToken::new(
                "secret",
                std::time::SystemTime::now() + LIFETIME,
            ))
        });
        let cache = runtime.block_on(async { TokenCache::builder(source).build().unwrap() });
        let outcomes: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                runtime
                    .block_on(async move {
                        tokio::time::timeout(Duration::from_secs(10), cache.get()).await
                    })
                    .unwrap_or_else(|_| panic!("{needle}: a caller waited for ever"))
            })
            .collect();
        for outcome in outcomes {
            match needle {
                // The line before the request: the fetch dies with it, and says so; every caller
                // makes the cache ask again.
                "requesting a token" => {
                    let error = outcome.unwrap_err();
                    assert_eq!(error.kind(), TokenErrorKind::Cancelled);
                    assert!(error.to_string().contains("panicked"), "{error}");
                }
                // The line after the answer: the waiters have their token first.
                _ => {
                    outcome.unwrap();
                }
            }
        }
        // Not stuck: the next callers make it ask again, or the refresh at half the token's life
        // was scheduled whatever its line did.
        if needle == "token fetched" {
            std::thread::sleep(LIFETIME * 3 / 4);
        }
        assert!(cache.stats().requests >= 2, "{needle}: {:?}", cache.stats());
        runtime.shutdown_timeout(Duration::from_secs(1));
    }
}
