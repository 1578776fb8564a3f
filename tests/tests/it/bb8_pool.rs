//! bb8 with Entra ID login, with bb8's own lifetime and validation options.

use bb8::{Pool, RunError};
use postgres_entra_bb8::{EntraConnectionManager, Error, LastErrorSink};
use postgres_entra_testkit::{Emulator, Endpoint, Fault};
use std::time::Duration;

use crate::{
    Suite, connector, expected_requests, hammer, outage_during_churn, restart_during_churn,
    wrong_secret_connector,
};
use std::sync::Arc;

async fn pool(
    emulator: &Emulator,
    max_size: u32,
    max_lifetime: Option<Duration>,
) -> Pool<EntraConnectionManager> {
    Pool::builder()
        .max_size(max_size)
        .max_lifetime(max_lifetime)
        .connection_timeout(Duration::from_secs(10))
        .test_on_check_out(true)
        .build(EntraConnectionManager::new(emulator.server_config(), connector(emulator)).unwrap())
        .await
        .unwrap()
}

async fn checkout(pool: &Pool<EntraConnectionManager>) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| format!("{e:?}"))?;
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
    let pool = pool(&emulator, 8, Some(Duration::from_millis(800))).await;

    let pool2 = pool.clone();
    let load = hammer(32, RUN, move || {
        let pool = pool2.clone();
        async move { checkout(&pool).await }
    })
    .await;

    let requests = emulator.requests(Endpoint::Token);
    let logins = emulator.logins().len() as u64;
    println!(
        "bb8: {} checkouts, {logins} logins, {requests} token requests",
        load.ok
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
    assert!(pool.state().statistics.connections_closed_max_lifetime > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_thirty_two_checkouts_makes_one_token_request() {
    let emulator = Suite::start(Duration::from_secs(3600));
    emulator.set_latency(Endpoint::Token, Duration::from_millis(300));
    let pool = Pool::builder()
        .max_size(32)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .build(EntraConnectionManager::new(emulator.server_config(), connector(&emulator)).unwrap())
        .await
        .unwrap();

    let checkouts: Vec<_> = (0..32)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get_owned().await.map_err(|e| format!("{e:?}")) })
        })
        .collect();
    let mut clients = Vec::new();
    for checkout in checkouts {
        clients.push(checkout.await.unwrap().unwrap());
    }

    assert_eq!(clients.len(), 32);
    assert_eq!(emulator.requests(Endpoint::Token), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_lifetime_are_replaced() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let pool = pool(&emulator, 1, Some(Duration::from_millis(500))).await;
    let backend_pid = || async {
        let client = pool.get().await.unwrap();
        client
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };

    let first = backend_pid().await;
    assert_eq!(backend_pid().await, first);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = backend_pid().await; // returned past its lifetime: dropped on put-back
    let second = backend_pid().await;

    assert_ne!(second, first);
    assert_eq!(
        emulator.requests(Endpoint::Token),
        1,
        "the new connection reused the cached token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_provider_outage_shorter_than_the_token_life_fails_no_checkout() {
    let emulator = Suite::start(Duration::from_secs(8));
    let pool = pool(&emulator, 8, Some(Duration::from_millis(500))).await;
    checkout(&pool).await.unwrap();
    let churn = pool.clone();
    outage_during_churn(&emulator, Fault::DropConnection, move || {
        let pool = churn.clone();
        async move { checkout(&pool).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_recovers_when_the_server_restarts_mid_run() {
    let emulator = Arc::new(Suite::start(Duration::from_secs(3600)));
    let pool = pool(&emulator, 8, None).await;

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
    let manager = EntraConnectionManager::new(emulator.server_config(), connector).unwrap();

    // A connection opened directly reports our error as it is.
    let pool = Pool::builder().max_size(2).build_unchecked(manager.clone());
    match pool.dedicated_connection().await.unwrap_err() {
        Error::Token(token_error) => {
            assert!(
                token_error.message().contains("AADSTS7000215"),
                "{token_error}"
            );
            assert!(
                token_error
                    .to_string()
                    .contains("no valid Entra ID access token")
            );
        }
        other => panic!("expected our token error, got {other:?}"),
    }

    // With bb8's default retries, the caller sees a timeout and the sink says why.
    let sink = LastErrorSink::new();
    let pool = Pool::builder()
        .max_size(2)
        .connection_timeout(Duration::from_secs(2))
        .error_sink(Box::new(sink.clone()))
        .build_unchecked(manager);
    assert!(matches!(pool.get().await.unwrap_err(), RunError::TimedOut));
    let last = sink.last_error().expect("the sink saw the failure");
    assert!(
        matches!(&*last, Error::Token(e) if e.message().contains("AADSTS7000215")),
        "{last}"
    );
}
