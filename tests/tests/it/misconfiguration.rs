//! Permanent mistakes (a wrong role, an untrusted CA, plaintext, the wrong cloud) reach the user
//! fast and typed through each pool, and a misconfigured pool cannot thrash a cache it shares.

use bb8::RunError;
use deadpool_postgres::Config;
use postgres_entra::{
    AzureTokenSource, CacheOptions, Cloud, EntraConnector, Error, LoginRetry, SessionOptions,
    TlsRoots, TokenCache,
};
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_deadpool::create_pool;
use postgres_entra_testkit::Endpoint;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::pools::{Deadpool, PoolSpec, PoolUnderTest};
use crate::{
    Suite, TestConnector, captured_text, chain, expected_requests, hammer, service_principal_cache,
    service_principal_source,
};

/// A connector over the service principal's credential that names no role: each pool's
/// configured user decides.
fn shared_connector(emulator: &Suite) -> TestConnector {
    over(
        emulator,
        service_principal_cache(emulator, CacheOptions::default()),
    )
}

fn over(emulator: &Suite, cache: TokenCache) -> TestConnector {
    TestConnector::over(
        EntraConnector::builder_with_cache(cache.clone())
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned())),
        cache,
    )
}

/// [`shared_connector`] over one credential kept for every request, as `AzureTokenSource::new`
/// takes one: its own cache answers until 5 minutes before a token expires.
fn kept_credential_connector(emulator: &Suite) -> TestConnector {
    let credential = emulator
        .client_secret_credential(&emulator.service_principal())
        .unwrap();
    over(
        emulator,
        TokenCache::builder(AzureTokenSource::new(credential))
            .build()
            .unwrap(),
    )
}

/// A deadpool config for the service principal's role, as a user loads it.
fn healthy_config(emulator: &Suite) -> Config {
    Deadpool::user_config(&PoolSpec::new(emulator, shared_connector(emulator)).user("orders-api"))
}

/// The same server under a role that does not exist.
fn wrong_role(emulator: &Suite) -> tokio_postgres::Config {
    let mut config = emulator.server_config();
    config.user("nobody-mi");
    config
}

/// Counts the connect errors bb8 passes to its sink, and checks each is a rejected login.
#[derive(Debug, Clone, Default)]
struct CountingSink(Arc<AtomicU64>, Arc<AtomicU64>);

impl bb8::ErrorSink<Error> for CountingSink {
    fn sink(&self, error: Error) {
        let counter = match error {
            Error::LoginRejected(_) => &self.0,
            _ => &self.1,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}

/// Runs a healthy deadpool pool and a bb8 pool with a wrong role (bb8 retrying its connects until
/// each checkout times out) side by side on one connector for `run`; returns how many connects
/// of the wrong pool were refused.
async fn side_by_side(emulator: &Suite, connector: &TestConnector, run: Duration) -> u64 {
    // The application starts: one caller waits for the first token.
    connector.cache().get().await.unwrap();
    let sink = CountingSink::default();
    let wrong = bb8::Pool::builder()
        .max_size(4)
        .connection_timeout(Duration::from_secs(1))
        .error_sink(Box::new(sink.clone()))
        .build_unchecked(
            EntraConnectionManager::new(wrong_role(emulator), connector, SessionOptions::new())
                .unwrap(),
        );

    let misconfigured = tokio::spawn(hammer(4, run, move || {
        let pool = wrong.clone();
        async move {
            match pool.get().await {
                Ok(_) => Err("the wrong role logged in".to_owned()),
                Err(RunError::TimedOut) => Ok(()),
                Err(other) => Err(format!("{other:?}")),
            }
        }
    }));
    let healthy = Deadpool::build(
        PoolSpec::new(emulator, connector.clone())
            .user("orders-api")
            .max_age(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let load = hammer(8, run, move || {
        let pool = healthy.clone();
        async move { pool.checkout_as("orders-api").await }
    })
    .await;
    let timed_out = misconfigured.await.unwrap();
    assert_eq!(timed_out.failed, 0, "{:?}", timed_out.first_error);
    assert_eq!(load.failed, 0, "first failure: {:?}", load.first_error);
    // Give connects still in flight when the load stopped time to end.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (rejected, other) = (sink.0.load(Ordering::SeqCst), sink.1.load(Ordering::SeqCst));
    assert_eq!(other, 0, "every failed connect was a rejected login");
    figure!(
        "healthy pool: {} checkouts; wrong-role pool: {rejected} refused connects; cache {:?}",
        load.ok,
        connector.cache().stats()
    );
    rejected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_role_pool_sharing_the_cache_costs_at_most_one_request_per_token_lifetime() {
    // 4 s tokens: azure_identity's own cache (5 min window) never answers, so every request the
    // cache makes reaches the identity provider: the worst case.
    const LIFETIME: Duration = Duration::from_secs(4);
    const RUN: Duration = Duration::from_secs(10);
    let emulator = Suite::start(LIFETIME).await;
    emulator.set_latency(Endpoint::Token, Duration::from_millis(200));
    let connector = shared_connector(&emulator);

    let rejected = side_by_side(&emulator, &connector, RUN).await;

    let stats = connector.cache().stats();
    let lifetimes = (RUN.as_secs_f64() / (LIFETIME.as_secs_f64() * 0.5)).ceil() as u64 + 1;
    let normal = *expected_requests(RUN, LIFETIME).end();
    assert!(rejected > 10, "the wrong pool kept trying: {rejected}");
    assert!(
        stats.invalidations <= lifetimes,
        "at most one replacement per token: {stats:?}"
    );
    assert!(
        emulator.requests(Endpoint::Token) <= normal + lifetimes,
        "{} token requests for {lifetimes} lifetimes",
        emulator.requests(Endpoint::Token)
    );
    assert_eq!(
        stats.waits, 1,
        "after the start, no caller of either pool waited on the provider (200 ms each time)"
    );
}

/// With hour-long tokens: through a credential kept for every request, whose cache answers with
/// the token already held, a wrong-role pool costs no token request at all; through new
/// credentials (the constructors'), one: the replacement for the first refused token, itself never
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_hour_long_tokens_a_wrong_role_pool_costs_one_token_request_at_most() {
    for (kept, requests) in [(true, 1), (false, 2)] {
        let emulator = Suite::start(Duration::from_secs(3600)).await;
        let connector = if kept {
            kept_credential_connector(&emulator)
        } else {
            shared_connector(&emulator)
        };

        let rejected = side_by_side(&emulator, &connector, Duration::from_secs(4)).await;

        assert!(rejected > 10, "{rejected}");
        assert_eq!(
            emulator.requests(Endpoint::Token),
            requests,
            "credential kept: {kept}"
        );
        let refused: Vec<_> = emulator
            .logins()
            .into_iter()
            .filter(|l| l.role == "nobody-mi")
            .collect();
        // Refused logins back off: most failed connects are answered with the last refusal,
        // without a login; and none is retried with the same token. bb8 opens its 4 connections
        // at once: with new credentials, each is retried once with the replacement.
        let first = refused.first().map(|l| l.at);
        let times: Vec<_> = refused.iter().map(|l| l.at - first.unwrap()).collect();
        let most = if kept { 6 } else { 10 };
        assert!(
            (1..=most).contains(&refused.len()),
            "{} refused logins reached the server in 4 s (credential kept: {kept}): {times:?}",
            refused.len()
        );
        assert!(rejected >= refused.len() as u64);
        assert_eq!(connector.cache().stats().waits, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_says_what_went_wrong_in_its_own_error_and_logs_it_once() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut config = healthy_config(&emulator);
    config.user = Some("nobody-mi".into());
    let pool = create_pool(&config, &shared_connector(&emulator), SessionOptions::new()).unwrap();

    let error = pool.get().await.unwrap_err();

    // What a user's `{e}` shows names the cause...
    let text = error.to_string();
    assert!(
        text.starts_with("Error occurred while creating a new object: PostgreSQL refused the Entra ID login as role `nobody-mi`"),
        "{text}"
    );
    // ...and the typed error is deadpool's backend error itself.
    let Some(Error::LoginRejected(rejected)) = pool.manager().explain(&error) else {
        panic!("expected a rejected login in {}", chain(&error));
    };
    assert_eq!(rejected.role(), "nobody-mi");
    assert!(matches!(rejected.retry(), LoginRetry::FreshTokenRefused));
    // Logged once where it happened, at WARN, with the pool's name.
    let log = captured_text();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("refused the Entra ID login as role `nobody-mi`"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(
        lines[0].contains("connections of pool localhost:"),
        "{}",
        lines[0]
    );

    // A closed port is a network error, typed too.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut unreachable = healthy_config(&emulator);
    unreachable.port = Some(port);
    let pool = create_pool(
        &unreachable,
        &shared_connector(&emulator),
        SessionOptions::new(),
    )
    .unwrap();
    let error = pool.get().await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("could not reach PostgreSQL at localhost"),
        "{error}"
    );
    match pool.manager().explain(&error) {
        Some(Error::Connect { target, .. }) => assert!(target.ends_with(&format!(":{port}"))),
        other => panic!("expected a network error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_reports_permanent_mistakes_in_under_a_second() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;

    // Checked when the manager is made.
    let mut plaintext = emulator.server_config();
    plaintext.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let error = EntraConnectionManager::new(
        plaintext,
        &shared_connector(&emulator),
        SessionOptions::new(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("sslmode=disable"), "{error}");

    // Found by one login at startup, with its reason: a CA we do not trust, a missing role.
    let untrusted = EntraConnector::builder(service_principal_source(&emulator))
        .role_name("orders-api")
        .tls_roots(TlsRoots::Azure)
        .build()
        .unwrap();
    let cases = [
        (
            EntraConnectionManager::new(
                emulator.server_config(),
                &untrusted,
                SessionOptions::new(),
            )
            .unwrap(),
            "TLS",
        ),
        (
            EntraConnectionManager::new(
                wrong_role(&emulator),
                &shared_connector(&emulator),
                SessionOptions::new(),
            )
            .unwrap(),
            "refused the Entra ID login as role `nobody-mi`",
        ),
    ];
    for (manager, says) in cases {
        let started = Instant::now();
        let error = manager.check().await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert!(error.to_string().contains(says), "{error}");
        assert!(!error.is_transient());

        // bb8's `get()` says only `TimedOut`; the manager says why.
        let pool = bb8::Pool::builder()
            .connection_timeout(Duration::from_secs(1))
            .build_unchecked(manager.clone());
        let timed_out = pool.get().await.unwrap_err();
        let why = manager.explain(&timed_out).expect("the cause");
        assert!(why.to_string().contains(says), "{why}");
    }
}

/// Settings for `host` reached at the emulator's address.
fn deadpool_config_for(emulator: &Suite, host: &str) -> Config {
    let mut config = healthy_config(emulator);
    config.host = Some(host.into());
    config.hostaddr = Some([127, 0, 0, 1].into());
    config
}

#[tokio::test]
async fn every_pool_takes_the_cloud_from_its_host_and_refuses_a_mismatch_when_created() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let gov = "db1.postgres.database.usgovcloudapi.net";
    // Told nothing, the connector lets each pool's host decide; no getter decides anything.
    let connector = EntraConnector::builder(service_principal_source(&emulator))
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();

    let deadpool = create_pool(
        &deadpool_config_for(&emulator, gov),
        &connector,
        SessionOptions::new(),
    )
    .unwrap();
    assert_eq!(
        deadpool.manager().token_cache().scope(),
        Cloud::UsGovernment.scope()
    );
    let public = create_pool(
        &healthy_config(&emulator),
        &connector,
        SessionOptions::new(),
    )
    .unwrap();
    assert_eq!(
        public.manager().token_cache().scope(),
        Cloud::Public.scope()
    );

    let mut bb8_config = tokio_postgres::Config::new();
    bb8_config
        .host(gov)
        .hostaddr([127, 0, 0, 1].into())
        .port(emulator.port())
        .dbname(emulator.database());
    let manager =
        EntraConnectionManager::new(bb8_config.clone(), &connector, SessionOptions::new()).unwrap();
    assert_eq!(manager.token_cache().scope(), Cloud::UsGovernment.scope());

    // A connector told another cloud fails at pool creation, naming the fix.
    let china = EntraConnector::builder(AzureTokenSource::new(
        emulator
            .client_secret_credential(&emulator.service_principal())
            .unwrap(),
    ))
    .cloud(Cloud::China)
    .build()
    .unwrap();
    let sqlx_options = || {
        sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .host(gov)
            .port(emulator.port())
            .database(emulator.database())
            .username("orders-api")
    };
    let sqlx_error = postgres_entra_sqlx::connect_lazy_with(
        sqlx_options(),
        sqlx::postgres::PgPoolOptions::new(),
        &china,
        SessionOptions::new(),
    )
    .unwrap_err();
    for error in [
        create_pool(
            &deadpool_config_for(&emulator, gov),
            &china,
            SessionOptions::new(),
        )
        .unwrap_err(),
        EntraConnectionManager::new(bb8_config, &china, SessionOptions::new()).unwrap_err(),
        sqlx_error,
    ] {
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(error.to_string().contains("Cloud::UsGovernment"), "{error}");
    }
    assert_eq!(emulator.requests(Endpoint::Token), 0);

    // sqlx: a lazy pool opens no connection (sqlx could not resolve the name); its cache is the
    // one of the host's cloud.
    let pool = postgres_entra_sqlx::connect_lazy_with(
        sqlx_options(),
        sqlx::postgres::PgPoolOptions::new(),
        &connector,
        SessionOptions::new(),
    )
    .unwrap();
    assert_eq!(pool.token_cache().scope(), Cloud::UsGovernment.scope());
    pool.close().await;
}

/// Every host of a multi-host setting is checked: one host a token may not go to refuses the pool
/// (deadpool's `hosts`, bb8's and diesel-async's tokio-postgres config), before any token.
#[tokio::test]
async fn one_host_a_token_may_not_go_to_refuses_a_multi_host_pool() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let connector = crate::connector_builder(&emulator).build().unwrap();
    let mut deadpool = healthy_config(&emulator);
    deadpool.host = None;
    deadpool.hosts = Some(vec!["localhost".into(), "db.example.com".into()]);
    let mut two = tokio_postgres::Config::new();
    two.host("localhost")
        .host("db.example.com")
        .port(emulator.port())
        .dbname(emulator.database());
    let errors = [
        create_pool(&deadpool, &connector, SessionOptions::new()).unwrap_err(),
        EntraConnectionManager::new(two.clone(), &connector, SessionOptions::new()).unwrap_err(),
        postgres_entra_diesel::EntraDiesel::new(two, &connector, SessionOptions::new())
            .unwrap_err(),
    ];
    for error in errors {
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(error.to_string().contains("db.example.com"), "{error}");
    }
    assert_eq!(
        emulator.requests(Endpoint::Token),
        0,
        "no token was requested"
    );
}
