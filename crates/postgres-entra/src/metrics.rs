//! OpenTelemetry metrics (feature `opentelemetry`), recorded through the `opentelemetry` API only:
//! the application installs the SDK and the exporter, and with none installed every instrument is
//! a no-op.
//!
//! The token cache's instruments are under `postgres_entra.*`, with the attributes
//! `postgres_entra.identity` (the token source's readable name, never a secret) and
//! `postgres_entra.scope`. [`PoolMetrics`] gives pool adapters the instruments OpenTelemetry's
//! semantic conventions define for database client connection pools (`db.client.connection.*`).
//! No token or secret is ever a measurement, an attribute or an exemplar.

use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::{InstrumentationScope, KeyValue};
use std::sync::Arc;
use std::time::Duration;

use crate::error::TokenErrorKind;

/// The meter used when none is given: the global provider's, with this crate as the scope.
/// Install your `MeterProvider` as the global one before building connectors, or give the
/// connector a meter.
pub(crate) fn default_meter() -> Meter {
    opentelemetry::global::meter_with_scope(
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

/// What a gauge callback reads from the cache: seconds until the current token stops being
/// handed out, and its age; `None` before the first token, or once the cache is gone.
pub(crate) type TokenReading = Box<dyn Fn() -> Option<(f64, f64)> + Send + Sync>;

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
                "Seconds until the cached token stops being handed out (0 once it has; absent before the first token)",
            )
            .with_callback(move |gauge| {
                if let Some((left, _)) = reader() {
                    gauge.observe(left, &gauge_attributes);
                }
            })
            .build();
        let gauge_attributes = attributes.clone();
        meter
            .f64_observable_gauge("postgres_entra.token.age")
            .with_unit("s")
            .with_description("Seconds since the cached token was received")
            .with_callback(move |gauge| {
                if let Some((_, age)) = read() {
                    gauge.observe(age, &gauge_attributes);
                }
            })
            .build();
        Self {
            refreshes: meter
                .u64_counter("postgres_entra.token.refreshes")
                .with_unit("{request}")
                .with_description(
                    "Requests to the token source, by outcome (success, failure), trigger (caller, background, rejected) and error.type",
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
            login_rejections: meter
                .u64_counter("postgres_entra.login.rejections")
                .with_unit("{login}")
                .with_description("Logins the server refused (28000, 28P01)")
                .build(),
            login_retries: meter
                .u64_counter("postgres_entra.login.retries")
                .with_unit("{login}")
                .with_description("Logins retried with a different token after a refusal")
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

    /// A request to the token source ended after `took`: a token, or an error of `failure`.
    pub(crate) fn request_done(
        &self,
        trigger: &'static str,
        took: Duration,
        failure: Option<TokenErrorKind>,
    ) {
        let outcome = if failure.is_some() {
            "failure"
        } else {
            "success"
        };
        let mut attributes = self.with(&[KeyValue::new("postgres_entra.outcome", outcome)]);
        if let Some(kind) = failure {
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

/// The counter of connections retired because their login token expired, with the pool's name.
pub(crate) struct RetiredCounter {
    counter: Counter<u64>,
    name: KeyValue,
}

impl RetiredCounter {
    pub(crate) fn add(&self) {
        self.counter.add(1, std::slice::from_ref(&self.name));
    }
}

/// Connections of a pool at one moment, for [`PoolMetrics::observe`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    idle: u64,
    used: u64,
    max: u64,
    pending: Option<u64>,
    timeouts: Option<u64>,
}

impl PoolCounts {
    /// `idle` open connections not checked out, `used` ones checked out, and the most the pool
    /// opens.
    pub fn new(idle: u64, used: u64, max: u64) -> Self {
        Self {
            idle,
            used,
            max,
            pending: None,
            timeouts: None,
        }
    }

    /// Checkouts waiting for a connection now.
    #[must_use]
    pub fn pending(mut self, pending: u64) -> Self {
        self.pending = Some(pending);
        self
    }

    /// Checkouts that timed out so far (cumulative, from the pool's own statistics).
    #[must_use]
    pub fn timeouts(mut self, timeouts: u64) -> Self {
        self.timeouts = Some(timeouts);
        self
    }
}

/// The instruments OpenTelemetry's semantic conventions for database client connection pools
/// define (<https://opentelemetry.io/docs/specs/semconv/database/database-metrics/>), with the
/// pool's name as `db.client.connection.pool.name`; for pool adapters.
///
/// `db.client.connection.create_time` comes from [`PoolMetrics::record_create_time`];
/// `db.client.connection.count` (by `db.client.connection.state`: idle, used),
/// `db.client.connection.max`, `db.client.connection.pending_requests` and
/// `db.client.connection.timeouts` from [`PoolMetrics::observe`], read when metrics are
/// collected. Cheap to clone; clones record under the same name.
#[derive(Clone)]
pub struct PoolMetrics {
    meter: Meter,
    name: KeyValue,
    create_time: Histogram<f64>,
}

impl std::fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolMetrics")
            .field("pool_name", &self.pool_name())
            .finish_non_exhaustive()
    }
}

impl PoolMetrics {
    /// The instruments of the pool named `pool_name`, recorded with `connector`'s meter (see
    /// [`crate::EntraConnectorBuilder::meter`]).
    pub fn new(connector: &crate::EntraConnector, pool_name: impl Into<String>) -> Self {
        let meter = connector.meter().clone();
        Self {
            name: KeyValue::new("db.client.connection.pool.name", pool_name.into()),
            create_time: meter
                .f64_histogram("db.client.connection.create_time")
                .with_unit("s")
                .with_description("The time it took to create a new connection")
                .with_boundaries(duration_boundaries())
                .build(),
            meter,
        }
    }

    /// The name the conventions suggest for a pool that has none:
    /// `server.address:server.port/db.namespace`, from `config`'s first host, its port and its
    /// database (the user's name when none is set, as PostgreSQL does).
    pub fn default_name(config: &tokio_postgres::Config) -> String {
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.as_str(),
            _ => "localhost",
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let database = config
            .get_dbname()
            .or(config.get_user().filter(|user| !user.is_empty()))
            .unwrap_or("postgres");
        format!("{host}:{port}/{database}")
    }

    /// The pool's name.
    pub fn pool_name(&self) -> &str {
        match &self.name.value {
            opentelemetry::Value::String(name) => name.as_str(),
            _ => unreachable!("the pool name is a string"),
        }
    }

    /// A new connection took `took` to open, login included.
    pub fn record_create_time(&self, took: Duration) {
        self.create_time
            .record(took.as_secs_f64(), std::slice::from_ref(&self.name));
    }

    /// Records `sessions`' metrics under this pool's name: `postgres_entra.connection.retired`
    /// (connections retired because their login token expired) and
    /// `postgres_entra.connection.oldest_token_age` (seconds since the oldest login token still
    /// used by an open connection was received), until the sessions are gone.
    pub fn track(&self, sessions: &crate::Sessions) {
        sessions.count_retired_with(RetiredCounter {
            counter: self
                .meter
                .u64_counter("postgres_entra.connection.retired")
                .with_unit("{connection}")
                .with_description(
                    "Connections retired because the token they logged in with expired",
                )
                .build(),
            name: self.name.clone(),
        });
        let read = sessions.oldest_token_age_reader();
        let name = self.name.clone();
        self.meter
            .f64_observable_gauge("postgres_entra.connection.oldest_token_age")
            .with_unit("s")
            .with_description(
                "Seconds since the oldest login token still used by an open connection was received",
            )
            .with_callback(move |gauge| {
                if let Some(Some(age)) = read() {
                    gauge.observe(age.as_secs_f64(), std::slice::from_ref(&name));
                }
            })
            .build();
    }

    /// Observes the pool through `counts` each time metrics are collected, until `counts` returns
    /// `None` (the pool is gone: hold it weakly). The callbacks stay registered with the meter
    /// provider, so observe each pool once.
    pub fn observe(&self, counts: impl Fn() -> Option<PoolCounts> + Send + Sync + 'static) {
        let counts = Arc::new(counts);
        let (read, name) = (counts.clone(), self.name.clone());
        let state = |state: &'static str| {
            [
                name.clone(),
                KeyValue::new("db.client.connection.state", state),
            ]
        };
        let (idle, used) = (state("idle"), state("used"));
        self.meter
            .i64_observable_up_down_counter("db.client.connection.count")
            .with_unit("{connection}")
            .with_description(
                "The number of connections that are currently in state described by the state attribute",
            )
            .with_callback(move |counter| {
                if let Some(now) = read() {
                    counter.observe(now.idle as i64, &idle);
                    counter.observe(now.used as i64, &used);
                }
            })
            .build();
        let (read, name) = (counts.clone(), self.name.clone());
        self.meter
            .i64_observable_up_down_counter("db.client.connection.max")
            .with_unit("{connection}")
            .with_description("The maximum number of open connections allowed")
            .with_callback(move |counter| {
                if let Some(now) = read() {
                    counter.observe(now.max as i64, std::slice::from_ref(&name));
                }
            })
            .build();
        let (read, name) = (counts.clone(), self.name.clone());
        self.meter
            .i64_observable_up_down_counter("db.client.connection.pending_requests")
            .with_unit("{request}")
            .with_description("The number of current pending requests for an open connection")
            .with_callback(move |counter| {
                if let Some(pending) = read().and_then(|now| now.pending) {
                    counter.observe(pending as i64, std::slice::from_ref(&name));
                }
            })
            .build();
        let name = self.name.clone();
        self.meter
            .u64_observable_counter("db.client.connection.timeouts")
            .with_unit("{timeout}")
            .with_description(
                "The number of connection timeouts that have occurred trying to obtain a connection from the pool",
            )
            .with_callback(move |counter| {
                if let Some(timeouts) = counts().and_then(|now| now.timeouts) {
                    counter.observe(timeouts, std::slice::from_ref(&name));
                }
            })
            .build();
    }
}
