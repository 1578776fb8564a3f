//! sqlx with the server some distance away: a loopback relay (the test kit's) delivers each
//! direction's bytes 0.5 ms late (0.5-1.5 ms: Tokio's timer counts whole milliseconds), a round
//! trip of a few milliseconds (the static row of the held query measures it), as between a
//! service and its database in one Azure region (Microsoft Learn, "What are availability zones?":
//! under 2 ms of round trip between a region's zones). On loopback the adapter's relay adds its
//! local hop to round trips of about 0.1 ms; here, to round trips thirty times longer. Static
//! password against the cached token, as on loopback.

use postgres_entra::SessionOptions;
use postgres_entra_testkit::Relay;
use std::time::Duration;

use crate::connect::with_sqlx;
use crate::pool::{POOL_MAX_AGE, checkout_sqlx, held, query_held};
use crate::support::harness::{BASELINE, Bench, STATIC_PASSWORD, STATIC_ROLE};
use crate::support::recorder::Recorder;

/// The delay each way.
const LATENCY: Duration = Duration::from_micros(500);
const CONNECT: &str = "sqlx connect: TLS login + select 1 + close, 0.5-1.5 ms more each way";
const CHURN: &str = "sqlx checkout + select 1 (max lifetime 50 ms), 0.5-1.5 ms more each way";
const HELD: &str = "sqlx select 1 on a held connection, 0.5-1.5 ms more each way";
const TOKEN: &str = "cached token (relay)";

/// The three pairs: connect, pool churn and a query on a held connection.
pub(crate) fn paired(bench: &Bench, scale: usize) {
    let _runtime = bench.runtime.enter();
    let server = ([127, 0, 0, 1], bench.emulator.port()).into();
    let far = bench
        .runtime
        .block_on(Relay::with_latency(server, LATENCY))
        .unwrap();
    let options = || bench.sqlx_options().port(far.port());
    let with_password = options().username(STATIC_ROLE).password(STATIC_PASSWORD);
    let pool_options = |size| {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(size)
            .max_lifetime(POOL_MAX_AGE)
    };
    let with_token = |size| {
        postgres_entra_sqlx::connect_lazy_with(
            options().username(""),
            pool_options(size),
            &bench.connector,
            SessionOptions::new(),
        )
        .unwrap()
    };
    let (static_pool, token_pool) = (
        pool_options(4).connect_lazy_with(with_password.clone()),
        with_token(4),
    );
    let relayed = (*token_pool.connect_options()).clone();
    let (static_held, token_held) = (
        held(
            bench,
            &pool_options(1).connect_lazy_with(with_password.clone()),
        ),
        held(bench, &with_token(1)),
    );

    let rounds = |n: usize| (n / scale).max(2);
    bench.paired(
        CONNECT,
        (BASELINE, || with_sqlx(&with_password)),
        (TOKEN, || with_sqlx(&relayed)),
        rounds(20),
        10,
    );
    // Tokio's timer delays each chunk by up to a millisecond more at random: more rounds than
    // on loopback for the medians to settle.
    bench.paired(
        CHURN,
        (BASELINE, || checkout_sqlx(&static_pool)),
        (TOKEN, || checkout_sqlx(&token_pool)),
        rounds(40),
        100,
    );
    bench.paired(
        HELD,
        (BASELINE, || query_held(&static_held)),
        (TOKEN, || query_held(&token_held)),
        rounds(40),
        100,
    );
    bench.runtime.block_on(async {
        static_pool.close().await;
        token_pool.close().await;
    });
}

/// What the relay costs with the server that far.
pub(crate) fn targets(recorder: &Recorder) -> Vec<String> {
    let ratio = |operation: &str| recorder.median_ratio(operation, TOKEN);
    let (Some(connect), Some(churn), Some(held)) = (ratio(CONNECT), ratio(CHURN), ratio(HELD))
    else {
        return Vec::new();
    };
    let met = if connect.max(churn) <= 1.03 {
        "met"
    } else {
        "missed"
    };
    vec![format!(
        "sqlx with 0.5-1.5 ms more each way (a round trip of a few ms), through the relay ÷ sqlx's own with the password (median): connect {connect:.3}, churn {churn:.3} (≤ 1.03: {met}), a query on a held connection {held:.3}"
    )]
}
