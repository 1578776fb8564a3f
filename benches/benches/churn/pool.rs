//! Pool churn: a checkout and `select 1` from deadpool, bb8, sqlx and diesel-async (deadpool) pools
//! whose connections retire
//! every 50 ms, so that a good share of checkouts open a new connection: with a static password
//! and with tokens from the cache, in the same run; and with tokens, metrics on (an
//! OpenTelemetry SDK provider) against metrics off (no provider: the API's no-op meter), and
//! sessions bounded by their login token (the default) against unbounded ones.

use criterion::{BenchmarkId, Criterion};
use postgres_entra::{EntraConnector, SessionOptions};
use postgres_entra_bb8::{EntraConnectionManager, PoolObservation};
use postgres_entra_deadpool::create_pool;
use postgres_entra_diesel::diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig,
};
use postgres_entra_diesel::diesel_async::{AsyncPgConnection, RunQueryDsl};
use postgres_entra_diesel::{DeadpoolPool, EntraDiesel, deadpool, diesel};
use postgres_entra_testkit::MetricsReader;
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::support::harness::{BASELINE, Bench, STATIC_PASSWORD, STATIC_ROLE};
use crate::support::recorder::Recorder;

pub(crate) const POOL_MAX_AGE: Duration = Duration::from_millis(50);
const DEADPOOL: &str = "deadpool checkout + select 1 (max age 50 ms)";
const BB8: &str = "bb8 checkout + select 1 (max lifetime 50 ms)";
const SQLX: &str = "sqlx checkout + select 1 (max lifetime 50 ms)";
const SQLX_HELD: &str = "sqlx select 1 on a held connection";
const DIESEL: &str = "diesel-async deadpool checkout + select 1 (max age 50 ms)";
const DEADPOOL_METRICS: &str = "deadpool checkout + select 1 (max age 50 ms), metrics";
const BB8_METRICS: &str = "bb8 checkout + select 1 (max lifetime 50 ms), metrics";
const METRICS_OFF: &str = "cached token, metrics off";
const DEADPOOL_BOUND: &str = "deadpool checkout + select 1 (max age 50 ms), token bound";
const BB8_BOUND: &str = "bb8 checkout + select 1 (max lifetime 50 ms), token bound";
const BOUND_OFF: &str = "cached token, bound off";
const BOUND_ON: &str = "cached token, bound on (default)";
const METRICS_ON: &str = "cached token, metrics on";

/// Each library with a static password and with tokens, and with tokens and metrics.
pub(crate) struct Pools {
    deadpool_static: deadpool_postgres::Pool,
    deadpool_token: postgres_entra_deadpool::Pool,
    deadpool_metered: postgres_entra_deadpool::Pool,
    deadpool_unbound: postgres_entra_deadpool::Pool,
    bb8_static: bb8::Pool<bb8_postgres::PostgresConnectionManager<MakeRustlsConnect>>,
    bb8_token: bb8::Pool<EntraConnectionManager>,
    bb8_metered: bb8::Pool<EntraConnectionManager>,
    bb8_unbound: bb8::Pool<EntraConnectionManager>,
    sqlx_static: sqlx::PgPool,
    sqlx_token: postgres_entra_sqlx::EntraPgPool,
    /// One connection of each sqlx strategy, held: sqlx's own TLS to the server, and the
    /// adapter's relay (a Unix socket to this process, its TLS to the server).
    sqlx_static_held: Held,
    sqlx_token_held: Held,
    diesel_static: DeadpoolPool,
    diesel_token: DeadpoolPool,
    _bb8_observed: PoolObservation,
    metrics: MetricsReader,
}

async fn select_1(client: &tokio_postgres::Client) {
    client.simple_query("select 1").await.unwrap();
}

async fn checkout_deadpool(pool: &deadpool_postgres::Pool) {
    select_1(&pool.get().await.unwrap()).await;
}

async fn checkout_entra_deadpool(pool: &postgres_entra_deadpool::Pool) {
    select_1(&pool.get().await.unwrap()).await;
}

/// The static-password pool's retirement at the same age as the token pools' (deadpool has no
/// maximum lifetime): a `pre_recycle` hook, as a deadpool-postgres user writes it.
fn max_age(limit: Duration, jitter: Duration) -> deadpool_postgres::Hook {
    use std::hash::BuildHasher;
    let hasher = std::collections::hash_map::RandomState::new();
    deadpool_postgres::Hook::sync_fn(move |_client, metrics| {
        let fraction = (hasher.hash_one(metrics.created) % 10_000) as f64 / 10_000.0;
        if metrics.age() >= limit - jitter.mul_f64(fraction) {
            Err(deadpool_postgres::HookError::message("too old"))
        } else {
            Ok(())
        }
    })
}

async fn checkout_diesel(pool: &DeadpoolPool) {
    let mut connection = pool.get().await.unwrap();
    diesel::sql_query("select 1")
        .execute(&mut connection)
        .await
        .unwrap();
}

/// diesel-async's deadpool pool with a static password, over TLS as diesel-async's own example
/// sets it up (a tokio-postgres connection handed to `try_from_client_and_connection`), its
/// connections retired at the same age as the token pool's.
fn diesel_static(bench: &Bench) -> DeadpoolPool {
    let (config, tls) = (bench.static_config.clone(), bench.tls.clone());
    let mut manager = ManagerConfig::<AsyncPgConnection>::default();
    manager.custom_setup = Box::new(move |_url| {
        let (config, tls) = (config.clone(), tls.clone());
        Box::pin(async move {
            let (client, connection) = config
                .connect(tls)
                .await
                .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        })
    });
    let manager = AsyncDieselConnectionManager::new_with_config("postgres://static", manager);
    let (limit, jitter) = (POOL_MAX_AGE, POOL_MAX_AGE / 5);
    let hasher = std::collections::hash_map::RandomState::new();
    DeadpoolPool::builder(manager)
        .max_size(4)
        .runtime(deadpool::Runtime::Tokio1)
        .pre_recycle(deadpool::managed::Hook::sync_fn(move |_, metrics| {
            use std::hash::BuildHasher;
            let fraction = (hasher.hash_one(metrics.created) % 10_000) as f64 / 10_000.0;
            if metrics.age() >= limit - jitter.mul_f64(fraction) {
                Err(deadpool::managed::HookError::Message("too old".into()))
            } else {
                Ok(())
            }
        }))
        .build()
        .unwrap()
}

pub(crate) async fn checkout_sqlx(pool: &sqlx::PgPool) {
    let mut connection = pool.acquire().await.unwrap();
    sqlx::query("select 1")
        .execute(&mut *connection)
        .await
        .unwrap();
}

/// A connection of `pool`, held for [`query_held`].
pub(crate) type Held = tokio::sync::Mutex<sqlx::pool::PoolConnection<sqlx::Postgres>>;

/// Takes a connection out of `pool` to hold: a connection checked out is never retired by the
/// pool's age limit.
pub(crate) fn held(bench: &Bench, pool: &sqlx::PgPool) -> Held {
    let pool = pool.clone();
    let connection = bench
        .runtime
        .block_on(async move { pool.acquire().await.unwrap() });
    tokio::sync::Mutex::new(connection)
}

/// `select 1` on a connection held out of a sqlx pool: the cost of a query alone.
pub(crate) async fn query_held(connection: &Held) {
    let mut connection = connection.lock().await;
    sqlx::query("select 1")
        .execute(&mut **connection)
        .await
        .unwrap();
}

/// A bb8 pool of either manager: `bb8-postgres`'s hands out `Client`s, ours `EntraClient`s
/// (which dereference to one).
async fn checkout_bb8<M>(pool: &bb8::Pool<M>)
where
    M: bb8::ManageConnection,
    M::Connection: std::borrow::Borrow<tokio_postgres::Client>,
    M::Error: std::fmt::Debug,
{
    use std::borrow::Borrow;
    let connection = pool.get().await.unwrap();
    select_1((*connection).borrow()).await;
}

impl Pools {
    pub(crate) fn new(bench: &Bench) -> Self {
        let _guard = bench.runtime.enter();
        let deadpool_config = |role: &str| {
            let mut config = deadpool_postgres::Config::new();
            config.host = Some(bench.emulator.host().into());
            config.port = Some(bench.emulator.port());
            config.dbname = Some(bench.emulator.database().into());
            config.user = Some(role.into());
            if role == STATIC_ROLE {
                config.password = Some(STATIC_PASSWORD.into());
            }
            config.pool = Some(deadpool_postgres::PoolConfig::new(4));
            config
        };
        let deadpool_static = deadpool_config(STATIC_ROLE)
            .builder(bench.tls.clone())
            .unwrap()
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .pre_recycle(max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5))
            .build()
            .unwrap();
        let deadpool_with = |connector: &EntraConnector, name: &str, bound| {
            create_pool(
                &deadpool_config("orders-api"),
                connector,
                SessionOptions::new()
                    .max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5)
                    .pool_name(name)
                    .token_bound(bound),
            )
            .unwrap()
        };
        let bound = true;
        // No meter provider is installed: the connector's meter is the API's no-op one.
        let deadpool_token = deadpool_with(&bench.connector, "deadpool", bound);
        let deadpool_unbound = deadpool_with(&bench.connector, "deadpool", false);
        let metrics = MetricsReader::new();
        let metered = bench
            .connector_builder()
            .meter(metrics.meter())
            .build()
            .unwrap();
        let deadpool_metered = deadpool_with(&metered, "deadpool", bound);
        fn bb8_builder<M: bb8::ManageConnection>() -> bb8::Builder<M> {
            bb8::Pool::builder()
                .max_size(4)
                .max_lifetime(Some(POOL_MAX_AGE))
        }
        let bb8_static = bench
            .runtime
            .block_on(
                bb8_builder().build(bb8_postgres::PostgresConnectionManager::new(
                    bench.static_config.clone(),
                    bench.tls.clone(),
                )),
            )
            .unwrap();
        let bb8_with = |connector: &EntraConnector, bound| {
            let manager = EntraConnectionManager::new(
                bench.token_config.clone(),
                connector,
                SessionOptions::new().pool_name("bb8").token_bound(bound),
            )
            .unwrap();
            let pool = bench
                .runtime
                .block_on(bb8_builder().build(manager.clone()))
                .unwrap();
            let observed = manager.observe(&pool);
            (pool, observed)
        };
        let (bb8_token, _no_op) = bb8_with(&bench.connector, bound);
        let (bb8_unbound, _no_op) = bb8_with(&bench.connector, false);
        let (bb8_metered, _bb8_observed) = bb8_with(&metered, bound);
        // sqlx: its own TLS (rustls, verify-full) against the emulator's CA, for both.
        let sqlx_options = || bench.sqlx_options();
        let sqlx_pool = || {
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .max_lifetime(POOL_MAX_AGE)
        };
        let sqlx_static = sqlx_pool().connect_lazy_with(
            sqlx_options()
                .username(STATIC_ROLE)
                .password(STATIC_PASSWORD),
        );
        let sqlx_token = postgres_entra_sqlx::connect_lazy_with(
            sqlx_options().username(""),
            sqlx_pool(),
            &bench.connector,
            SessionOptions::new(),
        )
        .unwrap();
        let (sqlx_static_held, sqlx_token_held) = (
            held(
                bench,
                &sqlx_pool().connect_lazy_with(
                    sqlx_options()
                        .username(STATIC_ROLE)
                        .password(STATIC_PASSWORD),
                ),
            ),
            held(
                bench,
                &postgres_entra_sqlx::connect_lazy_with(
                    sqlx_options().username(""),
                    sqlx::postgres::PgPoolOptions::new().max_connections(1),
                    &bench.connector,
                    SessionOptions::new(),
                )
                .unwrap(),
            ),
        );
        let diesel_static = diesel_static(bench);
        let entra = EntraDiesel::new(
            bench.token_config.clone(),
            &bench.connector,
            SessionOptions::new()
                .max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5)
                .pool_name("diesel"),
        )
        .unwrap();
        let diesel_token = DeadpoolPool::builder(entra.manager())
            .max_size(4)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .unwrap();
        Self {
            deadpool_static,
            deadpool_token,
            deadpool_metered,
            deadpool_unbound,
            bb8_static,
            bb8_token,
            bb8_metered,
            bb8_unbound,
            sqlx_static,
            sqlx_token,
            sqlx_static_held,
            sqlx_token_held,
            diesel_static,
            diesel_token,
            _bb8_observed,
            metrics,
        }
    }

    /// Closes the sqlx pools (waiting for them) and drops the others, so that the pools'
    /// background work (reapers, sqlx's maintenance and refresh tasks) is not left running
    /// beside the token-cache benchmarks.
    pub(crate) fn close(self, bench: &Bench) {
        let _runtime = bench.runtime.enter();
        bench.runtime.block_on(async {
            self.sqlx_static.close().await;
            self.sqlx_token.close().await;
            self.diesel_static.close();
            self.diesel_token.close();
        });
        drop(self);
    }
}

/// Criterion's own measurement of each pool and strategy.
pub(crate) fn criterion(c: &mut Criterion, bench: &Bench, pools: &Pools) {
    let mut group = c.benchmark_group("pool");
    group.bench_function(BenchmarkId::new("deadpool", BASELINE), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_deadpool(&pools.deadpool_static)))
    });
    group.bench_function(BenchmarkId::new("deadpool", "cached token"), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_entra_deadpool(&pools.deadpool_token)))
    });
    group.bench_function(BenchmarkId::new("bb8", BASELINE), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_bb8(&pools.bb8_static)))
    });
    group.bench_function(BenchmarkId::new("bb8", "cached token"), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_bb8(&pools.bb8_token)))
    });
    group.bench_function(BenchmarkId::new("sqlx", BASELINE), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_sqlx(&pools.sqlx_static)))
    });
    group.bench_function(BenchmarkId::new("sqlx", "cached token"), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_sqlx(&pools.sqlx_token)))
    });
    group.bench_function(BenchmarkId::new("diesel", BASELINE), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_diesel(&pools.diesel_static)))
    });
    group.bench_function(BenchmarkId::new("diesel", "cached token"), |b| {
        b.iter_custom(|iters| bench.timed(iters, || checkout_diesel(&pools.diesel_token)))
    });
    group.finish();
}

/// The summary's pool rows: tokens alternating with the static-password pool of the same
/// library. `scale` shrinks the rounds for `--quick`.
pub(crate) fn paired(bench: &Bench, pools: &Pools, scale: usize) {
    // 60 rounds of 250 checkouts a side: with 20, the bb8 row's ratio moved by ±5% between
    // measurements on a shared 2-core machine (0.960 to 1.066 in five back-to-back ones, and the
    // same spread with the two pools' places swapped), more than the target's margin.
    let rounds = (60 / scale).max(2);
    bench.paired(
        DEADPOOL,
        (BASELINE, || checkout_deadpool(&pools.deadpool_static)),
        ("cached token", || {
            checkout_entra_deadpool(&pools.deadpool_token)
        }),
        rounds,
        250,
    );
    bench.paired(
        BB8,
        (BASELINE, || checkout_bb8(&pools.bb8_static)),
        ("cached token", || checkout_bb8(&pools.bb8_token)),
        rounds,
        250,
    );
    // sqlx's own connects (the baseline) and the relay's both set TCP_NODELAY (sqlx 0.9.1;
    // 0.9.0 did not, transact-rs/sqlx#4335, and its logins waited out delayed ACKs).
    bench.paired(
        SQLX,
        (BASELINE, || checkout_sqlx(&pools.sqlx_static)),
        ("cached token", || checkout_sqlx(&pools.sqlx_token)),
        rounds,
        250,
    );
    // What the relay costs once connected: a query on a held connection, sqlx's own TLS to the
    // server against the relay's Unix socket and its TLS.
    bench.paired(
        SQLX_HELD,
        (BASELINE, || query_held(&pools.sqlx_static_held)),
        ("cached token (relay)", || {
            query_held(&pools.sqlx_token_held)
        }),
        rounds,
        250,
    );
    bench.paired(
        DIESEL,
        (BASELINE, || checkout_diesel(&pools.diesel_static)),
        ("cached token", || checkout_diesel(&pools.diesel_token)),
        rounds,
        250,
    );
    // Feature on against off, for ratios within a percent: the finest interleaving (one
    // checkout each, in ABBA order), so that the pools' background reconnects weigh on both
    // alike, and enough checkouts (50,000 each in a full run) for the medians to settle.
    let (rounds, chunk) = (rounds * 2500, 1);
    bench.paired(
        DEADPOOL_METRICS,
        (METRICS_OFF, || {
            checkout_entra_deadpool(&pools.deadpool_token)
        }),
        (METRICS_ON, || {
            checkout_entra_deadpool(&pools.deadpool_metered)
        }),
        rounds,
        chunk,
    );
    bench.paired(
        BB8_METRICS,
        (METRICS_OFF, || checkout_bb8(&pools.bb8_token)),
        (METRICS_ON, || checkout_bb8(&pools.bb8_metered)),
        rounds,
        chunk,
    );
    bench.paired(
        DEADPOOL_BOUND,
        (BOUND_OFF, || {
            checkout_entra_deadpool(&pools.deadpool_unbound)
        }),
        (BOUND_ON, || checkout_entra_deadpool(&pools.deadpool_token)),
        rounds,
        chunk,
    );
    bench.paired(
        BB8_BOUND,
        (BOUND_OFF, || checkout_bb8(&pools.bb8_unbound)),
        (BOUND_ON, || checkout_bb8(&pools.bb8_token)),
        rounds,
        chunk,
    );
}

/// The metrics and token-bound targets, and what the metered pools recorded (so "on" is seen
/// to be on).
pub(crate) fn targets(recorder: &Recorder, pools: &Pools) -> Vec<String> {
    let ratio = |operation: &str, on: &str| recorder.median_ratio(operation, on);
    let met = |worst: f64, target: f64| if worst <= target { "met" } else { "missed" };
    let mut lines = Vec::new();
    if let (Some(deadpool), Some(bb8), Some(sqlx), Some(diesel)) = (
        ratio(DEADPOOL, "cached token"),
        ratio(BB8, "cached token"),
        ratio(SQLX, "cached token"),
        ratio(DIESEL, "cached token"),
    ) {
        lines.push(format!(
            "pool churn, cached token ÷ static password (median): deadpool {deadpool:.3}, bb8 {bb8:.3}, diesel-async {diesel:.3} (target ≤ 1.03: {}); sqlx, through the relay, {sqlx:.3} (no target: the relay's hop, decided in docs/design.md)",
            met(deadpool.max(bb8).max(diesel), 1.03)
        ));
    }
    if let Some(held) = ratio(SQLX_HELD, "cached token (relay)") {
        lines.push(format!(
            "sqlx query on a held connection, through the relay ÷ sqlx's own TLS (median): {held:.3} (the relay's cost per query)"
        ));
    }
    if let (Some(deadpool), Some(bb8)) =
        (ratio(DEADPOOL_BOUND, BOUND_ON), ratio(BB8_BOUND, BOUND_ON))
    {
        lines.push(format!(
            "pool churn, sessions bounded by their token on ÷ off (median): deadpool {deadpool:.3}, bb8 {bb8:.3} (target ≤ 1.01: {})",
            met(deadpool.max(bb8), 1.01)
        ));
    }
    let (Some(deadpool), Some(bb8)) = (
        ratio(DEADPOOL_METRICS, METRICS_ON),
        ratio(BB8_METRICS, METRICS_ON),
    ) else {
        return lines;
    };
    let collected = pools.metrics.collect();
    let created = |pool: &str| {
        collected.count(
            "db.client.connection.create_time",
            &[("db.client.connection.pool.name", pool)],
        )
    };
    lines.push(format!(
        "pool churn, metrics on ÷ off (median): deadpool {deadpool:.3}, bb8 {bb8:.3} (target ≤ 1.02: {}); with metrics on, the SDK recorded {} deadpool and {} bb8 connections made",
        met(deadpool.max(bb8), 1.02),
        created("deadpool"),
        created("bb8"),
    ));
    lines
}
