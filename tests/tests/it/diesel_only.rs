//! What only the diesel adapter has to get right: a session is known by its connection, not by
//! the server process behind it (a pooler in front of the server hands one server process to many
//! client connections, so `pg_backend_pid()` tells them apart no more).

use postgres_entra::SessionOptions;
use postgres_entra_diesel::diesel_async::RunQueryDsl;
use postgres_entra_diesel::{DeadpoolPool, EntraDiesel, diesel};
use std::time::{Duration, Instant};

use crate::{Suite, connector};

/// The server process of `connection`, as pg_catalog knows it.
async fn real_pid(connection: &mut postgres_entra_diesel::diesel_async::AsyncPgConnection) -> i32 {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
        "pg_catalog.pg_backend_pid()",
    ))
    .get_result(connection)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_share_a_server_process_id_are_each_retired_by_their_own_token() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let emulator = Suite::start(LIFETIME).await;
    // Every session of the role reports process id 1, as behind a pooler: an unqualified
    // `pg_backend_pid()` resolves to a function of the role's search path in this database.
    emulator
        .admin_client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "create function public.pg_backend_pid() returns integer language sql as 'select 1'; \
             alter role \"orders-api\" in database \"{}\" set search_path = public, pg_catalog",
            emulator.database()
        ))
        .await
        .unwrap();
    let connector = connector(&emulator);
    let entra =
        EntraDiesel::new(emulator.server_config(), &connector, SessionOptions::new()).unwrap();
    let pool = DeadpoolPool::builder(entra.manager())
        .max_size(2)
        .build()
        .unwrap();

    // A logs in with the first token; B, once the cache has the second, with that one.
    let mut a = pool.get().await.unwrap();
    let first_expiry = connector.cache().get().await.unwrap().expires_on();
    let started = Instant::now();
    while connector.cache().stats().successes < 2 {
        assert!(started.elapsed() < LIFETIME * 2, "no second token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut b = pool.get().await.unwrap();
    let (pid_a, pid_b) = (real_pid(&mut a).await, real_pid(&mut b).await);
    assert_ne!(pid_a, pid_b);
    drop((a, b));

    // Past A's token (and its jitter), before B's: A is retired when recycled, B is kept.
    let until = first_expiry + LIFETIME / 10 + Duration::from_millis(200);
    if let Ok(wait) = until.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let (mut c, mut d) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    let now = [real_pid(&mut c).await, real_pid(&mut d).await];
    assert!(!now.contains(&pid_a), "A outlived its token: {now:?}");
    assert!(
        now.contains(&pid_b),
        "B was retired with A's token: {now:?}"
    );
}

/// The user's recycling method (diesel-async's `ManagerConfig::recycling_method`) runs on every
/// recycle, after the token's bound: a connection past it is retired without asking the user's
/// check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_recycling_method_runs_after_the_token_bound() {
    use postgres_entra_diesel::diesel_async::pooled_connection::RecyclingMethod;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const LIFETIME: Duration = Duration::from_secs(3);
    let emulator = Suite::start(LIFETIME).await;
    let entra = EntraDiesel::new(
        emulator.server_config(),
        &connector(&emulator),
        SessionOptions::new(),
    )
    .unwrap();
    let checks = Arc::new(AtomicUsize::new(0));
    let counted = checks.clone();
    let recycling = RecyclingMethod::CustomFunction(Box::new(move |connection| {
        counted.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            diesel::sql_query("select 1").execute(connection).await?;
            Ok(())
        })
    }));
    let pool = DeadpoolPool::builder(entra.manager_with(recycling))
        .max_size(1)
        .build()
        .unwrap();

    let mut first = pool.get().await.unwrap();
    let pid = real_pid(&mut first).await;
    drop(first);
    let mut recycled = pool.get().await.unwrap();
    assert_eq!(real_pid(&mut recycled).await, pid, "kept");
    assert_eq!(checks.load(Ordering::SeqCst), 1, "the user's check ran");
    drop(recycled);

    // Past the token (and its jitter): retired by the bound, the user's check not asked.
    tokio::time::sleep(LIFETIME + LIFETIME / 10 + Duration::from_millis(300)).await;
    let mut replaced = pool.get().await.unwrap();
    assert_ne!(real_pid(&mut replaced).await, pid, "retired");
    assert_eq!(checks.load(Ordering::SeqCst), 1);
    assert_eq!(emulator.logins().len(), 2);
}
