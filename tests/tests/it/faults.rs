//! Faults of the identity provider, the server and the clock: each bounded in time.

use postgres_entra::{
    AccessToken, AzureTokenSource, CacheOptions, EntraConnector, FnTokenSource, TlsRoots,
    TokenCache, TokenErrorKind,
};
use postgres_entra_deadpool::{Error, PoolOptions, entra_error, pool_builder};
use postgres_entra_testkit::{Endpoint, Fault, Rejection, Signer, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::deadpool_pool::{checkout, user_config};
use crate::{Suite, connector, connector_with, hammer, service_principal_cache};

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_expiry_is_a_typed_error_in_time_and_recovery_takes_one_backoff_step() {
    let emulator = Suite::start(Duration::from_secs(3));
    let options = CacheOptions::default()
        .backoff(Duration::from_millis(200), Duration::from_secs(2))
        .fetch_timeout(Duration::from_secs(1));
    let pool = pool_builder(
        &user_config(&emulator, 4),
        connector_with(&emulator, options),
        PoolOptions::new().max_age(Duration::from_millis(200), Duration::ZERO),
    )
    .unwrap()
    .build()
    .unwrap();
    checkout(&pool).await.unwrap();
    emulator.set_fault(Endpoint::Token, Fault::DropConnection);
    tokio::time::sleep(Duration::from_secs(4)).await; // the token has expired

    let started = Instant::now();
    let error = pool.get().await.unwrap_err();
    let waited = started.elapsed();

    assert!(
        waited < Duration::from_secs(5),
        "no hang: answered in {waited:?} (pool timeouts are 10 s)"
    );
    match entra_error(&error) {
        Some(Error::Token(e)) => assert!(matches!(e.kind(), TokenErrorKind::Unreachable), "{e}"),
        other => panic!("expected a token error, got {other:?}"),
    }

    emulator.clear_fault(Endpoint::Token);
    let healed = Instant::now();
    while checkout(&pool).await.is_err() {
        assert!(
            healed.elapsed() < Duration::from_secs(5),
            "not recovered within one backoff step (2 s) and a fetch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "typed error after {waited:?}; recovered {:?} after the provider came back",
        healed.elapsed()
    );
}

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
    let emulator = Suite::start(HOUR);
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

    let errors = hammer_cache(&cache, Duration::from_millis(2500)).await;

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
    cache.get().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_exponentially_without_a_request_storm() {
    let emulator = Suite::start(HOUR);
    let cache = service_principal_cache(
        &emulator,
        CacheOptions::default().backoff(Duration::from_millis(100), Duration::from_secs(1)),
    );
    emulator.set_fault(Endpoint::Token, Fault::ServerError);

    let errors = hammer_cache(&cache, Duration::from_secs(3)).await;

    // Attempts at about 0, 0.1, 0.3, 0.7, 1.5, 2.5 s: a handful, against thousands of calls.
    let requests = emulator.requests(Endpoint::Token);
    println!("{errors} failed calls caused {requests} requests to the identity provider");
    assert!(errors > 1000);
    assert!((4..=9).contains(&requests), "{requests} requests");
    let error = cache.get().await.unwrap_err();
    assert!(
        error.to_string().contains("AADSTS50001"),
        "says why: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_and_dropped_connections_are_typed_errors_then_recover() {
    let emulator = Suite::start(HOUR);
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
        assert!(!error.message().is_empty());
    }
    emulator.clear_fault(Endpoint::Token);
    tokio::time::sleep(Duration::from_millis(150)).await;
    cache.get().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_stall_leaves_callers_with_a_valid_token_unaffected() {
    // Refresh at 9 s, usable until 10.8 s: the refresh meets the stall inside the window.
    let emulator = Suite::start(Duration::from_secs(12));
    let pool = pool_builder(
        &user_config(&emulator, 8),
        connector(&emulator),
        PoolOptions::new().max_age(Duration::from_millis(300), Duration::from_millis(100)),
    )
    .unwrap()
    .build()
    .unwrap();
    checkout(&pool).await.unwrap();
    emulator.set_latency(Endpoint::Token, Duration::from_secs(30));

    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let (pool2, slowest2) = (pool.clone(), slowest.clone());
    let load = hammer(16, Duration::from_secs(10), move || {
        let (pool, slowest) = (pool2.clone(), slowest2.clone());
        async move {
            let started = Instant::now();
            checkout(&pool).await?;
            let mut slowest = slowest.lock().unwrap();
            *slowest = (*slowest).max(started.elapsed());
            Ok(())
        }
    })
    .await;

    assert_eq!(load.failed, 0, "first failure: {:?}", load.first_error);
    assert!(
        emulator.requests(Endpoint::Token) >= 2,
        "the refresh is stuck in the stall"
    );
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);
    let slowest = *slowest.lock().unwrap();
    assert!(
        slowest < Duration::from_secs(5),
        "no caller waited on the 30 s stall (slowest {slowest:?})"
    );
    println!(
        "{} checkouts during the stall, slowest {slowest:?}",
        load.ok
    );
}

#[tokio::test]
async fn a_token_already_expired_on_arrival_from_a_skewed_provider_is_not_served() {
    let emulator = Suite::start(Duration::from_secs(600));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_server_side_while_idle_are_replaced() {
    let emulator = Suite::start(HOUR);
    let pool =
        postgres_entra_deadpool::create_pool(&user_config(&emulator, 4), connector(&emulator))
            .unwrap();
    let held: Vec<_> = futures_join(4, || pool.get()).await;
    drop(held);
    let bb8 = bb8::Pool::builder()
        .max_size(4)
        .test_on_check_out(true)
        .build(
            postgres_entra_bb8::EntraConnectionManager::new(
                emulator.server_config(),
                connector(&emulator),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    drop(futures_join(4, || bb8.get()).await);
    let logins_before = emulator.logins().len();

    let admin = emulator.admin_client().await.unwrap();
    let killed: i64 = admin
        .query_one(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity where usename = 'orders-api'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 8);
    tokio::time::sleep(Duration::from_millis(300)).await;

    for _ in 0..50 {
        checkout(&pool).await.unwrap();
        let client = bb8.get().await.unwrap();
        client.simple_query("select 1").await.unwrap();
    }
    assert!(
        emulator.logins().len() >= logins_before + 2,
        "dead connections were replaced"
    );
}

async fn futures_join<T, E: std::fmt::Debug, F, Fut>(n: usize, make: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut out = Vec::new();
    let futures: Vec<_> = (0..n).map(|_| make()).collect();
    for future in futures {
        out.push(future.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_rejected_for_a_stale_token_is_retried_once_with_a_fresh_one() {
    let emulator = Arc::new(Suite::start(HOUR));
    let calls = Arc::new(AtomicUsize::new(0));
    let (minter, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new("stale-then-fresh", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        // The first token is one the server no longer accepts (a rotated-out signing key).
        let signer = if n == 0 {
            Signer::Rogue
        } else {
            Signer::Issuer
        };
        let token = minter
            .issue_token(&minter.user(), TokenOptions::default().signer(signer))
            .unwrap();
        async move { Ok(AccessToken::new(token, SystemTime::now() + HOUR)) }
    });
    let connector = EntraConnector::builder(source)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let pool = postgres_entra_deadpool::create_pool(&user_config(&emulator, 2), connector.clone())
        .unwrap();

    let client = pool.get().await.unwrap();
    let user: String = client
        .query_one("select current_user", &[])
        .await
        .unwrap()
        .get(0);

    assert_eq!(user, "alice@contoso.onmicrosoft.com");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let outcomes: Vec<_> = emulator.logins().into_iter().map(|l| l.outcome).collect();
    assert_eq!(outcomes, [Err(Rejection::BadSignature), Ok(())]);
    assert_eq!(connector.cache().stats().invalidations, 1);
}
