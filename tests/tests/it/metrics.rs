//! Pool and token metrics of every adapter, read back through the SDK's in-memory exporter after
//! known checkouts against the emulator.

use std::time::Duration;

use crate::pools::Deadpool;
use crate::pools::{PoolSpec, PoolUnderTest};
use crate::{Suite, metered_connector};

const HOUR: Duration = Duration::from_secs(3600);
const CREATE_TIME: &str = "db.client.connection.create_time";
const COUNT: &str = "db.client.connection.count";
const POOL_NAME: &str = "db.client.connection.pool.name";

// Not sqlx: its pool has no hooks for checkout waits (see `sqlx_only` for its metrics).
for_pools!([deadpool, bb8] {
    pool_metrics_follow_connections_made_checkouts_waits_and_timeouts,
    a_pool_without_a_name_is_named_after_its_server,
});

async fn pool_metrics_follow_connections_made_checkouts_waits_and_timeouts<P: PoolUnderTest>() {
    let emulator = Suite::start(HOUR).await;
    let (reader, connector) = metered_connector(&emulator);
    let spec = PoolSpec::new(&emulator, connector)
        .size(4)
        .timeout(Duration::from_secs(1))
        .pool_name("orders");
    let pool = P::build(spec).await.unwrap();
    let orders = [(POOL_NAME, "orders")];
    let state = |state| [(POOL_NAME, "orders"), ("db.client.connection.state", state)];

    // The token first, so that no connect waits for it past the 1 s timeout on a busy machine.
    pool.token_cache().get().await.unwrap();
    // Four connections held at once: four made, four logins.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(pool.hold().await.unwrap());
    }
    let busy = reader.collect();
    let logins = emulator.logins().len() as u64;
    assert!(logins >= 4, "{logins} logins");
    assert_eq!(busy.count(CREATE_TIME, &orders), logins, "{}", busy.text());
    assert!(busy.sum(CREATE_TIME, &orders) > 0.0);
    assert_eq!(busy.value(COUNT, &state("used")), Some(4.0));
    assert_eq!(busy.value(COUNT, &state("idle")), Some(0.0));
    assert_eq!(busy.value("db.client.connection.max", &orders), Some(4.0));
    assert_eq!(
        busy.value("db.client.connection.pending_requests", &orders),
        Some(0.0)
    );

    // A fifth checkout waits, then times out.
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.hold().await.is_err() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = reader.collect();
    assert_eq!(
        waiting.value("db.client.connection.pending_requests", &orders),
        Some(1.0)
    );
    assert!(waiter.await.unwrap(), "the fifth checkout timed out");
    let timed_out = reader.collect();
    let timeouts = timed_out.value("db.client.connection.timeouts", &orders);
    if P::COUNTS_TIMEOUTS {
        assert_eq!(timeouts, Some(1.0));
    } else {
        assert_eq!(timeouts, None, "not observable, so not made up");
    }
    assert_eq!(
        timed_out.value("db.client.connection.pending_requests", &orders),
        Some(0.0)
    );

    // Returned: all idle, no new connection made.
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle = reader.collect();
    assert_eq!(idle.value(COUNT, &state("idle")), Some(4.0));
    assert_eq!(idle.value(COUNT, &state("used")), Some(0.0));
    assert_eq!(
        idle.count(CREATE_TIME, &orders),
        emulator.logins().len() as u64
    );

    // The token cache's metrics come along, from the same meter.
    assert_eq!(
        idle.sum(
            "postgres_entra.token.refreshes",
            &[("postgres_entra.outcome", "success")]
        ),
        1.0
    );
    for token in emulator.issued_tokens() {
        assert!(!idle.text().contains(&token), "a token leaked");
    }
}

async fn a_pool_without_a_name_is_named_after_its_server<P: PoolUnderTest>() {
    let emulator = Suite::start(HOUR).await;
    let (reader, connector) = metered_connector(&emulator);
    let spec = PoolSpec::new(&emulator, connector);
    let expected = format!("{}:{}/{}", spec.host, spec.port, spec.database);
    let pool = P::build(spec).await.unwrap();

    pool.query("select 1").await.unwrap();

    let metrics = reader.collect();
    let names: Vec<_> = metrics
        .points()
        .iter()
        .filter(|p| p.name.starts_with("db.client.connection."))
        .map(|p| p.attribute(POOL_NAME).unwrap_or("none"))
        .collect();
    assert!(!names.is_empty());
    assert!(names.iter().all(|n| *n == expected), "{names:?}");
}

/// Resident memory of this process, in bytes.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: i64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_and_dropping_pools_leaves_no_callback_or_memory_behind() {
    let emulator = Suite::start(HOUR).await;
    let (reader, connector) = metered_connector(&emulator);
    let config = Deadpool::user_config(&PoolSpec::new(&emulator, connector.clone()));
    let options = postgres_entra::SessionOptions::new()
        .token_bound(false)
        .pool_name("short-lived");
    let make = |n: usize| {
        for _ in 0..n {
            let pool =
                postgres_entra_deadpool::create_pool(&config, &connector, options.clone()).unwrap();
            drop(pool);
        }
    };
    // Warm up allocations, then measure 20,000 pools.
    make(1_000);
    reader.collect();
    let before = rss();
    make(20_000);
    let collected = reader.collect();
    let growth = rss() - before;

    figure!(
        "20,000 pools created and dropped: resident memory grew by {:.1} MiB",
        growth as f64 / (1024.0 * 1024.0)
    );
    // What is read from a pool stops with it; its counter of retirements, a cumulative series
    // exported from the pool's start (at 0), stays, one series per pool name, not per pool.
    let left: Vec<&str> = collected
        .points()
        .iter()
        .filter(|p| p.attribute(POOL_NAME) == Some("short-lived"))
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        left,
        ["postgres_entra.connection.retired"],
        "a dropped pool is no longer observed"
    );
    // Callbacks registered per pool would keep about 2 KiB each (40 MiB here).
    assert!(growth < 8 * 1024 * 1024, "grew by {growth} bytes");

    // bb8: observing a pool twice replaces the first observation, it does not add a second.
    let manager = postgres_entra_bb8::EntraConnectionManager::new(
        emulator.server_config(),
        &connector,
        postgres_entra::SessionOptions::new().pool_name("twice"),
    )
    .unwrap();
    let pool = ::bb8::Pool::builder()
        .max_size(3)
        .build_unchecked(manager.clone());
    let _first = manager.observe(&pool);
    let _second = manager.observe(&pool);
    let max = reader
        .collect()
        .value("db.client.connection.max", &[(POOL_NAME, "twice")]);
    assert_eq!(max, Some(3.0));
}
