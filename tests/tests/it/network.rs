//! Network failures between pool and server, through the testkit's relay: checkouts fail fast
//! and the pool heals.

use bb8::Pool;
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_testkit::Relay;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deadpool_pool::{checkout, user_config};
use crate::{Suite, connector, hammer};

const HOUR: Duration = Duration::from_secs(3600);

async fn relay_to(emulator: &Suite) -> Relay {
    Relay::start(([127, 0, 0, 1], emulator.port()).into())
        .await
        .unwrap()
}

fn deadpool_via(emulator: &Suite, relay: &Relay) -> deadpool_postgres::Pool {
    let mut config = user_config(emulator, 8);
    config.port = Some(relay.port());
    postgres_entra_deadpool::create_pool(&config, connector(emulator)).unwrap()
}

/// Runs `checkout` on 8 tasks for `run`, cutting the relay at `cut_at`; returns the longest a
/// failed checkout took and the failures in the last second.
async fn churn_through_a_cut<F, Fut>(
    relay: Arc<Relay>,
    run: Duration,
    cut_at: Duration,
    checkout: F,
) -> (u64, u64, Duration, u64)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let started = Instant::now();
    let slowest_failure = Arc::new(Mutex::new(Duration::ZERO));
    let late_failures = Arc::new(Mutex::new(0u64));
    let cutter = {
        let relay = relay.clone();
        tokio::spawn(async move {
            tokio::time::sleep(cut_at).await;
            relay.cut();
        })
    };
    let (slowest, late) = (slowest_failure.clone(), late_failures.clone());
    let checkout = Arc::new(checkout);
    let load = hammer(8, run, move || {
        let (slowest, late, checkout) = (slowest.clone(), late.clone(), checkout.clone());
        async move {
            let t = Instant::now();
            let result = checkout().await;
            if result.is_err() {
                let mut s = slowest.lock().unwrap();
                *s = (*s).max(t.elapsed());
                if started.elapsed() > run - Duration::from_secs(1) {
                    *late.lock().unwrap() += 1;
                }
            }
            result
        }
    })
    .await;
    cutter.await.unwrap();
    let slowest = *slowest_failure.lock().unwrap();
    let late = *late_failures.lock().unwrap();
    (load.ok, load.failed, slowest, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_checkouts_fail_fast_when_connections_are_cut_and_the_pool_heals() {
    let emulator = Suite::start(HOUR);
    let relay = Arc::new(relay_to(&emulator).await);
    let pool = deadpool_via(&emulator, &relay);

    let (ok, failed, slowest, late) = churn_through_a_cut(
        relay.clone(),
        Duration::from_secs(4),
        Duration::from_secs(1),
        move || {
            let pool = pool.clone();
            async move { checkout(&pool).await }
        },
    )
    .await;

    println!(
        "deadpool through a cut: {ok} ok, {failed} failed (slowest failure {slowest:?}), {late} failures in the last second"
    );
    assert!(ok > 100);
    assert!(
        slowest < Duration::from_secs(2),
        "failures were fast: {slowest:?}"
    );
    assert_eq!(late, 0, "the pool healed");
    assert!(
        relay.accepted() > 8,
        "new connections replaced the cut ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_checkouts_fail_fast_when_connections_are_cut_and_the_pool_heals() {
    let emulator = Suite::start(HOUR);
    let relay = Arc::new(relay_to(&emulator).await);
    // The relay's port instead of the server's.
    let mut config = tokio_postgres::Config::new();
    config
        .host(emulator.host())
        .port(relay.port())
        .dbname(emulator.database());
    let pool = Pool::builder()
        .max_size(8)
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(5))
        .build(EntraConnectionManager::new(config, connector(&emulator)).unwrap())
        .await
        .unwrap();

    let (ok, failed, slowest, late) = churn_through_a_cut(
        relay.clone(),
        Duration::from_secs(4),
        Duration::from_secs(1),
        move || {
            let pool = pool.clone();
            async move {
                let client = pool.get().await.map_err(|e| format!("{e:?}"))?;
                client
                    .simple_query("select 1")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        },
    )
    .await;

    println!(
        "bb8 through a cut: {ok} ok, {failed} failed (slowest failure {slowest:?}), {late} failures in the last second"
    );
    assert!(ok > 100);
    assert!(
        slowest < Duration::from_secs(2),
        "failures were fast: {slowest:?}"
    );
    assert_eq!(late, 0, "the pool healed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_network_fails_checkouts_within_the_pool_timeouts_and_heals() {
    let emulator = Suite::start(HOUR);
    let relay = relay_to(&emulator).await;
    let mut config = user_config(&emulator, 4);
    config.port = Some(relay.port());
    let timeouts = config.pool.as_mut().unwrap();
    timeouts.timeouts.wait = Some(Duration::from_secs(2));
    timeouts.timeouts.create = Some(Duration::from_secs(2));
    timeouts.timeouts.recycle = Some(Duration::from_secs(1));
    let pool = postgres_entra_deadpool::create_pool(&config, connector(&emulator)).unwrap();
    checkout(&pool).await.unwrap();

    relay.set_stalled(true);
    let started = Instant::now();
    let error = checkout(&pool).await.unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(6),
        "a stalled checkout ends with the pool's timeouts, not a hang: {waited:?}"
    );
    println!("stalled checkout failed after {waited:?}: {error}");

    relay.set_stalled(false);
    let healed = Instant::now();
    while checkout(&pool).await.is_err() {
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "the pool did not heal"
        );
    }
    for _ in 0..20 {
        checkout(&pool).await.unwrap();
    }
}
