//! What only the sqlx adapter has: a pool handle that owns the task keeping its connect options
//! current, and a URL as the one call.

use postgres_entra_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::{Duration, Instant};

use crate::{Suite, connector, connector_builder};

/// Waits (bounded) until the refresh task has ended.
async fn ended(refresher: &postgres_entra_sqlx::Refresher) -> bool {
    let started = Instant::now();
    while !refresher.is_finished() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refresher.is_finished()
}

fn options(emulator: &Suite) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(emulator.host())
        .port(emulator.port())
        .database(emulator.database())
        .username("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_task_ends_when_the_pool_is_closed_or_dropped() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;

    let closed = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new(),
        connector(&emulator),
    )
    .await
    .unwrap();
    let refresher = closed.refresher();
    assert!(closed.is_refreshing());
    closed.close().await;
    assert!(ended(&refresher).await, "closing ends it");

    let dropped = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new(),
        connector(&emulator),
    )
    .await
    .unwrap();
    let (refresher, clone) = (dropped.refresher(), dropped.clone());
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!refresher.is_finished(), "a clone still holds the pool");
    drop(clone);
    assert!(ended(&refresher).await, "dropping the last handle ends it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tokens_reach_the_connect_options_before_the_old_ones_lapse() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let emulator = Suite::start(LIFETIME).await;
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_lifetime(Duration::from_millis(300)),
        connector(&emulator),
    )
    .await
    .unwrap();
    let first = pool.connector().cache().get().await.unwrap();

    // Past the first token's refresh point and its usable life: every connect since used a
    // newer token, which the server accepted.
    let until = Instant::now() + LIFETIME + Duration::from_secs(1);
    let mut checkouts = 0;
    while Instant::now() < until {
        let user: (String,) = sqlx::query_as("select current_user::text")
            .fetch_one(&*pool)
            .await
            .unwrap();
        assert_eq!(user.0, "orders-api");
        checkouts += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = pool.connector().cache().get().await.unwrap();
    assert!(now.expires_on() > first.expires_on(), "a newer token");
    assert!(
        emulator.logins().iter().all(|l| l.outcome.is_ok()),
        "no login presented an expired or unusable token"
    );
    assert!(emulator.logins().len() > 5, "connections were replaced");
    assert!(pool.last_error().is_none());
    println!("{checkouts} checkouts, {} logins", emulator.logins().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_user_takes_the_role_from_the_connector_and_plaintext_is_refused() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let url = format!(
        "postgres://{}:{}/{}",
        emulator.host(),
        emulator.port(),
        emulator.database()
    );
    let pool = postgres_entra_sqlx::connect(&url, connector(&emulator))
        .await
        .unwrap();
    let user: (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(user.0, "orders-api");
    let ssl: (bool,) = sqlx::query_as("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert!(ssl.0, "over TLS");

    let error = postgres_entra_sqlx::connect(
        &format!("{url}?sslmode=disable"),
        connector_builder(&emulator).build().unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            postgres_entra_sqlx::Error::Entra(postgres_entra::Error::Config { .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("clear text"), "{error}");
}
