//! deadpool-postgres with Entra ID login: the user's `Config` and `Pool` type, unchanged.

use deadpool_postgres::{Config, ManagerConfig, PoolConfig, RecyclingMethod, Timeouts};
use postgres_entra_deadpool::{Error, PoolOptions, create_pool, entra_error, pool_builder};
use postgres_entra_testkit::{Emulator, Endpoint, Fault};
use std::time::Duration;

use crate::{
    Suite, chain, connector, expected_requests, hammer, outage_during_churn, restart_during_churn,
    wrong_secret_connector,
};
use std::sync::Arc;

/// The kind of `deadpool_postgres::Config` a user loads from env or serde.
pub(crate) fn user_config(emulator: &Emulator, max_size: usize) -> Config {
    let mut config = Config::new();
    config.host = Some(emulator.host().into());
    config.port = Some(emulator.port());
    config.dbname = Some(emulator.database().into());
    config.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Verified,
    });
    let mut pool = PoolConfig::new(max_size);
    pool.timeouts = Timeouts {
        wait: Some(Duration::from_secs(10)),
        create: Some(Duration::from_secs(10)),
        recycle: Some(Duration::from_secs(5)),
    };
    config.pool = Some(pool);
    config
}

pub(crate) async fn checkout(pool: &deadpool_postgres::Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| chain(&e))?;
    let row = client
        .query_one("select current_user", &[])
        .await
        .map_err(|e| e.to_string())?;
    let user: String = row.get(0);
    if user == "orders-api" {
        Ok(())
    } else {
        Err(format!("logged in as {user}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tasks_on_a_pool_of_eight_across_token_lifetimes_never_fail() {
    const LIFETIME: Duration = Duration::from_secs(3);
    const RUN: Duration = Duration::from_secs(10);
    let emulator = Suite::start(LIFETIME);
    let pool = pool_builder(
        &user_config(&emulator, 8),
        connector(&emulator),
        PoolOptions::new().max_age(Duration::from_millis(800), Duration::from_millis(200)),
    )
    .unwrap()
    .build()
    .unwrap();

    let pool2 = pool.clone();
    let load = hammer(32, RUN, move || {
        let pool = pool2.clone();
        async move { checkout(&pool).await }
    })
    .await;

    let requests = emulator.requests(Endpoint::Token);
    let logins = emulator.logins().len() as u64;
    println!(
        "deadpool: {} checkouts, {} logins, {requests} token requests",
        load.ok, logins
    );
    assert_eq!(load.failed, 0, "first failure: {:?}", load.first_error);
    assert!(load.ok > 500, "{} checkouts", load.ok);
    assert!(
        logins > 3 * 8,
        "connections were retired and replaced: {logins} logins"
    );
    assert!(
        expected_requests(RUN, LIFETIME).contains(&requests),
        "{requests} token requests"
    );
    assert!(
        emulator.logins().iter().all(|l| l.outcome.is_ok()),
        "never an expired token"
    );
    assert!(pool.status().size <= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_thirty_two_checkouts_makes_one_token_request() {
    let emulator = Suite::start(Duration::from_secs(3600));
    emulator.set_latency(Endpoint::Token, Duration::from_millis(300));
    let pool = create_pool(&user_config(&emulator, 32), connector(&emulator)).unwrap();

    let checkouts: Vec<_> = (0..32)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get().await.map_err(|e| chain(&e)) })
        })
        .collect();
    let mut clients = Vec::new();
    for checkout in checkouts {
        clients.push(checkout.await.unwrap().unwrap());
    }

    assert_eq!(clients.len(), 32);
    assert_eq!(emulator.requests(Endpoint::Token), 1);
    assert_eq!(emulator.logins().len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_their_maximum_age_are_retired_on_recycle() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let pool = postgres_entra_deadpool::create_pool_with(
        &user_config(&emulator, 1),
        connector(&emulator),
        PoolOptions::new().max_age(Duration::from_millis(500), Duration::ZERO),
    )
    .unwrap();
    let backend_pid = || async {
        let client = pool.get().await.unwrap();
        client
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };

    let first = backend_pid().await;
    assert_eq!(backend_pid().await, first, "a young connection is reused");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = backend_pid().await;

    assert_ne!(second, first, "the old connection was retired");
    assert_eq!(emulator.logins().len(), 2);
    assert_eq!(
        emulator.requests(Endpoint::Token),
        1,
        "the new connection reused the cached token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_provider_outage_shorter_than_the_token_life_fails_no_checkout() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let emulator = Suite::start(LIFETIME);
    let pool = pool_builder(
        &user_config(&emulator, 8),
        connector(&emulator),
        PoolOptions::new().max_age(Duration::from_millis(500), Duration::from_millis(100)),
    )
    .unwrap()
    .build()
    .unwrap();
    checkout(&pool).await.unwrap();
    let churn = pool.clone();
    outage_during_churn(&emulator, Fault::ServerError, move || {
        let pool = churn.clone();
        async move { checkout(&pool).await }
    })
    .await;
    // After the outage the cache recovers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    checkout(&pool).await.unwrap();
    assert!(emulator.tokens_issued(Endpoint::Token) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_recovers_when_the_server_restarts_mid_run() {
    let emulator = Arc::new(Suite::start(Duration::from_secs(3600)));
    let pool = create_pool(&user_config(&emulator, 8), connector(&emulator)).unwrap();

    restart_during_churn(&emulator, move || {
        let pool = pool.clone();
        async move { checkout(&pool).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_failure_reaches_the_caller_as_our_typed_error() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let connector = wrong_secret_connector(&emulator);
    let pool = create_pool(&user_config(&emulator, 2), connector).unwrap();

    let error = pool.get().await.unwrap_err();

    match entra_error(&error) {
        Some(Error::Token(token_error)) => {
            assert!(
                token_error.message().contains("AADSTS7000215"),
                "{token_error}"
            );
        }
        other => panic!("expected our token error, got {other:?} from {error:?}"),
    }
    let reported = chain(&error);
    assert!(
        reported.contains("no valid Entra ID access token"),
        "{reported}"
    );
    assert!(reported.contains("AADSTS7000215"), "{reported}");
    assert!(emulator.logins().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_recycling_method_still_runs() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let mut config = user_config(&emulator, 1);
    config.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Custom(
            "SET application_name = 'recycled by the user''s method'".into(),
        ),
    });
    let pool = create_pool(&config, connector(&emulator)).unwrap();

    let first = pool.get().await.unwrap();
    let name: String = first
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(name, "recycled by the user's method");
    drop(first);
    let recycled = pool.get().await.unwrap();
    let name: String = recycled
        .query_one("show application_name", &[])
        .await
        .unwrap()
        .get(0);

    assert_eq!(name, "recycled by the user's method");
    assert_eq!(emulator.logins().len(), 1, "the same connection, recycled");
}
