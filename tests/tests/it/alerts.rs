//! Every alert of `ops/prometheus/postgres-entra.rules.yml` against series this library exported in
//! real runs: each condition is driven with the emulator, for each pool the alert claims to cover,
//! while an OpenTelemetry Prometheus exporter is scraped four times a second; promtool then shows
//! that the alert fires, and that a healthy run of the same length fires none.
//!
//! The scrapes are replayed one minute apart: promtool's unit tests evaluate the rules on a clock
//! of their own, the rules' windows and `for:` durations are in minutes, and a run here lasts
//! seconds. What the alerts compare (counts, values, whether a series exists) is what the library
//! exported.

use postgres_entra::opentelemetry_0_33::metrics::{Meter, MeterProvider as _};
use postgres_entra::{EntraConnector, SessionOptions, TlsRoots};
use postgres_entra_testkit::{Endpoint, Fault};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::Suite;
use crate::pools::{PoolSpec, PoolUnderTest};

for_pools!([deadpool, bb8, sqlx, diesel_deadpool, diesel_bb8] {
    a_healthy_run_fires_no_alert_and_exports_every_series_from_the_start,
    no_token_fires_when_the_secret_is_wrong_from_the_start,
    token_expiring_fires_when_refreshes_fail_as_the_token_runs_down,
    logins_rejected_fires_when_the_principal_is_revoked,
    connections_retired_fast_fires_when_sessions_are_retired_fast,
} only [deadpool, bb8, diesel_deadpool, diesel_bb8] {
    // sqlx does not tell how many checkouts wait.
    pool_exhausted_fires_when_every_connection_is_held_and_checkouts_wait,
});

/// Only bb8 counts the checkouts that timed out.
mod timeouts {
    use super::checkout_timeouts_fires_when_checkouts_time_out;

    for_pools!([bb8, diesel_bb8] {
        checkout_timeouts_fires_when_checkouts_time_out,
    });
}

/// Between two scrapes (each replayed as one minute).
const SCRAPE_EVERY: Duration = Duration::from_millis(250);

/// An SDK meter provider whose metrics are served in the Prometheus text format (as the
/// `web_service` example serves them at `/metrics`), and the scrapes taken of it.
struct Scrapes {
    registry: prometheus::Registry,
    provider: opentelemetry_sdk::metrics::SdkMeterProvider,
    /// Each scrape: series (name and labels, as exposed) → value.
    taken: Vec<BTreeMap<String, String>>,
}

impl Scrapes {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .unwrap();
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(exporter)
            .build();
        Self {
            registry,
            provider,
            taken: Vec::new(),
        }
    }

    fn meter(&self) -> Meter {
        self.provider.meter("postgres-entra")
    }

    /// Scrapes once: the series about pools and tokens (histograms left out: no alert reads them).
    fn scrape(&mut self) {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap();
        let mut scrape = BTreeMap::new();
        for line in text.lines() {
            if !(line.starts_with("postgres_entra_") || line.starts_with("db_client_connection_"))
                || line.contains("_bucket{")
                || line.contains("_seconds_sum{")
                || line.contains("_seconds_count{")
            {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            scrape.insert(series.to_owned(), value.to_owned());
        }
        self.taken.push(scrape);
    }

    /// Scrapes `count` times, [`SCRAPE_EVERY`] apart.
    async fn take(&mut self, count: usize) {
        for _ in 0..count {
            self.scrape();
            tokio::time::sleep(SCRAPE_EVERY).await;
        }
    }

    /// The names of the series the first scrape had.
    fn first_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.taken[0]
            .keys()
            .map(|series| series.split('{').next().unwrap().to_owned())
            .collect();
        names.dedup();
        names
    }

    /// Replays the scrapes in promtool, one a minute, and checks that exactly the alerts `firing`
    /// fired at some point of the run.
    fn assert_alerts(&self, test: &str, firing: &[&str]) {
        let rules = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../ops/prometheus/postgres-entra.rules.yml")
            .canonicalize()
            .unwrap();
        let alerts: Vec<String> = std::fs::read_to_string(&rules)
            .unwrap()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- alert: ").map(str::to_owned))
            .collect();
        for alert in firing {
            assert!(alerts.iter().any(|a| a == alert), "no alert {alert}");
        }
        let minutes = self.taken.len();
        let mut series: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (i, scrape) in self.taken.iter().enumerate() {
            for (name, value) in scrape {
                series.entry(name).or_insert_with(|| vec!["_"; minutes])[i] = value;
            }
        }
        let mut yaml = format!(
            "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
            rules.display()
        );
        for (name, values) in &series {
            let _ = writeln!(
                yaml,
                "      - series: '{}'\n        values: '{}'",
                name.replace('\'', "''"),
                values.join(" ")
            );
        }
        let end = minutes - 1;
        let _ = write!(
            yaml,
            "    alert_rule_test:\n      - eval_time: {end}m\n        alertname: EndOfTheRun\n        exp_alerts: []\n    promql_expr_test:\n"
        );
        for alert in &alerts {
            let fired = u8::from(firing.contains(&alert.as_str()));
            let _ = write!(
                yaml,
                "      - expr: 'max_over_time((count(ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"}}) or vector(0))[{end}m:1m])'\n        eval_time: {end}m\n        exp_samples:\n          - labels: '{{}}'\n            value: {fired}\n"
            );
        }
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("alerts");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.yml", test.replace("::", "-")));
        std::fs::write(&file, yaml).unwrap();
        let output = std::process::Command::new("promtool")
            .args(["test", "rules"])
            .arg(&file)
            .output()
            .expect("promtool runs (make deps installs it)");
        assert!(
            output.status.success(),
            "expected {firing:?} to fire and no other alert, over {minutes} scrapes ({}):\n{}{}",
            file.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!(
            "{test}: {firing:?} fired over {minutes} scrapes replayed a minute apart, no other alert"
        );
    }
}

/// The connector of `emulator`'s service principal, recording into `meter`.
fn metered(emulator: &Suite, meter: Meter) -> EntraConnector {
    crate::connector_builder(emulator)
        .meter(meter)
        .build()
        .unwrap()
}

/// A test's name, for its promtool file.
fn name<P>(scenario: &str) -> String {
    let pool = std::any::type_name::<P>()
        .rsplit("::")
        .next()
        .unwrap()
        .to_owned();
    format!("{pool}-{scenario}")
}

/// `alerts`, and the checkout-timeouts alert for pools that count timeouts: bb8 reports every
/// failed connect as a timed-out checkout (the alert's description says so).
fn with_bb8_timeouts<P: PoolUnderTest>(alerts: &[&'static str]) -> Vec<&'static str> {
    let mut alerts = alerts.to_vec();
    if P::COUNTS_TIMEOUTS {
        alerts.push("PostgresEntraPoolCheckoutTimeouts");
    }
    alerts
}

/// Churns `pool` with two tasks while `count` scrapes are taken (give it more than two
/// connections, or the exhaustion alert sees it full).
async fn churn_while<P: PoolUnderTest>(pool: &P, scrapes: &mut Scrapes, count: usize) {
    let load = crate::churn(pool, 2, SCRAPE_EVERY * count as u32, "orders-api");
    let ((), _) = tokio::join!(scrapes.take(count), load);
}

/// A pool of two whose checkouts give up after 500 ms: for conditions that make them fail.
async fn failing_pool<P: PoolUnderTest>(emulator: &Suite, connector: EntraConnector) -> P {
    P::build(
        PoolSpec::new(emulator, connector)
            .size(2)
            .timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap()
}

/// `times` checkouts as `role`, `every` apart, whatever each one's outcome.
async fn checkouts_every<P: PoolUnderTest>(
    pool: &P,
    role: &'static str,
    times: usize,
    every: Duration,
) {
    for _ in 0..times {
        let _ = pool.checkout_as(role).await;
        tokio::time::sleep(every).await;
    }
}

async fn a_healthy_run_fires_no_alert_and_exports_every_series_from_the_start<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let connector = metered(&emulator, scrapes.meter());
    let pool: P = P::build(PoolSpec::new(&emulator, connector).size(4))
        .await
        .unwrap();
    // The series every alert reads, exported before anything went wrong (a counter born at its
    // first increment would hide that increment from `increase()`).
    scrapes.scrape();
    let mut expected = vec![
        "postgres_entra_token_time_to_expiry_seconds",
        "postgres_entra_token_consecutive_failures",
        "postgres_entra_login_rejections_total",
        "postgres_entra_login_retries_total",
        "postgres_entra_connection_retired_total",
        "db_client_connection_max",
        "db_client_connection_count",
    ];
    if P::COUNTS_PENDING {
        expected.push("db_client_connection_pending_requests");
    }
    if P::COUNTS_TIMEOUTS {
        expected.push("db_client_connection_timeouts_total");
    }
    let names = scrapes.first_names();
    for name in &expected {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from the start: {names:?}"
        );
    }
    churn_while(&pool, &mut scrapes, 30).await;
    scrapes.assert_alerts(&name::<P>("healthy"), &[]);
}

async fn no_token_fires_when_the_secret_is_wrong_from_the_start<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let mut sp = emulator.service_principal();
    sp.client_secret = Some("wrong-secret".into());
    let source =
        postgres_entra::AzureTokenSource::fresh(emulator.client_secret_credentials(&sp).unwrap())
            .unwrap();
    let connector = EntraConnector::builder(source)
        .role_name(sp.role_name)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .meter(scrapes.meter())
        .build()
        .unwrap();
    let pool: P = failing_pool(&emulator, connector).await;
    let checkouts = checkouts_every(&pool, "orders-api", 10, Duration::from_millis(300));
    tokio::join!(scrapes.take(12), checkouts);
    scrapes.assert_alerts(
        &name::<P>("no-token"),
        &with_bb8_timeouts::<P>(&["PostgresEntraNoToken"]),
    );
}

async fn token_expiring_fires_when_refreshes_fail_as_the_token_runs_down<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(8)).await;
    let mut scrapes = Scrapes::new();
    let connector = metered(&emulator, scrapes.meter());
    // Four connections for two tasks: never all in use (which the exhaustion alert would see).
    let pool: P = P::build(PoolSpec::new(&emulator, connector).size(4))
        .await
        .unwrap();
    pool.checkout_as("orders-api").await.unwrap();
    // From now on the refresh (at half the life) and its retries fail; the token still serves.
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    // Past the refresh (4 s in), short of the end of the token's use (7.2 s in).
    churn_while(&pool, &mut scrapes, 24).await;
    scrapes.assert_alerts(
        &name::<P>("token-expiring"),
        &["PostgresEntraTokenExpiringWhileRefreshFails"],
    );
}

async fn logins_rejected_fires_when_the_principal_is_revoked<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let (sp, readers, connector) = crate::member_of_group(&emulator, "db-readers").await;
    let connector = connector.meter(scrapes.meter()).build().unwrap();
    let pool: P = failing_pool(&emulator, connector).await;
    pool.checkout_as("db-readers").await.unwrap();
    emulator.remove_group_member(&readers, &sp).unwrap();
    emulator.terminate_sessions_of("db-readers").await.unwrap();
    let checkouts = checkouts_every(&pool, "db-readers", 20, Duration::from_millis(200));
    tokio::join!(scrapes.take(20), checkouts);
    scrapes.assert_alerts(
        &name::<P>("logins-rejected"),
        &with_bb8_timeouts::<P>(&["PostgresEntraLoginsRejected"]),
    );
}

async fn connections_retired_fast_fires_when_sessions_are_retired_fast<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let connector = metered(&emulator, scrapes.meter());
    // An age limit of 100 ms: about ten retirements a second on each connection in use.
    let pool: P = P::build(
        PoolSpec::new(&emulator, connector)
            .size(4)
            .options(|o: SessionOptions| o.max_age(Duration::from_millis(100), Duration::ZERO)),
    )
    .await
    .unwrap();
    churn_while(&pool, &mut scrapes, 24).await;
    scrapes.assert_alerts(
        &name::<P>("retired-fast"),
        &["PostgresEntraConnectionsRetiredFast"],
    );
}

async fn pool_exhausted_fires_when_every_connection_is_held_and_checkouts_wait<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let connector = metered(&emulator, scrapes.meter());
    let pool: P = P::build(
        PoolSpec::new(&emulator, connector)
            .size(2)
            .timeout(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let held = [pool.hold().await.unwrap(), pool.hold().await.unwrap()];
    // Three checkouts wait for the two held connections.
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.hold().await.map(drop) })
        })
        .collect();
    scrapes.take(10).await;
    drop(held);
    for waiter in waiting {
        waiter.await.unwrap().unwrap();
    }
    scrapes.assert_alerts(&name::<P>("exhausted"), &["PostgresEntraPoolExhausted"]);
}

async fn checkout_timeouts_fires_when_checkouts_time_out<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let mut scrapes = Scrapes::new();
    let connector = metered(&emulator, scrapes.meter());
    let pool: P = P::build(
        PoolSpec::new(&emulator, connector)
            .size(1)
            .timeout(Duration::from_millis(100)),
    )
    .await
    .unwrap();
    // The first connect may take longer than the 100 ms a checkout waits: bb8 finishes it in the
    // background, and a later checkout gets it.
    let mut tries = 0;
    let held = loop {
        if let Ok(held) = pool.hold().await {
            break held;
        }
        tries += 1;
        assert!(tries < 100, "no connection");
    };
    let checkouts = async {
        for _ in 0..5 {
            assert!(pool.hold().await.is_err(), "the one connection is held");
        }
    };
    tokio::join!(scrapes.take(8), checkouts);
    drop(held);
    scrapes.assert_alerts(
        &name::<P>("timeouts"),
        &["PostgresEntraPoolCheckoutTimeouts"],
    );
}
