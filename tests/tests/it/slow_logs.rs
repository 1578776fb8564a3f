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
