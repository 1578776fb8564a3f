//! Reading OpenTelemetry metrics back in tests: an SDK meter provider with the in-memory exporter,
//! collected on demand and flattened into points that are easy to query.

use opentelemetry_0_33::KeyValue;
use opentelemetry_0_33::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use std::time::Duration;

/// An SDK meter provider whose metrics a test collects when it wants (the periodic export is an
/// hour apart, so only [`MetricsReader::collect`] exports).
#[derive(Debug)]
pub struct MetricsReader {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

impl Default for MetricsReader {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsReader {
    /// A provider of its own: nothing global is touched.
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let reader = PeriodicReader::builder(exporter.clone())
            .with_interval(Duration::from_secs(3600))
            .build();
        let provider = SdkMeterProvider::builder().with_reader(reader).build();
        Self { provider, exporter }
    }

    /// A meter of this provider, to give the token cache or the connector.
    pub fn meter(&self) -> Meter {
        self.provider.meter("postgres-entra")
    }

    /// Collects every instrument now (observable ones call their callbacks) and returns the
    /// cumulative values.
    pub fn collect(&self) -> Metrics {
        self.exporter.reset();
        self.provider.force_flush().expect("metrics flush");
        let exported = self
            .exporter
            .get_finished_metrics()
            .expect("exported metrics");
        let mut points = Vec::new();
        let mut text = String::new();
        for resource in &exported {
            flatten(resource, &mut points);
            text.push_str(&format!("{resource:?}\n"));
        }
        Metrics { points, text }
    }
}

impl Drop for MetricsReader {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// One data point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The instrument's name.
    pub name: String,
    /// The instrument's unit.
    pub unit: String,
    /// The point's attributes, as text.
    pub attributes: Vec<(String, String)>,
    /// The value.
    pub value: Value,
}

/// A data point's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A counter's, up-down counter's or gauge's value.
    Number(f64),
    /// A histogram's count and sum.
    Histogram {
        /// How many values were recorded.
        count: u64,
        /// Their sum.
        sum: f64,
    },
}

impl Point {
    /// Whether the point has every attribute of `wanted`.
    pub fn has(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(k, v)| self.attributes.iter().any(|(pk, pv)| pk == k && pv == v))
    }

    /// The value of attribute `key`, if the point has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The metrics of one collection.
#[derive(Debug, Clone)]
pub struct Metrics {
    points: Vec<Point>,
    text: String,
}

impl Metrics {
    /// Every point.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// The points of instrument `name` with all the attributes of `wanted`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        wanted: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Point> + 'a {
        self.points
            .iter()
            .filter(move |p| p.name == name && p.has(wanted))
    }

    /// The sum of the values of `name`'s points matching `wanted` (0 when none).
    pub fn sum(&self, name: &str, wanted: &[(&str, &str)]) -> f64 {
        self.matching(name, wanted)
            .map(|p| match p.value {
                Value::Number(n) => n,
                Value::Histogram { sum, .. } => sum,
            })
            .sum()
    }

    /// The only value of `name` matching `wanted`, if exactly one point matches.
    pub fn value(&self, name: &str, wanted: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.matching(name, wanted);
        match (found.next(), found.next()) {
            (
                Some(Point {
                    value: Value::Number(n),
                    ..
                }),
                None,
            ) => Some(*n),
            _ => None,
        }
    }

    /// How many values the histogram `name` recorded in points matching `wanted`.
    pub fn count(&self, name: &str, wanted: &[(&str, &str)]) -> u64 {
        self.matching(name, wanted)
            .map(|p| match p.value {
                Value::Histogram { count, .. } => count,
                Value::Number(_) => 0,
            })
            .sum()
    }

    /// The names of the instruments that have points.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.points.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Everything exported, as the SDK's `Debug` shows it: names, descriptions, attributes,
    /// values and exemplars, for scans (e.g. that no token appears).
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn attributes<'a>(found: impl Iterator<Item = &'a KeyValue>) -> Vec<(String, String)> {
    found
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

fn flatten(resource: &ResourceMetrics, points: &mut Vec<Point>) {
    for scope in resource.scope_metrics() {
        for metric in scope.metrics() {
            let mut push = |attributes: Vec<(String, String)>, value: Value| {
                points.push(Point {
                    name: metric.name().to_owned(),
                    unit: metric.unit().to_owned(),
                    attributes,
                    value,
                })
            };
            match metric.data() {
                AggregatedMetrics::F64(data) => flatten_data(data, |v| v, &mut push),
                AggregatedMetrics::U64(data) => flatten_data(data, |v| v as f64, &mut push),
                AggregatedMetrics::I64(data) => flatten_data(data, |v| v as f64, &mut push),
            }
        }
    }
}

fn flatten_data<T: Copy>(
    data: &MetricData<T>,
    number: impl Fn(T) -> f64,
    push: &mut impl FnMut(Vec<(String, String)>, Value),
) {
    match data {
        MetricData::Gauge(gauge) => {
            for point in gauge.data_points() {
                push(
                    attributes(point.attributes()),
                    Value::Number(number(point.value())),
                );
            }
        }
        MetricData::Sum(sum) => {
            for point in sum.data_points() {
                push(
                    attributes(point.attributes()),
                    Value::Number(number(point.value())),
                );
            }
        }
        MetricData::Histogram(histogram) => {
            for point in histogram.data_points() {
                push(
                    attributes(point.attributes()),
                    Value::Histogram {
                        count: point.count(),
                        sum: number(point.sum()),
                    },
                );
            }
        }
        MetricData::ExponentialHistogram(histogram) => {
            for point in histogram.data_points() {
                push(
                    attributes(point.attributes()),
                    Value::Histogram {
                        count: point.count() as u64,
                        sum: number(point.sum()),
                    },
                );
            }
        }
    }
}
