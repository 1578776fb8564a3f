//! OpenTelemetry metrics (feature `opentelemetry_0_33`), recorded through the `opentelemetry` API
//! only: the application installs the SDK and the exporter, and with none installed every
//! instrument is a no-op.
//!
//! The token cache's instruments are under `postgres_entra.*`, with the attributes
//! `postgres_entra.identity` (the token source's readable name, never a secret) and
//! `postgres_entra.scope`; pools are recorded with the instruments OpenTelemetry's semantic
//! conventions define for database client connection pools (`db.client.connection.*`).
//! No token or secret is ever a measurement, an attribute or an exemplar.
//!
//! The OpenTelemetry API has no way to unregister a callback, so callbacks are registered once
//! per token cache and once per connector, and read the pools registered with the connector
//! through weak references: creating and dropping pools leaves nothing behind.

use opentelemetry_0_33::metrics::{Counter, Histogram, Meter};
use opentelemetry_0_33::{InstrumentationScope, KeyValue};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::error::TokenErrorKind;

/// The meter used when none is given: the global provider's, with this crate as the scope.
pub(crate) fn default_meter() -> Meter {
    opentelemetry_0_33::global::meter_with_scope(
        InstrumentationScope::builder("postgres-entra")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    )
}

/// Bucket boundaries for durations in seconds, as OpenTelemetry's semantic conventions advise for
/// duration histograms (e.g. `http.client.request.duration`); the SDK's default boundaries are
/// for milliseconds.
fn duration_boundaries() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ]
}

/// What the gauges of a token cache read from it.
pub(crate) struct Reading {
    /// Seconds until the current token stops being handed out: 0 once it has, and before the
    /// first token.
    pub(crate) time_to_expiry: f64,
    /// Seconds since the current token was received; none before the first token.
    pub(crate) age: Option<f64>,
    /// Requests failed since the last success.
    pub(crate) consecutive_failures: u64,
}

/// Reads a token cache for its gauges; `None` once the cache is gone.
pub(crate) type TokenReading = Box<dyn Fn() -> Option<Reading> + Send + Sync>;

/// How a request to the token source ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    /// A new token.
    Token,
    /// The token already held (the source's own cache answered).
    Unchanged,
    Failure(TokenErrorKind),
}

/// The token cache's instruments.
pub(crate) struct TokenMetrics {
    attributes: Arc<[KeyValue]>,
    refreshes: Counter<u64>,
    request_duration: Histogram<f64>,
    invalidations: Counter<u64>,
    login_rejections: Counter<u64>,
    login_retries: Counter<u64>,
}

impl TokenMetrics {
    pub(crate) fn new(meter: &Meter, identity: &str, scope: &str, read: TokenReading) -> Self {
        let attributes: Arc<[KeyValue]> = Arc::from([
            KeyValue::new("postgres_entra.identity", identity.to_owned()),
            KeyValue::new("postgres_entra.scope", scope.to_owned()),
        ]);
        let read = Arc::new(read);
        let (gauge_attributes, reader) = (attributes.clone(), read.clone());
        meter
            .f64_observable_gauge("postgres_entra.token.time_to_expiry")
            .with_unit("s")
            .with_description(
                "Seconds until the cached token stops being handed out (0 once it has, and before the first token)",
            )
            .with_callback(move |gauge| {
                if let Some(reading) = reader() {
                    gauge.observe(reading.time_to_expiry, &gauge_attributes);
                }
            })
            .build();
        let (gauge_attributes, reader) = (attributes.clone(), read.clone());
        meter
            .f64_observable_gauge("postgres_entra.token.age")
            .with_unit("s")
            .with_description(
                "Seconds since the cached token was received (absent before the first token)",
            )
            .with_callback(move |gauge| {
                if let Some(age) = reader().and_then(|reading| reading.age) {
                    gauge.observe(age, &gauge_attributes);
                }
            })
            .build();
        let gauge_attributes = attributes.clone();
        meter
            .u64_observable_gauge("postgres_entra.token.consecutive_failures")
            .with_unit("{request}")
            .with_description(
                "Requests to the token source failed since the last success (0 from the cache's creation)",
            )
            .with_callback(move |gauge| {
                if let Some(reading) = read() {
                    gauge.observe(reading.consecutive_failures, &gauge_attributes);
                }
            })
            .build();
        let login_rejections = meter
            .u64_counter("postgres_entra.login.rejections")
            .with_unit("{login}")
            .with_description("Logins the server refused (28000, 28P01)")
            .build();
        let login_retries = meter
            .u64_counter("postgres_entra.login.retries")
            .with_unit("{login}")
            .with_description("Logins retried with a different token after a refusal")
            .build();
        // Exported from the start, at 0: Prometheus's `increase()` sees no increase in a series'
        // first sample, so a counter born at its first refusal would hide that refusal.
        login_rejections.add(0, &attributes);
        login_retries.add(0, &attributes);
        Self {
            login_rejections,
            login_retries,
            refreshes: meter
                .u64_counter("postgres_entra.token.refreshes")
                .with_unit("{request}")
                .with_description(
                    "Requests to the token source, by outcome (success: a new token; unchanged: the token already held, from the source's own cache; failure), trigger (caller, background, rejected) and error.type",
                )
                .build(),
            request_duration: meter
                .f64_histogram("postgres_entra.token.request.duration")
                .with_unit("s")
                .with_description("How long the token source took to answer, by outcome and error.type")
                .with_boundaries(duration_boundaries())
                .build(),
            invalidations: meter
                .u64_counter("postgres_entra.token.invalidations")
                .with_unit("{token}")
                .with_description(
                    "Tokens the server rejected for which the cache asked for a different one",
                )
                .build(),
            attributes,
        }
    }

    fn with(&self, extra: &[KeyValue]) -> Vec<KeyValue> {
        self.attributes
            .iter()
            .cloned()
            .chain(extra.iter().cloned())
            .collect()
    }

    /// A request to the token source ended after `took`, with `answer`.
    pub(crate) fn request_done(&self, trigger: &'static str, took: Duration, answer: Answer) {
        let outcome = match answer {
            Answer::Token => "success",
            Answer::Unchanged => "unchanged",
            Answer::Failure(_) => "failure",
        };
        let mut attributes = self.with(&[KeyValue::new("postgres_entra.outcome", outcome)]);
        if let Answer::Failure(kind) = answer {
            attributes.push(KeyValue::new("error.type", kind.as_str()));
        }
        self.request_duration
            .record(took.as_secs_f64(), &attributes);
        attributes.push(KeyValue::new("postgres_entra.trigger", trigger));
        self.refreshes.add(1, &attributes);
    }

    pub(crate) fn invalidated(&self) {
        self.invalidations.add(1, &self.attributes);
    }

    pub(crate) fn login_rejected(&self) {
        self.login_rejections.add(1, &self.attributes);
    }

    pub(crate) fn login_retried(&self) {
        self.login_retries.add(1, &self.attributes);
    }
}

/// A pool's connections at one moment, as its adapter reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Open connections not checked out.
    pub idle: u64,
    /// Connections checked out.
    pub used: u64,
    /// The most connections the pool opens.
    pub max: u64,
    /// Checkouts waiting for a connection now, where the pool tells.
    pub pending: Option<u64>,
    /// Checkouts that timed out so far, where the pool counts them.
    pub timeouts: Option<u64>,
}

/// Reads a pool's counts; `None` once the pool is gone.
pub type PoolReader = dyn Fn() -> Option<PoolCounts> + Send + Sync;

/// What the connector's callbacks read from one pool.
pub(crate) struct Observed {
    name: KeyValue,
    reader: Mutex<Option<Weak<PoolReader>>>,
}

impl Observed {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: KeyValue::new("db.client.connection.pool.name", name.to_owned()),
            reader: Mutex::new(None),
        }
    }

    pub(crate) fn set_reader(&self, reader: Weak<PoolReader>) {
        *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
    }

    fn counts(&self) -> Option<PoolCounts> {
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        reader.upgrade()?()
    }
}

/// A pool as the connector's callbacks read it.
pub(crate) trait ObservedPool: Send + Sync {
    /// Its name and reader.
    fn observed(&self) -> &Observed;
    /// How long ago the oldest token its open connections logged in with was received.
    fn oldest_token_age(&self) -> Option<Duration>;
}

type Pools = Arc<Mutex<Vec<Weak<dyn ObservedPool>>>>;

/// The pools of one connector, and the instruments they are recorded with.
pub(crate) struct PoolTelemetry {
    pools: Pools,
    create_time: Histogram<f64>,
    retired: Counter<u64>,
}

/// The live pools of `pools`, forgetting those that are gone.
fn live(pools: &Pools) -> Vec<Arc<dyn ObservedPool>> {
    let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
    pools.retain(|pool| pool.strong_count() > 0);
    pools.iter().filter_map(Weak::upgrade).collect()
}

impl PoolTelemetry {
    pub(crate) fn new(meter: Meter) -> Self {
        let pools: Pools = Arc::default();
        let read = pools.clone();
        meter
            .i64_observable_up_down_counter("db.client.connection.count")
            .with_unit("{connection}")
            .with_description(
                "The number of connections that are currently in state described by the state attribute",
            )
            .with_callback(move |counter| {
                for pool in live(&read) {
                    if let Some(now) = pool.observed().counts() {
                        for (state, value) in [("idle", now.idle), ("used", now.used)] {
                            counter.observe(
                                value as i64,
                                &[
                                    pool.observed().name.clone(),
                                    KeyValue::new("db.client.connection.state", state),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let read = pools.clone();
        meter
            .i64_observable_up_down_counter("db.client.connection.max")
            .with_unit("{connection}")
            .with_description("The maximum number of open connections allowed")
            .with_callback(move |counter| {
                for pool in live(&read) {
                    if let Some(now) = pool.observed().counts() {
                        counter
                            .observe(now.max as i64, std::slice::from_ref(&pool.observed().name));
                    }
                }
            })
            .build();
        let read = pools.clone();
        meter
            .i64_observable_up_down_counter("db.client.connection.pending_requests")
            .with_unit("{request}")
            .with_description("The number of current pending requests for an open connection")
            .with_callback(move |counter| {
                for pool in live(&read) {
                    if let Some(pending) = pool.observed().counts().and_then(|now| now.pending) {
                        counter
                            .observe(pending as i64, std::slice::from_ref(&pool.observed().name));
                    }
                }
            })
            .build();
        let read = pools.clone();
        meter
            .u64_observable_counter("db.client.connection.timeouts")
            .with_unit("{timeout}")
            .with_description(
                "The number of connection timeouts that have occurred trying to obtain a connection from the pool",
            )
            .with_callback(move |counter| {
                for pool in live(&read) {
                    if let Some(timeouts) = pool.observed().counts().and_then(|now| now.timeouts) {
                        counter.observe(timeouts, std::slice::from_ref(&pool.observed().name));
                    }
                }
            })
            .build();
        let read = pools.clone();
        meter
            .f64_observable_gauge("postgres_entra.connection.oldest_token_age")
            .with_unit("s")
            .with_description(
                "Seconds since the oldest login token still used by an open connection was received",
            )
            .with_callback(move |gauge| {
                for pool in live(&read) {
                    if let Some(age) = pool.oldest_token_age() {
                        gauge.observe(age.as_secs_f64(), std::slice::from_ref(&pool.observed().name));
                    }
                }
            })
            .build();
        Self {
            pools,
            create_time: meter
                .f64_histogram("db.client.connection.create_time")
                .with_unit("s")
                .with_description("The time it took to create a new connection")
                .with_boundaries(duration_boundaries())
                .build(),
            retired: meter
                .u64_counter("postgres_entra.connection.retired")
                .with_unit("{connection}")
                .with_description(
                    "Connections retired because the token they logged in with expired, or because they reached their age limit",
                )
                .build(),
        }
    }

    pub(crate) fn register(&self, pool: Weak<dyn ObservedPool>) {
        // Exported from the start, at 0 (see `TokenMetrics::new`).
        if let Some(observed) = pool.upgrade() {
            self.retired
                .add(0, std::slice::from_ref(&observed.observed().name));
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|pool| pool.strong_count() > 0);
        pools.push(pool);
    }

    pub(crate) fn record_create_time(&self, pool: &Observed, took: Duration) {
        self.create_time
            .record(took.as_secs_f64(), std::slice::from_ref(&pool.name));
    }

    pub(crate) fn record_retired(&self, pool: &Observed) {
        self.retired.add(1, std::slice::from_ref(&pool.name));
    }
}
