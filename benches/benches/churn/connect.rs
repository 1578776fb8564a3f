//! Connect churn: a full TLS login, `select 1` and close, by strategy: a static password (the
//! physical limit), the cached token, and a token fetched from the credential on every connect
//! (the naive way), with the identity provider answering after 0, 50 or 200 ms.

use criterion::{BenchmarkId, Criterion};
use std::future::Future;
use std::time::Duration;

use crate::support::harness::{BASELINE, Bench, STATIC_PASSWORD, STATIC_ROLE};
use crate::support::recorder::Recorder;

pub(crate) const CONNECT: &str = "connect: TLS login + select 1 + close";
/// The strategy of sqlx's own connect with a password (tokio-postgres's is the baseline).
const SQLX_OWN: &str = "sqlx's own connect, static password";
/// sqlx's own connect with the password again, as the baseline of its connect with the token.
const SQLX_BASE: &str = "sqlx connect, static password";
/// sqlx's connect through the adapter's relay, with the cached token.
const SQLX_TOKEN: &str = "sqlx connect, cached token (relay)";
const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

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

async fn with_static_password(bench: &Bench) {
    let (client, connection) = bench
        .static_config
        .connect(bench.tls.clone())
        .await
        .unwrap();
    use_and_close(client, connection).await;
}

/// A sqlx connect with `options`, `select 1`, close: with the password over sqlx's own TLS (rustls,
/// verify-full), what sqlx users pay today; with the adapter's options, a login through its relay
/// with the cached token.
pub(crate) async fn with_sqlx(options: &sqlx::postgres::PgConnectOptions) {
    use sqlx::{Connection as _, Executor as _};
    let mut connection = sqlx::PgConnection::connect_with(options).await.unwrap();
    connection.execute("select 1").await.unwrap();
    connection.close().await.unwrap();
}

async fn with_cached_token(bench: &Bench) {
    let (client, connection) =
        postgres_entra_tokio_postgres::connect(&bench.connector, &bench.token_config)
            .await
            .unwrap();
    use_and_close(client, connection).await;
}

async fn with_token_per_connect(bench: &Bench) {
    let token = bench.credential.get_token(&[SCOPE], None).await.unwrap();
    let mut config = bench.token_config.clone();
    config.password(token.token.secret());
    let (client, connection) = config.connect(bench.tls.clone()).await.unwrap();
    use_and_close(client, connection).await;
}

/// Criterion's own measurement of each strategy.
pub(crate) fn criterion(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("connect");
    bench.runtime.block_on(bench.cache.get()).unwrap();
    group.bench_function(BASELINE, |b| {
        b.iter_custom(|iters| bench.timed(iters, || with_static_password(bench)))
    });
    for latency_ms in [0, 200] {
        bench.set_provider_latency(latency_ms);
        group.bench_function(BenchmarkId::new("cached token", latency_ms), |b| {
            b.iter_custom(|iters| bench.timed(iters, || with_cached_token(bench)))
        });
    }
    for latency_ms in [0, 50, 200] {
        bench.set_provider_latency(latency_ms);
        group.bench_function(
            BenchmarkId::new("naive token per connect", latency_ms),
            |b| b.iter_custom(|iters| bench.timed(iters, || with_token_per_connect(bench))),
        );
    }
    bench.set_provider_latency(0);
    group.finish();
}

/// The summary's connect rows: each strategy alternating with the static-password baseline.
/// `scale` shrinks the rounds for `--quick`.
pub(crate) fn paired(bench: &Bench, scale: usize) {
    let rounds = |n: usize| (n / scale).max(2);
    // sqlx's own connect against tokio-postgres's, both with the password: whether sqlx's
    // connects are as fast (sqlx 0.9.0 left Nagle's algorithm on and waited out delayed ACKs,
    // transact-rs/sqlx#4335; 0.9.1 sets TCP_NODELAY).
    let sqlx_static = bench
        .sqlx_options()
        .username(STATIC_ROLE)
        .password(STATIC_PASSWORD);
    bench.paired(
        CONNECT,
        (BASELINE, || with_static_password(bench)),
        (SQLX_OWN, || with_sqlx(&sqlx_static)),
        rounds(40),
        20,
    );
    // sqlx with the token against sqlx with the password: the relay's cost on a connect.
    let sqlx_token = {
        let _entered = bench.runtime.enter();
        postgres_entra_sqlx::connect_lazy_with(
            bench.sqlx_options().username(""),
            sqlx::postgres::PgPoolOptions::new(),
            &bench.connector,
            postgres_entra::SessionOptions::new(),
        )
        .unwrap()
    };
    let relayed = (*sqlx_token.connect_options()).clone();
    bench.paired(
        CONNECT,
        (SQLX_BASE, || with_sqlx(&sqlx_static)),
        (SQLX_TOKEN, || with_sqlx(&relayed)),
        rounds(40),
        20,
    );
    let strategies: [(&str, bool, u64, usize, usize); 5] = [
        ("cached token", true, 0, 40, 20),
        ("cached token, IdP +200 ms", true, 200, 40, 20),
        ("naive, IdP +0 ms", false, 0, 40, 20),
        ("naive, IdP +50 ms", false, 50, 8, 8),
        ("naive, IdP +200 ms", false, 200, 6, 5),
    ];
    for (strategy, cached, latency_ms, n, chunk) in strategies {
        bench.set_provider_latency(latency_ms);
        bench.paired(
            CONNECT,
            (BASELINE, || with_static_password(bench)),
            (strategy, || async move {
                if cached {
                    with_cached_token(bench).await
                } else {
                    with_token_per_connect(bench).await
                }
            }),
            rounds(n),
            chunk,
        );
    }
    bench.set_provider_latency(0);
}

/// The connect targets: the cached token costs nothing measurable, even with a slow provider.
pub(crate) fn targets(recorder: &Recorder) -> Vec<String> {
    let mut lines = Vec::new();
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
    let paired = |strategy: &str| {
        recorder
            .figures(CONNECT, strategy)
            .zip(recorder.paired_baseline(CONNECT, strategy))
    };
    if let Some(r) = recorder.median_ratio(CONNECT, "cached token") {
        lines.push(format!(
            "cached-token connect ÷ static connect (median): {r:.3} (target ≤ 1.03: {})",
            if r <= 1.03 { "met" } else { "missed" }
        ));
    }
    if let Some(r) = recorder.median_ratio(CONNECT, SQLX_OWN) {
        lines.push(format!(
            "sqlx's own connect ÷ tokio-postgres's, both with the password (median): {r:.3} (target ≤ 1.2: {})",
            if r <= 1.2 { "met" } else { "missed" }
        ));
    }
    if let Some(r) = recorder.median_ratio(CONNECT, SQLX_TOKEN) {
        lines.push(format!(
            "sqlx connect with the cached token (through the relay) ÷ sqlx's own with the password (median): {r:.3} (no target: the relay's hop, decided in docs/design.md)"
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
    lines
}
