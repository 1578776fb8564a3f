//! `cargo bench`: connect churn and pool churn by strategy, and the token cache, all in one run
//! against the local emulator, which the bench starts itself. Prints a summary table at the end
//! and writes it to `target/postgres-entra-bench.md`.
//!
//! Strategies for a connect (TLS login, `select 1`, close), all on the same server and login path:
//! - `static password`: a password role, no token at all: the physical limit;
//! - `cached token`: `EntraConnector` (shared cache, background refresh);
//! - `naive, IdP +N ms`: a fresh token from the credential on every connect, as the seeds do,
//!   with the mock identity provider answering after N ms.
//!
//! `cargo bench -p postgres-entra-benches -- --quick` gives a quick look (about two minutes).

#[path = "../support/mod.rs"]
mod support;

use azure_core::credentials::TokenCredential;
use criterion::{BenchmarkId, Criterion};
use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots, TokenCache};
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_deadpool::{max_age, pool_builder};
use postgres_entra_testkit::{Emulator, Endpoint};
use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::Recorder;
use tokio::runtime::Runtime;
use tokio_postgres_rustls::MakeRustlsConnect;

const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";
const STATIC_ROLE: &str = "bench_static";
const STATIC_PASSWORD: &str = "bench-static-password";
/// Below azure_identity's own 300 s refresh window, so its internal cache never answers: every
/// `get_token` of the naive strategy reaches the identity provider, as with a credential that
/// does not cache (the Azure CLI ones) or a cache miss per connect.
const TOKEN_LIFETIME: Duration = Duration::from_secs(240);
const POOL_MAX_AGE: Duration = Duration::from_millis(50);

const CONNECT: &str = "connect: TLS login + select 1 + close";
const DEADPOOL: &str = "deadpool checkout + select 1 (max age 50 ms)";
const BB8: &str = "bb8 checkout + select 1 (max lifetime 50 ms)";
const CACHE_HIT: &str = "token cache hit (per call)";
const COLD_START: &str = "cold start: 64 concurrent callers, empty cache";
const BASELINE: &str = "static password";

struct Bench {
    runtime: Runtime,
    emulator: Emulator,
    credential: Arc<dyn TokenCredential>,
    connector: EntraConnector,
    tls: MakeRustlsConnect,
    recorder: Recorder,
}

impl Bench {
    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let emulator = Emulator::builder()
            .token_lifetime(TOKEN_LIFETIME)
            .start()
            .unwrap();
        emulator
            .add_password_role(STATIC_ROLE, STATIC_PASSWORD)
            .unwrap();
        let sp = emulator.service_principal();
        let credential: Arc<dyn TokenCredential> = emulator.client_secret_credential(&sp).unwrap();
        let connector = EntraConnector::builder(AzureTokenSource::new(credential.clone()))
            .role_name(&sp.role_name)
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
            .private_cache()
            .build()
            .unwrap();
        let tls = emulator.tls().unwrap();
        Self {
            runtime,
            emulator,
            credential,
            connector,
            tls,
            recorder: Recorder::default(),
        }
    }

    fn config(&self, role: &str) -> tokio_postgres::Config {
        let mut config = self.emulator.pg_config(role);
        if role == STATIC_ROLE {
            config.password(STATIC_PASSWORD);
        }
        config
    }

    /// Runs `iters` operations one after another, recording each one's latency and the identity
    /// provider requests they caused; returns the total time, for criterion.
    fn sequential<F, Fut>(&self, operation: &str, strategy: &str, iters: u64, op: F) -> Duration
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let requests_before = self.emulator.requests(Endpoint::Token);
        let mut samples = Vec::with_capacity(iters as usize);
        let total = self.runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                op().await;
                samples.push(t.elapsed());
            }
            start.elapsed()
        });
        self.recorder.record(operation, strategy, samples);
        self.recorder.record_requests(
            operation,
            strategy,
            self.emulator.requests(Endpoint::Token) - requests_before,
        );
        total
    }
}

/// Finishes a connection: the query, then close, waiting for the connection task to end.
async fn use_and_close<S>(
    client: tokio_postgres::Client,
    connection: tokio_postgres::Connection<tokio_postgres::Socket, S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let task = tokio::spawn(connection);
    client.simple_query("select 1").await.unwrap();
    drop(client);
    let _ = task.await;
}

fn connect_churn(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("connect");
    let static_config = bench.config(STATIC_ROLE);
    let token_config = bench.config("orders-api");
    bench
        .runtime
        .block_on(bench.connector.cache().get())
        .unwrap();

    group.bench_function(BASELINE, |b| {
        b.iter_custom(|iters| {
            bench.sequential(CONNECT, BASELINE, iters, || async {
                let (client, connection) = static_config.connect(bench.tls.clone()).await.unwrap();
                use_and_close(client, connection).await;
            })
        })
    });
    for latency_ms in [0u64, 200] {
        let strategy = if latency_ms == 0 {
            "cached token".to_owned()
        } else {
            format!("cached token, IdP +{latency_ms} ms")
        };
        bench
            .emulator
            .set_latency(Endpoint::Token, Duration::from_millis(latency_ms));
        group.bench_function(BenchmarkId::new("cached token", latency_ms), |b| {
            b.iter_custom(|iters| {
                bench.sequential(CONNECT, &strategy, iters, || async {
                    let (client, connection) =
                        bench.connector.connect(&token_config).await.unwrap();
                    use_and_close(client, connection).await;
                })
            })
        });
    }
    for latency_ms in [0u64, 50, 200] {
        let strategy = format!("naive, IdP +{latency_ms} ms");
        bench
            .emulator
            .set_latency(Endpoint::Token, Duration::from_millis(latency_ms));
        group.bench_function(
            BenchmarkId::new("naive token per connect", latency_ms),
            |b| {
                b.iter_custom(|iters| {
                    bench.sequential(CONNECT, &strategy, iters, || async {
                        let token = bench.credential.get_token(&[SCOPE], None).await.unwrap();
                        let mut config = token_config.clone();
                        config.user("orders-api").password(token.token.secret());
                        let (client, connection) = config.connect(bench.tls.clone()).await.unwrap();
                        use_and_close(client, connection).await;
                    })
                })
            },
        );
    }
    bench.emulator.set_latency(Endpoint::Token, Duration::ZERO);
    group.finish();
}

fn pool_churn(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("pool");
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
    let dp_static = deadpool_config(STATIC_ROLE)
        .builder(bench.tls.clone())
        .unwrap()
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .pre_recycle(max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5))
        .build()
        .unwrap();
    let dp_token = pool_builder(&deadpool_config("orders-api"), bench.connector.clone())
        .unwrap()
        .pre_recycle(max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5))
        .build()
        .unwrap();
    for (strategy, pool) in [(BASELINE, &dp_static), ("cached token", &dp_token)] {
        group.bench_function(BenchmarkId::new("deadpool", strategy), |b| {
            b.iter_custom(|iters| {
                bench.sequential(DEADPOOL, strategy, iters, || async {
                    let client = pool.get().await.unwrap();
                    client.simple_query("select 1").await.unwrap();
                })
            })
        });
    }

    fn bb8_builder<M: bb8::ManageConnection>() -> bb8::Builder<M> {
        bb8::Pool::builder()
            .max_size(4)
            .max_lifetime(Some(POOL_MAX_AGE))
    }
    let bb8_static = bench
        .runtime
        .block_on(
            bb8_builder().build(bb8_postgres::PostgresConnectionManager::new(
                bench.config(STATIC_ROLE),
                bench.tls.clone(),
            )),
        )
        .unwrap();
    let bb8_token = bench
        .runtime
        .block_on(bb8_builder().build(EntraConnectionManager::new(
            bench.config("orders-api"),
            bench.connector.clone(),
        )))
        .unwrap();
    group.bench_function(BenchmarkId::new("bb8", BASELINE), |b| {
        b.iter_custom(|iters| {
            bench.sequential(BB8, BASELINE, iters, || async {
                let client = bb8_static.get().await.unwrap();
                client.simple_query("select 1").await.unwrap();
            })
        })
    });
    group.bench_function(BenchmarkId::new("bb8", "cached token"), |b| {
        b.iter_custom(|iters| {
            bench.sequential(BB8, "cached token", iters, || async {
                let client = bb8_token.get().await.unwrap();
                client.simple_query("select 1").await.unwrap();
            })
        })
    });
    group.finish();
}

/// Calls timed together, so the clock's own cost stays out of a ~50 ns measurement.
const HIT_BATCH: u64 = 32;

fn token_cache(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("token cache");
    let cache = bench.connector.cache().clone();
    bench.runtime.block_on(cache.get()).unwrap();

    for tasks in [1u64, 8, 64] {
        let strategy = format!(
            "{tasks} concurrent task{}",
            if tasks == 1 { "" } else { "s" }
        );
        group.bench_function(BenchmarkId::new("hit", tasks), |b| {
            b.iter_custom(|iters| {
                let batches_per_task = (iters / HIT_BATCH / tasks).max(1);
                let (total, samples) = bench.runtime.block_on(async {
                    let start = Instant::now();
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let cache = cache.clone();
                            tokio::spawn(async move {
                                let mut samples = Vec::with_capacity(batches_per_task as usize);
                                for _ in 0..batches_per_task {
                                    let t = Instant::now();
                                    for _ in 0..HIT_BATCH {
                                        black_box(cache.get().await.unwrap());
                                    }
                                    samples.push(t.elapsed() / HIT_BATCH as u32);
                                }
                                samples
                            })
                        })
                        .collect();
                    let mut samples = Vec::new();
                    for handle in handles {
                        samples.extend(handle.await.unwrap());
                    }
                    (start.elapsed(), samples)
                });
                bench.recorder.record(CACHE_HIT, &strategy, samples);
                // Wall time per call across all tasks, scaled to the iterations asked for.
                total.mul_f64(iters as f64 / (batches_per_task * HIT_BATCH * tasks) as f64)
            })
        });
    }

    group.bench_function("cold start, 64 callers", |b| {
        b.iter_custom(|iters| {
            bench.sequential(COLD_START, "cached token", iters, || async {
                let cold = TokenCache::builder(AzureTokenSource::new(bench.credential.clone()))
                    .build()
                    .unwrap();
                let callers: Vec<_> = (0..64)
                    .map(|_| {
                        let cold = cold.clone();
                        tokio::spawn(async move { cold.get().await.map(|_| ()) })
                    })
                    .collect();
                for caller in callers {
                    caller.await.unwrap().unwrap();
                }
                assert_eq!(
                    cold.stats().requests,
                    1,
                    "64 cold callers must cause one request"
                );
            })
        })
    });
    group.finish();
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} core(s) of {cpu}, {} {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn targets(recorder: &Recorder) -> Vec<String> {
    let mut lines = Vec::new();
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
    if let (Some(base), Some(cached)) = (
        recorder.figures(CONNECT, BASELINE),
        recorder.figures(CONNECT, "cached token"),
    ) {
        let r = ratio(cached.median, base.median);
        lines.push(format!(
            "cached-token connect ÷ static connect (median): {r:.3} (target ≤ 1.03: {})",
            if r <= 1.03 { "met" } else { "missed" }
        ));
    }
    if let (Some(base), Some(cached), Some(naive)) = (
        recorder.figures(CONNECT, BASELINE),
        recorder.figures(CONNECT, "cached token, IdP +200 ms"),
        recorder.figures(CONNECT, "naive, IdP +200 ms"),
    ) {
        let r = ratio(cached.p99, base.p99);
        lines.push(format!(
            "with 200 ms IdP latency, cached p99 ÷ static p99: {r:.3} (target ≤ 1.05: {}); naive median {:.1} ms (pays the latency on every connect)",
            if r <= 1.05 { "met" } else { "missed" },
            naive.median.as_secs_f64() * 1e3
        ));
    }
    if let Some(hit) = recorder.figures(CACHE_HIT, "64 concurrent tasks") {
        lines.push(format!(
            "cache hit at 64 tasks: median {} ns (target ≤ 100: {}), p99 {} ns (target ≤ 1000: {})",
            hit.median.as_nanos(),
            if hit.median <= Duration::from_nanos(100) {
                "met"
            } else {
                "missed"
            },
            hit.p99.as_nanos(),
            if hit.p99 <= Duration::from_micros(1) {
                "met"
            } else {
                "missed"
            }
        ));
    }
    lines
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    eprintln!(
        "starting the local emulator (tokens live {}s)...",
        TOKEN_LIFETIME.as_secs()
    );
    let bench = Bench::new();

    connect_churn(&mut criterion, &bench);
    pool_churn(&mut criterion, &bench);
    token_cache(&mut criterion, &bench);
    criterion.final_summary();

    let mut report = bench.recorder.markdown(BASELINE, &machine());
    report.push('\n');
    for line in targets(&bench.recorder) {
        report.push_str(&format!("- {line}\n"));
    }
    println!("\n{report}");
    let target_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|p| p.to_owned()))
        .unwrap_or_else(|| "target".into());
    let path = target_dir.join("postgres-entra-bench.md");
    match std::fs::write(&path, &report) {
        Ok(()) => println!("summary written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
}
