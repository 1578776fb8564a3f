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
//! Criterion measures each strategy on its own; the summary's connect and pool rows come from a
//! second, paired pass in which every strategy alternates in chunks with the static-password
//! baseline, so that slow drift over the run (a shared machine, sockets in TIME_WAIT) cannot
//! favour whichever ran first. Each ratio compares with the baseline samples taken beside it.
//!
//! `cargo bench -p postgres-entra-benches -- --quick` gives a quick look.

#[path = "../support/mod.rs"]
mod support;

use azure_core::credentials::TokenCredential;
use criterion::{BenchmarkId, Criterion};
use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots, TokenCache};
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_deadpool::{PoolOptions, max_age, pool_builder};
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
    static_config: tokio_postgres::Config,
    token_config: tokio_postgres::Config,
    recorder: Recorder,
}

/// The pools of the pool-churn benchmark: each library with a static password and with tokens.
struct Pools {
    deadpool_static: deadpool_postgres::Pool,
    deadpool_token: deadpool_postgres::Pool,
    bb8_static: bb8::Pool<bb8_postgres::PostgresConnectionManager<MakeRustlsConnect>>,
    bb8_token: bb8::Pool<EntraConnectionManager>,
}

/// The operations measured, so that criterion's runs and the paired runs do the same thing.
#[derive(Clone, Copy)]
enum Op {
    ConnectStatic,
    ConnectCached,
    ConnectNaive,
    DeadpoolStatic,
    DeadpoolToken,
    Bb8Static,
    Bb8Token,
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
            .build()
            .unwrap();
        let tls = emulator.tls().unwrap();
        let mut static_config = emulator.pg_config(STATIC_ROLE);
        static_config.password(STATIC_PASSWORD);
        let token_config = emulator.pg_config(&sp.role_name);
        Self {
            runtime,
            emulator,
            credential,
            connector,
            tls,
            static_config,
            token_config,
            recorder: Recorder::default(),
        }
    }

    fn pools(&self) -> Pools {
        let _guard = self.runtime.enter();
        let deadpool_config = |role: &str| {
            let mut config = deadpool_postgres::Config::new();
            config.host = Some(self.emulator.host().into());
            config.port = Some(self.emulator.port());
            config.dbname = Some(self.emulator.database().into());
            config.user = Some(role.into());
            if role == STATIC_ROLE {
                config.password = Some(STATIC_PASSWORD.into());
            }
            config.pool = Some(deadpool_postgres::PoolConfig::new(4));
            config
        };
        let deadpool_static = deadpool_config(STATIC_ROLE)
            .builder(self.tls.clone())
            .unwrap()
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .pre_recycle(max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5))
            .build()
            .unwrap();
        let deadpool_token = pool_builder(
            &deadpool_config("orders-api"),
            self.connector.clone(),
            PoolOptions::new().max_age(POOL_MAX_AGE, POOL_MAX_AGE / 5),
        )
        .unwrap()
        .build()
        .unwrap();
        fn bb8_builder<M: bb8::ManageConnection>() -> bb8::Builder<M> {
            bb8::Pool::builder()
                .max_size(4)
                .max_lifetime(Some(POOL_MAX_AGE))
        }
        let bb8_static = self
            .runtime
            .block_on(
                bb8_builder().build(bb8_postgres::PostgresConnectionManager::new(
                    self.static_config.clone(),
                    self.tls.clone(),
                )),
            )
            .unwrap();
        let manager =
            EntraConnectionManager::new(self.token_config.clone(), self.connector.clone()).unwrap();
        let bb8_token = self.runtime.block_on(bb8_builder().build(manager)).unwrap();
        Pools {
            deadpool_static,
            deadpool_token,
            bb8_static,
            bb8_token,
        }
    }

    async fn run(&self, op: Op, pools: &Pools) {
        match op {
            Op::ConnectStatic => {
                let (client, connection) =
                    self.static_config.connect(self.tls.clone()).await.unwrap();
                use_and_close(client, connection).await;
            }
            Op::ConnectCached => {
                let (client, connection) =
                    self.connector.connect(&self.token_config).await.unwrap();
                use_and_close(client, connection).await;
            }
            Op::ConnectNaive => {
                let token = self.credential.get_token(&[SCOPE], None).await.unwrap();
                let mut config = self.token_config.clone();
                config.password(token.token.secret());
                let (client, connection) = config.connect(self.tls.clone()).await.unwrap();
                use_and_close(client, connection).await;
            }
            Op::DeadpoolStatic | Op::DeadpoolToken => {
                let pool = if matches!(op, Op::DeadpoolStatic) {
                    &pools.deadpool_static
                } else {
                    &pools.deadpool_token
                };
                pool.get()
                    .await
                    .unwrap()
                    .simple_query("select 1")
                    .await
                    .unwrap();
            }
            Op::Bb8Static => {
                pools
                    .bb8_static
                    .get()
                    .await
                    .unwrap()
                    .simple_query("select 1")
                    .await
                    .unwrap();
            }
            Op::Bb8Token => {
                pools
                    .bb8_token
                    .get()
                    .await
                    .unwrap()
                    .simple_query("select 1")
                    .await
                    .unwrap();
            }
        }
    }

    /// Runs `op` `iters` times for criterion; returns the total time.
    fn timed(&self, op: Op, pools: &Pools, iters: u64) -> Duration {
        self.runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                self.run(op, pools).await;
            }
            start.elapsed()
        })
    }

    /// `n` runs of `op`, each timed; and the identity-provider requests they made.
    async fn samples(&self, op: Op, pools: &Pools, n: usize) -> (Vec<Duration>, u64) {
        let requests_before = self.emulator.requests(Endpoint::Token);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.run(op, pools).await;
            samples.push(t.elapsed());
        }
        (
            samples,
            self.emulator.requests(Endpoint::Token) - requests_before,
        )
    }

    /// Measures `candidate` against `baseline` in alternating chunks, so that drift over the run
    /// (a shared machine, sockets piling up in TIME_WAIT) weighs on both alike, and records both
    /// for the summary: the candidate's ratios compare with the baseline samples taken beside it.
    fn paired(
        &self,
        pools: &Pools,
        operation: &str,
        baseline: Op,
        candidate: (&str, Op),
        rounds: usize,
        chunk: usize,
    ) {
        let (strategy, op) = candidate;
        let (mut base, mut ours, mut requests, mut base_requests) = (Vec::new(), Vec::new(), 0, 0);
        self.runtime.block_on(async {
            // Baseline first in even rounds, candidate first in odd ones: neither always follows
            // the other.
            for round in 0..rounds {
                for candidate_turn in [round % 2 == 1, round % 2 == 0] {
                    if candidate_turn {
                        let (s, r) = self.samples(op, pools, chunk).await;
                        ours.extend(s);
                        requests += r;
                    } else {
                        let (s, r) = self.samples(baseline, pools, chunk).await;
                        base.extend(s);
                        base_requests += r;
                    }
                }
            }
        });
        self.recorder.record(operation, BASELINE, base.clone());
        self.recorder
            .record_requests(operation, BASELINE, base_requests);
        self.recorder.record_paired(operation, strategy, ours, base);
        self.recorder.record_requests(operation, strategy, requests);
    }
}

/// Finishes a connection: the query, then close, waiting for the connection task to end.
async fn use_and_close<C>(client: tokio_postgres::Client, connection: C)
where
    C: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let task = tokio::spawn(connection);
    client.simple_query("select 1").await.unwrap();
    drop(client);
    let _ = task.await;
}

fn connect_churn(c: &mut Criterion, bench: &Bench, pools: &Pools) {
    let mut group = c.benchmark_group("connect");
    bench
        .runtime
        .block_on(bench.connector.cache().get())
        .unwrap();
    group.bench_function(BASELINE, |b| {
        b.iter_custom(|iters| bench.timed(Op::ConnectStatic, pools, iters))
    });
    for (name, op, latencies) in [
        ("cached token", Op::ConnectCached, &[0u64, 200][..]),
        (
            "naive token per connect",
            Op::ConnectNaive,
            &[0, 50, 200][..],
        ),
    ] {
        for &latency_ms in latencies {
            bench
                .emulator
                .set_latency(Endpoint::Token, Duration::from_millis(latency_ms));
            group.bench_function(BenchmarkId::new(name, latency_ms), |b| {
                b.iter_custom(|iters| bench.timed(op, pools, iters))
            });
        }
    }
    bench.emulator.set_latency(Endpoint::Token, Duration::ZERO);
    group.finish();
}

fn pool_churn(c: &mut Criterion, bench: &Bench, pools: &Pools) {
    let mut group = c.benchmark_group("pool");
    for (id, op) in [
        (BenchmarkId::new("deadpool", BASELINE), Op::DeadpoolStatic),
        (
            BenchmarkId::new("deadpool", "cached token"),
            Op::DeadpoolToken,
        ),
        (BenchmarkId::new("bb8", BASELINE), Op::Bb8Static),
        (BenchmarkId::new("bb8", "cached token"), Op::Bb8Token),
    ] {
        group.bench_function(id, |b| b.iter_custom(|iters| bench.timed(op, pools, iters)));
    }
    group.finish();
}

/// The summary's connect and pool rows: each strategy measured in alternation with its baseline.
/// `scale` shrinks the rounds for `--quick`.
fn paired_runs(bench: &Bench, pools: &Pools, scale: usize) {
    eprintln!("paired runs: each strategy alternating with its static-password baseline...");
    let rounds = |n: usize| (n / scale).max(2);
    for (strategy, op, latency_ms, n, chunk) in [
        ("cached token", Op::ConnectCached, 0, 40, 20),
        ("cached token, IdP +200 ms", Op::ConnectCached, 200, 40, 20),
        ("naive, IdP +0 ms", Op::ConnectNaive, 0, 40, 20),
        ("naive, IdP +50 ms", Op::ConnectNaive, 50, 8, 8),
        ("naive, IdP +200 ms", Op::ConnectNaive, 200, 6, 5),
    ] {
        bench
            .emulator
            .set_latency(Endpoint::Token, Duration::from_millis(latency_ms));
        bench.paired(
            pools,
            CONNECT,
            Op::ConnectStatic,
            (strategy, op),
            rounds(n),
            chunk,
        );
    }
    bench.emulator.set_latency(Endpoint::Token, Duration::ZERO);
    bench.paired(
        pools,
        DEADPOOL,
        Op::DeadpoolStatic,
        ("cached token", Op::DeadpoolToken),
        rounds(20),
        250,
    );
    bench.paired(
        pools,
        BB8,
        Op::Bb8Static,
        ("cached token", Op::Bb8Token),
        rounds(20),
        250,
    );
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
            bench.cold_starts(iters, || async {
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

impl Bench {
    /// Runs `iters` cold starts, recording each one's time and the requests they made.
    fn cold_starts<F, Fut>(&self, iters: u64, cold_start: F) -> Duration
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
                cold_start().await;
                samples.push(t.elapsed());
            }
            start.elapsed()
        });
        self.recorder.record(COLD_START, "cached token", samples);
        let requests = self.emulator.requests(Endpoint::Token) - requests_before;
        self.recorder
            .record_requests(COLD_START, "cached token", requests);
        total
    }
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
    let paired = |strategy: &str| {
        recorder
            .figures(CONNECT, strategy)
            .zip(recorder.paired_baseline(CONNECT, strategy))
    };
    if let Some((cached, base)) = paired("cached token") {
        let r = ratio(cached.median, base.median);
        lines.push(format!(
            "cached-token connect ÷ static connect (median): {r:.3} (target ≤ 1.03: {})",
            if r <= 1.03 { "met" } else { "missed" }
        ));
    }
    if let (Some((cached, base)), Some(naive)) = (
        paired("cached token, IdP +200 ms"),
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
    let pools = bench.pools();
    let quick = std::env::args().any(|a| a == "--quick");

    connect_churn(&mut criterion, &bench, &pools);
    pool_churn(&mut criterion, &bench, &pools);
    // A criterion filter (`cargo bench -- token`) that names neither connects nor pools skips
    // the paired pass too.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_none_or(|f| {
        ["connect", "pool"]
            .iter()
            .any(|g| g.contains(f.as_str()) || f.contains(g))
    }) {
        paired_runs(&bench, &pools, if quick { 4 } else { 1 });
    }
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
