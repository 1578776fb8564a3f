//! The token cache on its own: a hit (what every connect pays), and a cold start with 64
//! concurrent callers (one request to the provider).

use criterion::{BenchmarkId, Criterion};
use postgres_entra::{AzureTokenSource, TokenCache};
use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::support::harness::Bench;
use crate::support::recorder::Recorder;

const CACHE_HIT: &str = "token cache hit (per call)";
const COLD_START: &str = "cold start: 64 concurrent callers, empty cache";
/// Calls timed together, so the clock's own cost stays out of a ~50 ns measurement.
const HIT_BATCH: u64 = 32;

pub(crate) fn criterion(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("token cache");
    let cache = bench.cache.clone();
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
        b.iter_custom(|iters| cold_starts(bench, iters))
    });
    group.finish();
}

/// Runs `iters` cold starts, recording each one's time and the requests they made.
fn cold_starts(bench: &Bench, iters: u64) -> Duration {
    let requests_before = bench.provider_requests();
    let mut samples = Vec::with_capacity(iters as usize);
    let total = bench.runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            let t = Instant::now();
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
            samples.push(t.elapsed());
        }
        start.elapsed()
    });
    bench.recorder.record(COLD_START, "cached token", samples);
    let requests = bench.provider_requests() - requests_before;
    bench
        .recorder
        .record_requests(COLD_START, "cached token", requests);
    total
}

/// The cache-hit targets.
pub(crate) fn targets(recorder: &Recorder) -> Vec<String> {
    let Some(hit) = recorder.figures(CACHE_HIT, "64 concurrent tasks") else {
        return Vec::new();
    };
    let met = |ok: bool| if ok { "met" } else { "missed" };
    vec![format!(
        "cache hit at 64 tasks: median {} ns (target ≤ 100: {}), p99 {} ns (target ≤ 1000: {})",
        hit.median.as_nanos(),
        met(hit.median <= Duration::from_nanos(100)),
        hit.p99.as_nanos(),
        met(hit.p99 <= Duration::from_micros(1)),
    )]
}
