//! Sharing is explicit (clone a connector or a cache), the scope follows each pool's host (a
//! cache per cloud, whatever the order), and the cache's background work does not belong to
//! whichever runtime used it first.

use postgres_entra::{
    AccessToken, Cloud, EntraConnector, Error, TlsRoots, TokenCache, TokenErrorKind, TokenSource,
};
use postgres_entra_testkit::{Emulator, FnTokenSource};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::{connector, current_user};

/// A source counting its calls, minting tokens for the emulator's user that live `lifetime`,
/// each answer taking `latency`.
fn counting(
    emulator: &Arc<Emulator>,
    lifetime: Duration,
    latency: Duration,
) -> (Arc<dyn TokenSource>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (emulator, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new("counting", move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        let token = emulator
            .issue_token(&emulator.user(), Default::default())
            .unwrap();
        async move {
            tokio::time::sleep(latency).await;
            Ok(AccessToken::new(token, SystemTime::now() + lifetime))
        }
    });
    (Arc::new(source), calls)
}

/// Runs `f` on a new thread with a single-threaded runtime of its own.
fn on_a_thread_of_its_own<T: Send + 'static>(
    f: impl FnOnce(tokio::runtime::Runtime) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        f(runtime)
    })
}

#[tokio::test]
async fn clones_share_one_token_and_connectors_built_apart_do_not() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, calls) = counting(&emulator, Duration::from_secs(3600), Duration::ZERO);
    let config = emulator.server_config();

    let first = connector(&emulator, source.clone(), None);
    let clone = first.clone();
    current_user(&first, &config).await.unwrap();
    current_user(&clone, &config).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "clones share the cache");

    let apart = connector(&emulator, source.clone(), None);
    current_user(&apart, &config).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "no hidden sharing");

    // Connectors with different settings can share one cache explicitly.
    let cache = TokenCache::builder(source).build().unwrap();
    let as_user = EntraConnector::builder_with_cache(cache.clone())
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let as_other_role = EntraConnector::builder_with_cache(cache.clone())
        .role_name("orders-api")
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    current_user(&as_user, &config).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let refused = current_user(&as_other_role, &config).await.unwrap_err();
    assert!(matches!(refused, Error::LoginRejected(_)), "{refused}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "one cache for both: one token, and one replacement after the refusal"
    );
    let mismatch = EntraConnector::builder_with_cache(cache)
        .cloud(Cloud::China)
        .build()
        .unwrap_err();
    assert!(matches!(mismatch, Error::Config { .. }), "{mismatch}");
}

/// Settings for `host`, reached at a closed loopback port: the login stops at the network, after
/// the token was fetched.
fn config_for(host: &str, closed_port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .hostaddr([127, 0, 0, 1].into())
        .port(closed_port)
        .dbname("postgres");
    config
}

#[tokio::test]
async fn each_pools_host_decides_the_scope_whatever_the_order_and_a_told_cloud_refuses_others() {
    let scopes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let asked = scopes.clone();
    let source = Arc::new(FnTokenSource::new("scope-test", move |scope| {
        asked.lock().unwrap().push(scope.to_owned());
        async {
            Ok(AccessToken::new(
                "t",
                SystemTime::now() + Duration::from_secs(3600),
            ))
        }
    }));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gov = config_for("db1.postgres.database.usgovcloudapi.net", port);
    let public = config_for("db1.postgres.database.azure.com", port);
    let reached = |result: Result<_, Error>| match result {
        Err(Error::Connect { .. }) => {}
        other => panic!("expected to reach the network, got {:?}", other.map(|_| ())),
    };

    // A connector told nothing: US Government first, then public; each gets its own scope.
    let connector = EntraConnector::builder(source.clone())
        .role_name("r")
        .build()
        .unwrap();
    reached(postgres_entra_tokio_postgres::connect(&connector, &gov).await);
    reached(postgres_entra_tokio_postgres::connect(&connector, &public).await);
    reached(postgres_entra_tokio_postgres::connect(&connector, &gov).await);
    assert_eq!(
        *scopes.lock().unwrap(),
        [Cloud::UsGovernment.scope(), Cloud::Public.scope()],
        "a cache per cloud, each asked once"
    );

    // Told the cloud, the connector refuses a server plainly in another one, before any token.
    let china = EntraConnector::builder(source.clone())
        .role_name("r")
        .cloud(Cloud::China)
        .build()
        .unwrap();
    let error = postgres_entra_tokio_postgres::connect(&china, &gov)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Cloud::UsGovernment"), "{error}");
    assert_eq!(scopes.lock().unwrap().len(), 2);
    // A name that says nothing about the cloud (a custom domain) gets no token unless allowed...
    let custom = config_for("db.example.com", port);
    let error = postgres_entra_tokio_postgres::connect(&china, &custom)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("allow_host"), "{error}");
    assert_eq!(scopes.lock().unwrap().len(), 2, "no token was asked for");
    // ... and is accepted once allowed.
    let allowed = EntraConnector::builder(source.clone())
        .role_name("r")
        .cloud(Cloud::China)
        .allow_host("db.example.com")
        .build()
        .unwrap();
    reached(postgres_entra_tokio_postgres::connect(&allowed, &custom).await);

    // A host and a cloud that disagree are refused when the connector is built, naming the fix.
    let error = EntraConnector::builder(source.clone())
        .host("mydb.postgres.database.azure.com")
        .cloud(Cloud::UsGovernment)
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("drop `.cloud(..)`"), "{error}");

    // Plaintext is refused before anything else.
    let mut plaintext = public.clone();
    plaintext.ssl_mode(tokio_postgres::config::SslMode::Disable);
    assert!(matches!(
        postgres_entra_tokio_postgres::connect(&connector, &plaintext).await,
        Err(Error::Config { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_refresh_carries_on_after_the_runtime_that_started_it_is_gone() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, calls) = counting(&emulator, Duration::from_secs(8), Duration::ZERO);
    let cache = TokenCache::builder(source).build().unwrap();

    // First use on a runtime that then shuts down, taking the refresh timer with it.
    let first = {
        let cache = cache.clone();
        on_a_thread_of_its_own(move |runtime| {
            let token = runtime.block_on(cache.get()).unwrap();
            runtime.shutdown_background();
            token.secret().to_owned()
        })
        .join()
        .unwrap()
    };
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Past the refresh point (4 s; usable until 7.2 s), this runtime's callers get the valid
    // token at once and the refresh runs here.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert_eq!(cache.get().await.unwrap().secret(), first);
    let deadline = Instant::now() + Duration::from_secs(2);
    while calls.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the refresh never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_ne!(cache.get().await.unwrap().secret(), first);
    assert_eq!(cache.stats().waits, 1, "only the very first call waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_released_when_the_runtime_running_its_fetch_shuts_down() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, calls) = counting(
        &emulator,
        Duration::from_secs(3600),
        Duration::from_millis(800),
    );
    let cache = TokenCache::builder(source).build().unwrap();

    // A fetch starts on another runtime, which shuts down while it is in flight.
    let other = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    other.spawn({
        let cache = cache.clone();
        async move { cache.get().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    other.shutdown_background();

    let started = Instant::now();
    let token = waiter.await.unwrap().unwrap();
    assert!(SystemTime::now() < token.expires_on());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the waiter fetched again on its own runtime"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_bounded_even_when_the_runtime_running_its_fetch_is_blocked() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, _) = counting(
        &emulator,
        Duration::from_secs(3600),
        Duration::from_millis(500),
    );
    let cache = TokenCache::builder(source)
        .options(postgres_entra::CacheOptions::default().fetch_timeout(Duration::from_secs(1)))
        .build()
        .unwrap();

    // The fetch starts on a single-threaded runtime whose thread then blocks for 4 s, so neither
    // the fetch nor its own timeout can make progress.
    let blocked = {
        let cache = cache.clone();
        on_a_thread_of_its_own(move |runtime| {
            runtime.block_on(async move {
                tokio::spawn(async move { cache.get().await });
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                std::thread::sleep(Duration::from_secs(4));
            });
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let error = cache.get().await.unwrap_err();
    let waited = started.elapsed();

    assert_eq!(error.kind(), TokenErrorKind::Timeout, "{error}");
    assert!(error.message().contains("still running"), "{error}");
    // The fetch timeout (1 s) plus the one-second grace, not the 4 s block.
    assert!(waited < Duration::from_millis(3500), "waited {waited:?}");
    blocked.join().unwrap();
}
