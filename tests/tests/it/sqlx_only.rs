//! What only the sqlx adapter has to get right: a pool handle that owns the task keeping its
//! connect options current, the user named by a URL or by sqlx's defaults, no expired token ever
//! left in the options, a typed answer (not ENOENT) when no token can be had, and its metrics.

use postgres_entra::{AccessToken, EntraConnector, Error, PoolOptions, TlsRoots};
use postgres_entra_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use postgres_entra_testkit::{Endpoint, FnTokenSource, Rejection, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::{Suite, connector, connector_builder, metered_connector, wrong_secret_connector};

/// Waits (bounded) until the refresh task has ended.
async fn ended(pool: &postgres_entra_sqlx::EntraPgPool) -> bool {
    let started = Instant::now();
    while pool.is_refreshing() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !pool.is_refreshing()
}

fn options(emulator: &Suite) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(emulator.host())
        .port(emulator.port())
        .database(emulator.database())
        .username("")
}

fn url(emulator: &Suite) -> String {
    format!(
        "postgres://{}:{}/{}",
        emulator.host(),
        emulator.port(),
        emulator.database()
    )
}

async fn current_user(pool: &postgres_entra_sqlx::EntraPgPool) -> Result<String, sqlx::Error> {
    let user: (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&**pool)
        .await?;
    Ok(user.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_task_ends_when_the_pool_is_closed_or_dropped() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;

    let closed = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new(),
        &connector(&emulator),
        PoolOptions::new(),
    )
    .await
    .unwrap();
    assert!(closed.is_refreshing());
    closed.close().await;
    assert!(ended(&closed).await, "closing ends it");

    let dropped = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new(),
        &connector(&emulator),
        PoolOptions::new(),
    )
    .await
    .unwrap();
    let plain: sqlx::PgPool = (*dropped).clone();
    assert!(dropped.is_refreshing());
    drop(dropped);
    // The plain pool lives on, without the task: its options hold no token any more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(plain.connect_options().get_socket().is_some());
    let logins = emulator.logins().len();
    assert!(plain.acquire().await.is_err());
    assert_eq!(emulator.logins().len(), logins, "no login without the task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tokens_reach_the_connect_options_before_the_old_ones_lapse() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let emulator = Suite::start(LIFETIME).await;
    let connector = connector(&emulator);
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_lifetime(Duration::from_millis(300)),
        &connector,
        PoolOptions::new(),
    )
    .await
    .unwrap();
    let first = connector.cache().get().await.unwrap();

    // Past the first token's refresh point and its usable life: every connect since used a
    // newer token, which the server accepted.
    let until = Instant::now() + LIFETIME + Duration::from_secs(1);
    let mut checkouts = 0;
    while Instant::now() < until {
        assert_eq!(current_user(&pool).await.unwrap(), "orders-api");
        checkouts += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = connector.cache().get().await.unwrap();
    assert!(now.expires_on() > first.expires_on(), "a newer token");
    assert!(
        emulator.logins().iter().all(|l| l.outcome.is_ok()),
        "no login presented an expired or unusable token"
    );
    assert!(emulator.logins().len() > 5, "connections were replaced");
    println!("{checkouts} checkouts, {} logins", emulator.logins().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_user_takes_the_role_from_the_connector_and_plaintext_is_refused() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool =
        postgres_entra_sqlx::connect(&url(&emulator), &connector(&emulator), PoolOptions::new())
            .await
            .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-api");
    let ssl: (bool,) = sqlx::query_as("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert!(ssl.0, "over TLS");

    let error = postgres_entra_sqlx::connect(
        &format!("{}?sslmode=disable", url(&emulator)),
        &connector_builder(&emulator).build().unwrap(),
        PoolOptions::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error}");
    assert!(error.to_string().contains("clear text"), "{error}");
}

/// A connector for the emulator's managed identity, naming no role: the settings' user, else the
/// token's name (`orders-mi`), decides.
fn managed_identity_connector(emulator: &Suite) -> EntraConnector {
    EntraConnector::builder(postgres_entra::AzureTokenSource::new(
        emulator.managed_identity_credential().unwrap(),
    ))
    .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_named_by_the_url_or_options_is_the_role_and_sqlx_defaults_are_not() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let connector = managed_identity_connector(&emulator);
    let base = url(&emulator);
    let (host, port) = (emulator.host(), emulator.port());

    // Named as `?user=`: that role, so a role this identity is not mapped to is refused (sqlx
    // takes `?user=` as the user just as it takes `user@`).
    for url in [
        format!("{base}?user=nobody-mi"),
        format!("postgres://nobody-mi@{host}:{port}/postgres"),
    ] {
        let error = postgres_entra_sqlx::connect(&url, &connector, PoolOptions::new())
            .await
            .unwrap_err();
        let Error::LoginRejected(rejected) = &error else {
            panic!("{url}: expected a refused login, got {error}");
        };
        assert_eq!(rejected.role(), "nobody-mi", "{url}");
    }
    let refused = emulator.logins();
    assert!(
        refused
            .iter()
            .all(|l| l.role == "nobody-mi" && l.outcome == Err(Rejection::UnknownRole)),
        "{refused:?}"
    );

    // Not named: the identity's own role, from the token. `PgConnectOptions::new()` fills in the
    // operating system's user; that is not a configured role.
    let pool = postgres_entra_sqlx::connect(&base, &connector, PoolOptions::new())
        .await
        .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-mi");
    let defaults = PgConnectOptions::new_without_pgpass()
        .host(host)
        .port(port)
        .database(emulator.database());
    let pool = postgres_entra_sqlx::connect_with(
        defaults,
        PgPoolOptions::new(),
        &connector,
        PoolOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-mi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_log_in_never_leaves_an_expired_one_in_the_options() {
    let emulator = Arc::new(Suite::start(Duration::from_secs(3600)).await);
    // The first token is a user's, good for 3 s; every later one carries no name (its role cannot
    // be told), so it cannot replace the first.
    let calls = Arc::new(AtomicUsize::new(0));
    let (minter, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new("then-nameless", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let (token, life) = if n == 0 {
            let token = minter
                .issue_token(&minter.user(), TokenOptions::default())
                .unwrap();
            (token, Duration::from_secs(3))
        } else {
            ("nameless.not-a-jwt.x".to_owned(), Duration::from_secs(3600))
        };
        async move { Ok(AccessToken::new(token, SystemTime::now() + life)) }
    });
    let connector = EntraConnector::builder(source)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new()
            .max_lifetime(Duration::from_millis(200))
            .acquire_timeout(Duration::from_secs(2)),
        &connector,
        PoolOptions::new(),
    )
    .await
    .unwrap();

    // Past the first token's life: connects go on, and none presents it.
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    while Instant::now() < until {
        if let Err(error) = current_user(&pool).await {
            last = Some(error);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(calls.load(Ordering::SeqCst) >= 2, "the second token came");
    assert!(
        emulator
            .logins()
            .iter()
            .all(|l| l.outcome != Err(Rejection::Expired)),
        "an expired token was presented: {:?}",
        emulator.logins()
    );
    let error = last.expect("connects failed once the first token ran out");
    let why = pool.explain(&error).expect("typed");
    assert!(matches!(why, Error::Config { .. }), "{why}");
    assert!(why.to_string().contains("no role name"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_connect_fails_saying_so_and_explain_names_the_cause() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = postgres_entra_sqlx::connect_lazy_with(
        options(&emulator),
        PgPoolOptions::new().acquire_timeout(Duration::from_secs(2)),
        &wrong_secret_connector(&emulator),
        PoolOptions::new(),
    )
    .unwrap();

    let error = pool.acquire().await.unwrap_err();

    // sqlx's own error says it: not "No such file or directory".
    let text = error.to_string();
    assert!(!text.contains("os error"), "{text}");
    assert!(
        text.contains("postgres-entra: no new connection for pool"),
        "{text}"
    );
    assert!(text.contains("HTTP 401"), "{text}");
    let why = pool.explain(&error).expect("typed");
    assert!(matches!(why, Error::Token(_)), "{why}");
    assert!(emulator.logins().is_empty());

    // A provider that has not answered yet: explain says a request is in flight.
    let slow = Suite::start(Duration::from_secs(3600)).await;
    slow.set_latency(Endpoint::Token, Duration::from_secs(5));
    let pool = postgres_entra_sqlx::connect_lazy_with(
        options(&slow),
        PgPoolOptions::new().acquire_timeout(Duration::from_millis(500)),
        &connector(&slow),
        PoolOptions::new(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let error = pool.acquire().await.unwrap_err();
    let why = pool.explain(&error).expect("typed while the fetch runs");
    assert!(why.to_string().contains("not been answered yet"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_and_its_tokens_are_recorded_as_metrics() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let (reader, connector) = metered_connector(&emulator);
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_connections(3),
        &connector,
        PoolOptions::new().pool_name("orders"),
    )
    .await
    .unwrap();
    let held = pool.acquire().await.unwrap();

    let metrics = reader.collect();
    let orders = [("db.client.connection.pool.name", "orders")];
    let state = |state| {
        [
            ("db.client.connection.pool.name", "orders"),
            ("db.client.connection.state", state),
        ]
    };
    assert_eq!(
        metrics.value("db.client.connection.max", &orders),
        Some(3.0)
    );
    assert_eq!(
        metrics.value("db.client.connection.count", &state("used")),
        Some(1.0),
        "{}",
        metrics.text()
    );
    assert_eq!(
        metrics.sum(
            "postgres_entra.token.refreshes",
            &[("postgres_entra.outcome", "success")]
        ),
        1.0
    );
    drop(held);
    drop(pool);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        reader.collect().value("db.client.connection.max", &orders),
        None,
        "a dropped pool is no longer observed"
    );
}
