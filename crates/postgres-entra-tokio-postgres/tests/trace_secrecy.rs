//! The cache's tracing output at TRACE, over a fetch, a background refresh and failures, never
//! contains a token (the end-to-end scenarios check logins and invalidations the same way). A test binary of its own: the capture is the process-wide
//! subscriber, so no other test's threads can race its registration.

use postgres_entra::{AccessToken, TokenCache, TokenError, TokenErrorKind, TokioClock};
use postgres_entra_testkit::{FnTokenSource, trace_capture};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

#[tokio::test(start_paused = true)]
async fn trace_output_of_fetch_refresh_invalidation_and_failure_never_contains_the_token() {
    let captured = trace_capture();
    let clock = TokioClock::new(SystemTime::now());
    let calls = Arc::new(AtomicU32::new(0));
    let failing = Arc::new(Mutex::new(false));
    let (counter, fail) = (calls.clone(), failing.clone());
    let source = FnTokenSource::new("trace-test", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if *fail.lock().unwrap() {
            Err(TokenError::new(
                TokenErrorKind::ServerError,
                "provider down",
            ))
        } else {
            Ok(AccessToken::new(
                format!("secret-token-{n}"),
                SystemTime::now() + Duration::from_secs(8),
            ))
        };
        async move { result }
    });
    let cache = TokenCache::builder(source)
        .clock(Arc::new(clock))
        .build()
        .unwrap();

    let first = cache.get().await.unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await; // the background refresh runs at 6 s
    *failing.lock().unwrap() = true;
    let _ = cache.get().await.unwrap();
    // Past the usable life, with the provider down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = cache.get().await.unwrap_err();

    let text = captured.text();
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "fetch, refresh and a failed fetch happened"
    );
    for expected in [
        "token fetched",
        "refreshing the token failed",
        "provider down",
        "entra_token_fetch",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in {text}");
    }
    assert!(
        !text.contains("secret-token"),
        "a token leaked into the trace: {text}"
    );
    assert_eq!(first.secret(), "secret-token-1");
}
