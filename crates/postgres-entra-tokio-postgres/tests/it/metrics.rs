//! The token cache's OpenTelemetry metrics, read back through the SDK's in-memory exporter: a
//! provider outage on a paused clock, and logins against the emulator with a real credential.

use postgres_entra::{
    AccessToken, AzureTokenSource, Clock, TokenCache, TokenError, TokenErrorKind, TokioClock,
};
use postgres_entra_testkit::{Emulator, Fault, FnTokenSource, MetricsReader, Signer, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use crate::{current_user, minting};

const TIME_TO_EXPIRY: &str = "postgres_entra.token.time_to_expiry";
const AGE: &str = "postgres_entra.token.age";
const REFRESHES: &str = "postgres_entra.token.refreshes";
const DURATION: &str = "postgres_entra.token.request.duration";

/// Lets tasks woken by a time advance run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_provider_outage_shows_as_failed_refreshes_and_a_falling_time_to_expiry() {
    let reader = MetricsReader::new();
    let clock = TokioClock::new(SystemTime::now());
    let (calls, down) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let (counter, failing, token_clock) = (calls.clone(), down.clone(), clock.clone());
    let source = FnTokenSource::new("metrics-test", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let result = if failing.load(Ordering::SeqCst) {
            Err(
                TokenError::new(TokenErrorKind::ServerError, "service unavailable")
                    .with_http_status(503),
            )
        } else {
            Ok(AccessToken::new(
                format!("secret-token-{n}"),
                token_clock.now() + Duration::from_secs(3600),
            ))
        };
        async move { result }
    });
    let cache = TokenCache::builder(source)
        .clock(Arc::new(clock.clone()))
        .meter(reader.meter())
        .build()
        .unwrap();
    let scope = cache.scope().to_owned();
    let ours = [
        ("postgres_entra.identity", "metrics-test"),
        ("postgres_entra.scope", scope.as_str()),
    ];

    let token = cache.get().await.unwrap();
    let start = reader.collect();
    let left_at_start = start.value(TIME_TO_EXPIRY, &ours).unwrap();
    // Handed out until 30 s before expiry.
    let expected = (token.expires_on() - Duration::from_secs(30))
        .duration_since(clock.now())
        .unwrap()
        .as_secs_f64();
    assert!(
        (left_at_start - expected).abs() < 1.0,
        "{left_at_start} s left, expected {expected}"
    );
    assert_eq!(start.value(AGE, &ours), Some(0.0));
    let success = [
        ("postgres_entra.outcome", "success"),
        ("postgres_entra.trigger", "caller"),
    ];
    assert_eq!(start.sum(REFRESHES, &success), 1.0);
    assert_eq!(
        start.sum(REFRESHES, &[("postgres_entra.outcome", "failure")]),
        0.0
    );

    // The provider goes down; the background refresh (at half the token's life) and its retries
    // fail, while the token keeps being handed out. 45 minutes into the token's life:
    down.store(true, Ordering::SeqCst);
    let refresh_at = token.expires_on() - Duration::from_secs(15 * 60);
    tokio::time::advance(refresh_at.duration_since(clock.now()).unwrap()).await;
    settle().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    let early = reader.collect();
    let failed = [
        ("postgres_entra.outcome", "failure"),
        ("postgres_entra.trigger", "background"),
        ("error.type", "server_error"),
    ];
    let failures_early = early.sum(REFRESHES, &failed);
    assert!(failures_early >= 1.0, "{}", early.text());
    let left_early = early.value(TIME_TO_EXPIRY, &ours).unwrap();
    assert!(left_early < left_at_start - 44.0 * 60.0, "{left_early}");
    assert!(early.value(AGE, &ours).unwrap() >= 45.0 * 60.0);

    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
    }
    let later = reader.collect();
    let left_later = later.value(TIME_TO_EXPIRY, &ours).unwrap();
    assert!(
        later.sum(REFRESHES, &failed) > failures_early,
        "failures keep being counted"
    );
    assert!(
        (left_early - left_later - 600.0).abs() < 2.0,
        "{left_early} -> {left_later}"
    );
    assert!(cache.get().await.is_ok(), "the token is still handed out");

    // Past the point where the token is no longer handed out, the gauge reads zero.
    tokio::time::advance(Duration::from_secs(10 * 60)).await;
    settle().await;
    let _ = cache.get().await.unwrap_err();
    let end = reader.collect();
    assert_eq!(end.value(TIME_TO_EXPIRY, &ours), Some(0.0));
    let requests = end.count(DURATION, &ours);
    assert_eq!(requests, u64::from(calls.load(Ordering::SeqCst)));
    assert_eq!(
        end.count(DURATION, &[("postgres_entra.outcome", "failure")]) as f64,
        end.sum(REFRESHES, &[("postgres_entra.outcome", "failure")])
    );
    assert!(!end.text().contains("secret-token"), "{}", end.text());
}

#[tokio::test]
async fn logins_with_a_real_credential_are_counted_with_a_readable_identity_and_no_secret() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let reader = MetricsReader::new();
    let connector = postgres_entra::EntraConnector::builder(AzureTokenSource::new(
        emulator.client_secret_credential(&sp).unwrap(),
    ))
    .tls_roots(postgres_entra::TlsRoots::CaPem(
        emulator.ca_pem().to_owned(),
    ))
    .role_name(&sp.role_name)
    .meter(reader.meter())
    .build()
    .unwrap();

    for _ in 0..5 {
        assert_eq!(
            current_user(&connector, &emulator.server_config())
                .await
                .unwrap(),
            sp.role_name
        );
    }

    let metrics = reader.collect();
    let identity = metrics
        .points()
        .iter()
        .find_map(|p| p.attribute("postgres_entra.identity"))
        .unwrap();
    assert!(
        identity.starts_with("ClientSecretCredential") && identity.contains(&sp.client_id),
        "{identity}"
    );
    assert_eq!(
        metrics.sum(REFRESHES, &[("postgres_entra.outcome", "success")]),
        1.0
    );
    assert_eq!(metrics.sum("postgres_entra.login.rejections", &[]), 0.0);
    let text = metrics.text();
    let secret = sp.client_secret.as_deref().unwrap();
    assert!(!text.contains(secret), "the client secret leaked: {text}");
    for token in emulator.issued_tokens() {
        assert!(!text.contains(&token), "a token leaked: {text}");
        // Nor any recognisable part of one (each JWT segment).
        for segment in token.split('.') {
            assert!(!text.contains(segment), "a token segment leaked");
        }
    }
}

#[tokio::test]
async fn a_refused_login_counts_a_rejection_a_retry_and_an_invalidation() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let reader = MetricsReader::new();
    // The first token is a forgery the server refuses; the second is good.
    let (source, _calls) = minting(&emulator, emulator.user(), |n| {
        TokenOptions::default().signer(if n == 1 {
            Signer::Rogue
        } else {
            Signer::Issuer
        })
    });
    let connector = postgres_entra::EntraConnector::builder(source)
        .tls_roots(postgres_entra::TlsRoots::CaPem(
            emulator.ca_pem().to_owned(),
        ))
        .meter(reader.meter())
        .build()
        .unwrap();

    current_user(&connector, &emulator.server_config())
        .await
        .unwrap();

    let metrics = reader.collect();
    assert_eq!(metrics.sum("postgres_entra.login.rejections", &[]), 1.0);
    assert_eq!(metrics.sum("postgres_entra.login.retries", &[]), 1.0);
    assert_eq!(metrics.sum("postgres_entra.token.invalidations", &[]), 1.0);
    assert_eq!(
        metrics.sum(
            REFRESHES,
            &[
                ("postgres_entra.trigger", "rejected"),
                ("postgres_entra.outcome", "success")
            ]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum(REFRESHES, &[("postgres_entra.trigger", "caller")]),
        1.0
    );
    for token in emulator.issued_tokens() {
        assert!(!metrics.text().contains(&token), "a token leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entra_outage_seen_by_a_real_credential_counts_failures_as_the_token_runs_down() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let emulator = Emulator::builder()
        .token_lifetime(LIFETIME)
        .start_async()
        .await
        .unwrap();
    let sp = emulator.service_principal();
    let reader = MetricsReader::new();
    let cache = TokenCache::builder(AzureTokenSource::new(
        emulator.client_secret_credential(&sp).unwrap(),
    ))
    .meter(reader.meter())
    .options(
        postgres_entra::CacheOptions::default()
            .expiry_buffer(Duration::from_millis(500))
            .backoff(Duration::from_millis(200), Duration::from_millis(400))
            .retry_interval(Duration::from_millis(200)),
    )
    .build()
    .unwrap();

    let token = cache.get().await.unwrap();
    emulator.set_fault(postgres_entra_testkit::Endpoint::Token, Fault::ServerError);
    // Past the refresh point (half the life: 4 s of 8), the background refresh fails.
    let refresh_in = (token.expires_on() - LIFETIME / 2)
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(refresh_in + Duration::from_millis(300)).await;
    let first = reader.collect();
    // Retries come at most 400 ms apart (the backoff's ceiling; the retry interval is
    // 200 ms): a second spans at least two, and the token still has 2.7 s to live.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = reader.collect();

    let failed = [
        ("postgres_entra.outcome", "failure"),
        ("error.type", "server_error"),
    ];
    let (before, after) = (
        first.sum(REFRESHES, &failed),
        second.sum(REFRESHES, &failed),
    );
    assert!(before >= 1.0, "{}", first.text());
    assert!(after > before, "retries keep failing: {before} -> {after}");
    let (left_first, left_second) = (
        first.sum(TIME_TO_EXPIRY, &[]),
        second.sum(TIME_TO_EXPIRY, &[]),
    );
    assert!(
        left_second < left_first && left_first > 0.0,
        "{left_first} -> {left_second}"
    );
}
