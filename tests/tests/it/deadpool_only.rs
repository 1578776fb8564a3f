//! What only deadpool has: the user's own recycling method, which the adapter must keep; its pool
//! builder's `customize`; the reaper this adapter runs beside deadpool's lock.

use deadpool_postgres::{ManagerConfig, RecyclingMethod};
use postgres_entra_deadpool::{SessionOptions, create_pool};
use std::time::Duration;

use crate::pools::{Deadpool, PoolSpec};
use crate::{Suite, connector};

/// The user's recycling method, which sets the application name.
fn renaming() -> ManagerConfig {
    ManagerConfig {
        recycling_method: RecyclingMethod::Custom(
            "SET application_name = 'recycled by the user''s method'".into(),
        ),
    }
}

/// The application name of a first connection, and of the same connection once recycled.
async fn names_before_and_after_recycling(pool: &postgres_entra_deadpool::Pool) -> [String; 2] {
    let mut names = Vec::new();
    for _ in 0..2 {
        let connection = pool.get().await.unwrap();
        let row = connection.query_one("show application_name", &[]).await;
        names.push(row.unwrap().get(0));
    }
    names.try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_recycling_method_still_runs() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut config = Deadpool::user_config(&PoolSpec::new(&emulator, connector(&emulator)).size(1));
    config.manager = Some(renaming());
    let pool = create_pool(&config, &connector(&emulator), SessionOptions::new()).unwrap();

    let [first, recycled] = names_before_and_after_recycling(&pool).await;

    assert_ne!(first, "recycled by the user's method");
    assert_eq!(recycled, "recycled by the user's method");
    assert_eq!(emulator.logins().len(), 1, "the same connection, recycled");
}

/// deadpool-postgres's other way in: a manager from a `tokio_postgres::Config` and a
/// `ManagerConfig`, and deadpool's pool builder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_from_config_logs_in_and_keeps_the_users_recycling_method() {
    use postgres_entra_deadpool::{Manager, Pool};
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let manager = Manager::from_config(
        emulator.server_config(),
        &connector(&emulator),
        renaming(),
        SessionOptions::new(),
    )
    .unwrap();
    let pool = Pool::builder(manager).max_size(1).build().unwrap();

    let [first, recycled] = names_before_and_after_recycling(&pool).await;

    assert_ne!(first, "recycled by the user's method");
    assert_eq!(recycled, "recycled by the user's method");
    assert_eq!(emulator.logins().len(), 1, "the same connection, recycled");
    let login = &emulator.logins()[0];
    assert!(login.outcome.is_ok(), "{login:?}");

    // Checked as `create_pool` checks: no plaintext.
    let mut plaintext = emulator.server_config();
    plaintext.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let refused = Manager::from_config(
        plaintext,
        &connector(&emulator),
        ManagerConfig::default(),
        SessionOptions::new(),
    );
    assert!(
        matches!(refused, Err(postgres_entra::Error::Config { .. })),
        "{refused:?}"
    );
}

/// A create timeout set in `customize` (not in the config) bounds the login too: the checkout
/// fails with our typed error, not deadpool's own timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_timeout_set_in_customize_bounds_the_login() {
    use postgres_entra_deadpool::{PoolError, create_pool_with};
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    emulator.set_latency(
        postgres_entra_testkit::Endpoint::Token,
        Duration::from_secs(30),
    );
    let mut config = Deadpool::user_config(&PoolSpec::new(&emulator, connector(&emulator)).size(1));
    config.pool.as_mut().unwrap().timeouts.create = None;
    config.pool.as_mut().unwrap().timeouts.wait = None;
    let pool = create_pool_with(
        &config,
        &connector(&emulator),
        SessionOptions::new(),
        |builder| builder.create_timeout(Some(Duration::from_secs(2))),
    )
    .unwrap();

    let error = pool.get().await.unwrap_err();

    assert!(
        matches!(&error, PoolError::Backend(postgres_entra::Error::Token(_))),
        "{error:?}"
    );
}

/// A pool of two idle sessions reaped every 100 ms, logged in with `lifetime`-long tokens, whose
/// provider fails from then on (before its refresh at half the life however slow the machine):
/// once that token has expired, the sessions are kept, and the reaper says so.
async fn two_sessions_the_provider_cannot_renew(
    lifetime: Duration,
) -> (
    Suite,
    postgres_entra_deadpool::Pool,
    postgres_entra_testkit::TestConnector,
) {
    let emulator = Suite::start(lifetime).await;
    let mut config = Deadpool::user_config(&PoolSpec::new(&emulator, connector(&emulator)).size(2));
    // No recycling query: a checkout needs no network, only deadpool's lock.
    config.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    let options = SessionOptions::new().reap_interval(Duration::from_millis(100));
    let connector = connector(&emulator);
    let pool = create_pool(&config, &connector, options).unwrap();
    connector.cache().get().await.unwrap();
    emulator.set_fault(
        postgres_entra_testkit::Endpoint::Token,
        postgres_entra_testkit::Fault::ServerError,
    );
    drop((pool.get().await.unwrap(), pool.get().await.unwrap()));
    (emulator, pool, connector)
}

/// A log line stuck in a slow sink, written by the reaper, holds up no checkout: the reaper asks
/// whether sessions may go (and logs) before it takes deadpool's lock.
#[test]
fn a_stuck_log_sink_holds_up_no_checkout_while_the_reaper_keeps_sessions() {
    use std::sync::mpsc;
    // Long enough for the set-up's token and two logins on a loaded machine.
    const LIFETIME: Duration = Duration::from_secs(6);
    // Armed only after the set-up: a set-up slower than the token's life would otherwise have its
    // own threads held up (and wait for ever).
    let sink = postgres_entra_testkit::StuckSink::new("keeping sessions past their retirement");
    let runtime = sink.runtime(tracing::Level::INFO);
    let (emulator, pool, _) = runtime.block_on(two_sessions_the_provider_cannot_renew(LIFETIME));
    sink.arm();
    assert!(
        sink.wait_stuck(LIFETIME * 5),
        "the reaper said it keeps the sessions"
    );

    // A checkout from another thread, while the line is stuck.
    let (done_tx, done_rx) = mpsc::channel();
    let handle = runtime.handle().clone();
    let checkout = pool.clone();
    let other = std::thread::spawn(move || {
        let got = handle.block_on(async { checkout.get().await.map(drop) });
        let _ = done_tx.send(got.is_ok());
    });
    let answered = done_rx.recv_timeout(Duration::from_secs(10));
    sink.release();
    assert_eq!(
        answered,
        Ok(true),
        "a checkout waited for the reaper's log line"
    );
    other.join().unwrap();
    drop(pool);
    runtime.block_on(async move { drop(emulator) });
}

/// A log sink that panics on the reaper's line does not end the reaper: once the identity
/// provider answers again, the sessions it kept past their token are retired.
#[test]
fn a_panicking_log_sink_does_not_end_the_reaper() {
    const LIFETIME: Duration = Duration::from_secs(4);
    let runtime = postgres_entra_testkit::panicking_log_runtime(
        "keeping sessions past their retirement",
        tracing::Level::INFO,
    );
    runtime.block_on(async {
        let (emulator, pool, connector) = two_sessions_the_provider_cannot_renew(LIFETIME).await;

        // Past the token's expiry, with the provider failing: the sessions are kept, and the
        // reaper's line about it panics in the sink.
        let expired = tokio::time::Instant::now() + LIFETIME + Duration::from_secs(2);
        tokio::time::sleep_until(expired).await;
        assert!(connector.cache().stats().consecutive_failures > 0);
        assert_eq!(pool.status().size, 2, "the sessions were kept");

        emulator.clear_fault(postgres_entra_testkit::Endpoint::Token);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while pool.status().size > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reaper retired nothing once a token could be had: {:?}",
                pool.status()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
