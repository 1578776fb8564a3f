//! `cargo bench`: connect churn, pool churn and the token cache, all in one run against the local
//! emulator, which the bench starts itself. Prints a summary table at the end and writes it to
//! `target/postgres-entra-bench.md` (and `docs/benchmarks.md` with `make bench`).
//!
//! Criterion measures each strategy on its own; the summary's connect and pool rows come from a
//! second, paired pass in which every strategy alternates in chunks with the static-password
//! baseline, so that slow drift over the run (a shared machine, sockets in TIME_WAIT) cannot
//! favour whichever ran first. Each ratio compares with the baseline samples taken beside it.
//!
//! `cargo bench -p postgres-entra-benches -- --quick` gives a quick look; a filter that names
//! neither `connect` nor `pool` (`cargo bench -- token`) skips the paired pass.

#[path = "../../support/mod.rs"]
mod support;

mod cache;
mod connect;
mod far;
mod pool;

use criterion::Criterion;
use std::time::Duration;
use support::harness::{BASELINE, Bench, TOKEN_LIFETIME};

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
    let pools = pool::Pools::new(&bench);
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 4 } else { 1 };

    connect::criterion(&mut criterion, &bench);
    pool::criterion(&mut criterion, &bench, &pools);
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_none_or(|f| {
        ["connect", "pool"]
            .iter()
            .any(|g| g.contains(f.as_str()) || f.contains(g))
    }) {
        eprintln!("paired runs: each strategy alternating with its static-password baseline...");
        connect::paired(&bench, scale);
        pool::paired(&bench, &pools, scale);
        far::paired(&bench, scale);
    }
    let pool_targets = pool::targets(&bench.recorder, &pools);
    pools.close(&bench);
    cache::criterion(&mut criterion, &bench);
    criterion.final_summary();

    let mut report = bench
        .recorder
        .markdown(BASELINE, &support::report::machine());
    report.push('\n');
    for line in connect::targets(&bench.recorder)
        .into_iter()
        .chain(pool_targets)
        .chain(far::targets(&bench.recorder))
        .chain(cache::targets(&bench.recorder))
    {
        report.push_str(&format!("- {line}\n"));
    }
    support::report::publish(&report);
}
