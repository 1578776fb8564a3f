//! The demo behind `make demo`: a deadpool pool and a bb8 pool, sharing one token cache, churn
//! connections (each retired after about a second) for 20 seconds across several short token
//! lifetimes, printing progress and then a summary: connections made, tokens fetched, failures,
//! checkout latency, and the pools' and tokens' OpenTelemetry metrics as a Prometheus scrape
//! would see them.
//!
//! Run against the local emulator:   make demo   (or cargo run -p postgres-entra-examples --example demo)
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_deadpool::{Hook, SessionOptions, create_pool_with};
use postgres_entra_examples::{
    BoxError, Target, install_prometheus_metrics, metrics_summary, prometheus_text,
};
use postgres_entra_testkit::Endpoint;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RUN: Duration = Duration::from_secs(20);
const TOKEN_LIFETIME: Duration = Duration::from_secs(5);
const TASKS_PER_POOL: usize = 16;
const POOL_SIZE: usize = 8;
const MAX_AGE: Duration = Duration::from_millis(1000);

/// Checkouts, failures and checkout latencies of one pool.
#[derive(Default)]
struct Tally {
    checkouts: AtomicU64,
    failures: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    first_failure: Mutex<Option<String>>,
}

impl Tally {
    fn percentile(&self, p: f64) -> Duration {
        let mut latencies = self.latencies.lock().unwrap().clone();
        latencies.sort();
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(index).copied().unwrap_or_default()
    }
}

/// Runs `select 1` on a checked-out `client`; returns how long the checkout, started at
/// `checkout_started`, took.
async fn select_1(
    client: &tokio_postgres::Client,
    checkout_started: Instant,
) -> Result<Duration, String> {
    let latency = checkout_started.elapsed();
    client
        .query_one("select 1", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(latency)
}

/// Runs `checkout` in a loop on several tasks until the run ends, timing each checkout.
fn churn<F, Fut>(
    tally: Arc<Tally>,
    started: Instant,
    checkout: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Duration, String>> + Send,
{
    (0..TASKS_PER_POOL)
        .map(|_| {
            let (tally, checkout) = (tally.clone(), checkout.clone());
            tokio::spawn(async move {
                while started.elapsed() < RUN {
                    match checkout().await {
                        Ok(latency) => {
                            tally.checkouts.fetch_add(1, Relaxed);
                            tally.latencies.lock().unwrap().push(latency);
                        }
                        Err(error) => {
                            tally.failures.fetch_add(1, Relaxed);
                            tally.first_failure.lock().unwrap().get_or_insert(error);
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!("postgres-entra demo: Entra ID token login for deadpool and bb8 pools");
    let started_up = Instant::now();
    // Metrics first: the connector built next records into the global meter provider.
    let registry = install_prometheus_metrics()?;
    let target = Target::from_env(TOKEN_LIFETIME)?;
    println!(
        "  target: {}  [ready in {:.1?}]",
        target.description,
        started_up.elapsed()
    );
    println!(
        "  two pools of {POOL_SIZE}, {TASKS_PER_POOL} tasks each, connections retired after ~{MAX_AGE:?}, for {RUN:?}\n"
    );

    let deadpool_created = Arc::new(AtomicU64::new(0));
    let created = deadpool_created.clone();
    let deadpool = create_pool_with(
        &target.deadpool_config(POOL_SIZE),
        &target.connector,
        SessionOptions::new()
            .max_age(MAX_AGE, MAX_AGE / 4)
            .pool_name("deadpool"),
        |builder| {
            builder.post_create(Hook::sync_fn(move |_, _| {
                created.fetch_add(1, Relaxed);
                Ok(())
            }))
        },
    )?;
    let bb8_manager = EntraConnectionManager::new(
        target.pg_config.clone(),
        &target.connector,
        SessionOptions::new()
            .max_age(MAX_AGE, MAX_AGE / 4)
            .pool_name("bb8"),
    )?;
    let bb8 = bb8::Pool::builder()
        .max_size(POOL_SIZE as u32)
        .connection_timeout(Duration::from_secs(20))
        .max_lifetime(None)
        .idle_timeout(None)
        .build(bb8_manager.clone())
        .await?;
    let _bb8_observed = bb8_manager.observe(&bb8);

    let started = Instant::now();
    let (dp_tally, bb_tally) = (Arc::new(Tally::default()), Arc::new(Tally::default()));
    let deadpool_pool = deadpool.clone();
    let mut tasks = churn(dp_tally.clone(), started, move || {
        let pool = deadpool_pool.clone();
        async move {
            let t = Instant::now();
            let client = pool.get().await.map_err(|e| e.to_string())?;
            select_1(&client, t).await
        }
    });
    let (bb8_pool, manager) = (bb8.clone(), bb8_manager.clone());
    tasks.extend(churn(bb_tally.clone(), started, move || {
        let (pool, manager) = (bb8_pool.clone(), manager.clone());
        async move {
            let t = Instant::now();
            let client = pool.get().await.map_err(|e| match manager.explain(&e) {
                Some(why) => why.to_string(),
                None => e.to_string(),
            })?;
            select_1(&client, t).await
        }
    }));

    // One connector, so one cache: both pools' tokens.
    let cache = deadpool.manager().token_cache().clone();
    let connections =
        || deadpool_created.load(Relaxed) + bb8.state().statistics.connections_created;
    while started.elapsed() < RUN {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let stats = cache.stats();
        println!(
            "  t={:>4.1}s  checkouts deadpool {:>6} bb8 {:>6} | connections made {:>4} | tokens fetched {:>2} (next expiry in {:.1}s) | failures {}",
            started.elapsed().as_secs_f64(),
            dp_tally.checkouts.load(Relaxed),
            bb_tally.checkouts.load(Relaxed),
            connections(),
            stats.requests,
            stats.expires_in.unwrap_or_default().as_secs_f64(),
            dp_tally.failures.load(Relaxed) + bb_tally.failures.load(Relaxed),
        );
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();

    let stats = cache.stats();
    let failures = dp_tally.failures.load(Relaxed) + bb_tally.failures.load(Relaxed);
    println!("\nsummary after {elapsed:.1?}:");
    println!("  pool      checkouts  failures  p50 checkout  p99 checkout");
    for (name, tally) in [("deadpool", &dp_tally), ("bb8", &bb_tally)] {
        println!(
            "  {name:<8}  {:>9}  {:>8}  {:>12.2?}  {:>12.2?}",
            tally.checkouts.load(Relaxed),
            tally.failures.load(Relaxed),
            tally.percentile(0.50),
            tally.percentile(0.99),
        );
    }
    println!(
        "  connections made: {} (each logged in with a token)",
        connections()
    );
    println!(
        "  tokens fetched: {} for both pools (one shared cache), failed fetches: {}",
        stats.requests, stats.failures
    );
    if let Some(emulator) = &target.emulator {
        let logins = emulator.logins();
        println!(
            "  emulator: {} token requests over {:.1} token lifetimes; {} logins checked, {} refused",
            emulator.requests(Endpoint::Token),
            elapsed.as_secs_f64() / TOKEN_LIFETIME.as_secs_f64(),
            logins.len(),
            logins.iter().filter(|l| l.outcome.is_err()).count()
        );
    }
    println!("  failures: {failures}");
    for tally in [&dp_tally, &bb_tally] {
        if let Some(first) = tally.first_failure.lock().unwrap().as_ref() {
            println!("  first failure: {first}");
        }
    }
    println!("\nmetrics (what GET /metrics would serve, shortened; see the web_service example):");
    for line in metrics_summary(&prometheus_text(&registry)?) {
        println!("  {line}");
    }
    if failures > 0 {
        return Err(format!("{failures} checkouts failed").into());
    }
    Ok(())
}
