//! 256 tasks against a pool of 16 for 30 s across several token lifetimes: no deadlock, no
//! leaked connections, memory stable.

use bb8::Pool;
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_deadpool::{PoolOptions, create_pool_with};
use postgres_entra_testkit::Endpoint;
use std::time::Duration;

use crate::deadpool_pool::{checkout, user_config};
use crate::{Load, Suite, captured_len, connector, hammer};

const LIFETIME: Duration = Duration::from_secs(6);
const PHASE: Duration = Duration::from_secs(15);

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

async fn server_connections(emulator: &Suite) -> i64 {
    let admin = emulator.admin_client().await.unwrap();
    admin
        .query_one(
            "select count(*) from pg_stat_activity where usename = 'orders-api'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Two phases of load; returns both outcomes and the memory growth of the second phase, less
/// what the TRACE capture itself grew by.
async fn two_phases<F, Fut>(checkout: F) -> (Load, Load, i64)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let first = hammer(256, PHASE, checkout.clone()).await;
    let (rss_before, capture_before) = (rss() as i64, captured_len() as i64);
    let second = hammer(256, PHASE, checkout).await;
    let growth = (rss() as i64 - rss_before) - (captured_len() as i64 - capture_before);
    (first, second, growth)
}

fn report(name: &str, first: &Load, second: &Load, growth: i64, emulator: &Suite) {
    println!(
        "{name}: {} + {} checkouts, {} failed, {} logins, {} token requests, memory growth in the second half {:.1} MiB",
        first.ok,
        second.ok,
        first.failed + second.failed,
        emulator.logins().len(),
        emulator.requests(Endpoint::Token),
        growth as f64 / (1024.0 * 1024.0)
    );
    assert_eq!(
        first.failed + second.failed,
        0,
        "first failure: {:?} {:?}",
        first.first_error,
        second.first_error
    );
    assert!(first.ok > 1000 && second.ok > 1000);
    assert!(
        growth < 32 * 1024 * 1024,
        "memory grew by {growth} bytes under steady load"
    );
    assert!(emulator.requests(Endpoint::Token) <= 2 * 30 / LIFETIME.as_secs() + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_256_tasks_on_16_connections_for_30_seconds() {
    let emulator = Suite::start(LIFETIME);
    let pool = create_pool_with(
        &user_config(&emulator, 16),
        connector(&emulator),
        PoolOptions::new().max_age(Duration::from_secs(2), Duration::from_millis(500)),
    )
    .unwrap();

    let p = pool.clone();
    let (first, second, growth) = two_phases(move || {
        let pool = p.clone();
        async move { checkout(&pool).await }
    })
    .await;

    report("deadpool", &first, &second, growth, &emulator);
    let status = pool.status();
    assert!(status.size <= 16);
    assert_eq!(
        status.available, status.size,
        "every connection came back to the pool"
    );
    assert_eq!(
        server_connections(&emulator).await,
        status.size as i64,
        "no connection leaked server-side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_256_tasks_on_16_connections_for_30_seconds() {
    let emulator = Suite::start(LIFETIME);
    let config = emulator.server_config();
    let pool = Pool::builder()
        .max_size(16)
        .max_lifetime(Some(Duration::from_secs(2)))
        .connection_timeout(Duration::from_secs(20))
        .build(EntraConnectionManager::new(config, connector(&emulator)).unwrap())
        .await
        .unwrap();

    let p = pool.clone();
    let (first, second, growth) = two_phases(move || {
        let pool = p.clone();
        async move {
            let client = pool.get().await.map_err(|e| format!("{e:?}"))?;
            client
                .simple_query("select 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
    })
    .await;

    report("bb8", &first, &second, growth, &emulator);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = pool.state();
    assert!(state.connections <= 16);
    assert_eq!(
        state.idle_connections, state.connections,
        "every connection came back to the pool"
    );
    assert_eq!(
        server_connections(&emulator).await,
        state.connections as i64,
        "no connection leaked server-side"
    );
}
