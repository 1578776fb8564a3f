//! What the token cache does with each bad answer of the identity provider, and with its clock:
//! each bounded in time. (The same faults under pool load are in `scenarios.rs`.)

use postgres_entra::{AzureTokenSource, CacheOptions, TokenCache, TokenErrorKind};
use postgres_entra_testkit::{Endpoint, Fault};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::{Suite, service_principal_cache};

const HOUR: Duration = Duration::from_secs(3600);

/// Sixteen callers without a valid token, asking as fast as they can, for `window`.
async fn hammer_cache(cache: &TokenCache, window: Duration) -> usize {
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (cache, errors) = (cache.clone(), errors.clone());
            tokio::spawn(async move {
                while started.elapsed() < window {
                    if cache.get().await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    errors.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_with_retry_after_is_honoured_without_a_request_storm() {
    let emulator = Suite::start(HOUR).await;
    // Retry-After is honoured up to the longest backoff (here 5 s).
    let cache = service_principal_cache(
        &emulator,
        CacheOptions::default().backoff(Duration::from_millis(100), Duration::from_secs(5)),
    );
    emulator.set_fault(
        Endpoint::Token,
        Fault::TooManyRequests {
            retry_after: Duration::from_secs(3),
        },
    );

    // Callers stop 1 s before the Retry-After ends: until then they get the error at once (a
    // caller waits for the next attempt only when it is due within the retry interval).
    let errors = hammer_cache(&cache, Duration::from_secs(2)).await;

    assert!(errors > 1000, "callers kept asking: {errors} errors");
    assert_eq!(
        emulator.requests(Endpoint::Token),
        1,
        "nothing before Retry-After (3 s), although the backoff is 100 ms"
    );
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.provider_retry_after(), Some(Duration::from_secs(3)));
    emulator.clear_fault(Endpoint::Token);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        emulator.requests(Endpoint::Token),
        2,
        "one retry once Retry-After passed"
    );
    figure!("1 request until Retry-After passed, then 1");
    cache.get().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_without_a_token_are_retried_at_a_steady_rate_without_a_request_storm() {
    let emulator = Suite::start(HOUR).await;
    let cache = service_principal_cache(&emulator, CacheOptions::default());
    emulator.set_fault(Endpoint::Token, Fault::ServerError);

    let errors = hammer_cache(&cache, Duration::from_secs(3)).await;

    // Sixteen callers as fast as they can: one attempt per retry interval (800 ms), each caller
    // answered by the next attempt, none waiting longer.
    let requests = emulator.requests(Endpoint::Token);
    figure!("{errors} failed calls caused {requests} requests to the identity provider");
    assert!((4..=6).contains(&requests), "{requests} requests");
    assert!(
        errors >= 16 * 3,
        "every caller answered at least every 0.8 s: {errors}"
    );
    let error = cache.get().await.unwrap_err();
    assert!(
        crate::chain(&error).contains("AADSTS50001"),
        "says why: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_dropped_connections_are_typed_errors_then_recover() {
    let emulator = Suite::start(HOUR).await;
    let options =
        CacheOptions::default().backoff(Duration::from_millis(50), Duration::from_millis(100));
    let cache = service_principal_cache(&emulator, options);

    for (fault, kind) in [
        (Fault::MalformedBody, TokenErrorKind::InvalidResponse),
        (Fault::DropConnection, TokenErrorKind::Unreachable),
    ] {
        emulator.set_fault(Endpoint::Token, fault);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let error = cache.get().await.unwrap_err();
        assert_eq!(error.kind(), kind, "{fault:?}: {error}");
        assert!(error.provider_error().is_some(), "{fault:?}: {error}");
    }
    emulator.clear_fault(Endpoint::Token);
    tokio::time::sleep(Duration::from_millis(150)).await;
    cache.get().await.unwrap();
}

#[tokio::test]
async fn a_token_already_expired_on_arrival_from_a_skewed_provider_is_not_served() {
    let emulator = Suite::start(Duration::from_secs(600)).await;
    emulator.set_idp_clock_behind(Duration::from_secs(660));
    let cache = TokenCache::builder(AzureTokenSource::new(
        emulator.managed_identity_credential().unwrap(),
    ))
    .build()
    .unwrap();

    let error = cache.get().await.unwrap_err();

    assert_eq!(error.kind(), TokenErrorKind::ExpiredOnArrival, "{error}");
    assert!(error.to_string().contains("clock"), "{error}");
    assert_eq!(emulator.tokens_issued(Endpoint::ManagedIdentity), 1);

    // A provider slightly behind still serves, with the expiry it states.
    emulator.set_idp_clock_behind(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(700)).await; // past the first backoff step
    let token = cache.get().await.unwrap();
    let left = token
        .expires_on()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(540), "{left:?}");
}
