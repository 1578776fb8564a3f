//! Per-operation samples recorded during the runs, and the summary table built from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// One row of the summary: a strategy for an operation.
#[derive(Debug, Default)]
struct Row {
    samples: Vec<Duration>,
    /// Baseline samples taken alternately with this row's, for its ratios.
    paired_baseline: Vec<Duration>,
    /// Per round of alternation, this row's median ÷ the baseline's beside it.
    round_ratios: Vec<f64>,
    provider_requests: u64,
    ops: u64,
}

/// Samples by (operation, strategy), kept in the order they were first recorded.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    rows: Mutex<BTreeMap<(usize, String, String), Row>>,
    order: Mutex<Vec<(String, String)>>,
}

fn median_of(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}

/// The median and p99 of some samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figures {
    pub(crate) median: Duration,
    pub(crate) p99: Duration,
}

impl Figures {
    fn of(samples: &[Duration]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort();
        (!sorted.is_empty()).then(|| Figures {
            median: percentile(&sorted, 0.5),
            p99: percentile(&sorted, 0.99),
        })
    }
}

impl Recorder {
    fn key(&self, operation: &str, strategy: &str) -> (usize, String, String) {
        let mut order = self.order.lock().unwrap();
        let pair = (operation.to_owned(), strategy.to_owned());
        let index = order.iter().position(|p| *p == pair).unwrap_or_else(|| {
            order.push(pair);
            order.len() - 1
        });
        (index, operation.to_owned(), strategy.to_owned())
    }

    fn with_row<T>(&self, operation: &str, strategy: &str, f: impl FnOnce(&mut Row) -> T) -> T {
        let key = self.key(operation, strategy);
        f(self.rows.lock().unwrap().entry(key).or_default())
    }

    /// Adds per-operation latencies.
    pub(crate) fn record(
        &self,
        operation: &str,
        strategy: &str,
        samples: impl IntoIterator<Item = Duration>,
    ) {
        self.with_row(operation, strategy, |row| {
            let before = row.samples.len();
            row.samples.extend(samples);
            row.ops += (row.samples.len() - before) as u64;
        });
    }

    /// Adds latencies measured alternately with `baseline` ones (in chunks, so that drift over
    /// the run weighs on both alike), and each round's ratio of medians; the row's ratios compare
    /// with those.
    pub(crate) fn record_paired(
        &self,
        operation: &str,
        strategy: &str,
        samples: Vec<Duration>,
        baseline: Vec<Duration>,
        round_ratios: Vec<f64>,
    ) {
        self.record(operation, strategy, samples);
        self.with_row(operation, strategy, |row| {
            row.paired_baseline.extend(baseline);
            row.round_ratios.extend(round_ratios);
        });
    }

    /// A paired row's median ratio as the summary shows it: the median of its per-round ratios,
    /// or the ratio of its median to its paired baseline's.
    pub(crate) fn median_ratio(&self, operation: &str, strategy: &str) -> Option<f64> {
        let rows = self.rows.lock().unwrap();
        let (_, row) = rows
            .iter()
            .find(|((_, o, s), _)| o == operation && s == strategy)?;
        median_of(&row.round_ratios).or_else(|| {
            let (ours, base) = (
                Figures::of(&row.samples)?,
                Figures::of(&row.paired_baseline)?,
            );
            Some(ours.median.as_secs_f64() / base.median.as_secs_f64().max(1e-12))
        })
    }

    /// Adds identity-provider requests made during the row's operations.
    pub(crate) fn record_requests(&self, operation: &str, strategy: &str, requests: u64) {
        self.with_row(operation, strategy, |row| row.provider_requests += requests);
    }

    fn row_figures(
        &self,
        operation: &str,
        strategy: &str,
        samples: impl Fn(&Row) -> &[Duration],
    ) -> Option<Figures> {
        let rows = self.rows.lock().unwrap();
        rows.iter()
            .find(|((_, o, s), _)| o == operation && s == strategy)
            .and_then(|(_, row)| Figures::of(samples(row)))
    }

    /// Median and p99 of the baseline samples paired with a row, if it has them.
    pub(crate) fn paired_baseline(&self, operation: &str, strategy: &str) -> Option<Figures> {
        self.row_figures(operation, strategy, |row| &row.paired_baseline)
    }

    /// Median and p99 of a row, if it ran.
    pub(crate) fn figures(&self, operation: &str, strategy: &str) -> Option<Figures> {
        self.row_figures(operation, strategy, |row| &row.samples)
    }

    /// The summary as Markdown: one row per strategy, with ratios to the baseline samples taken
    /// beside it, or else to the operation's `baseline` row (the strategy measured as the
    /// physical limit in the same run).
    pub(crate) fn markdown(&self, baseline: &str, machine: &str) -> String {
        let rows = self.rows.lock().unwrap();
        let mut out = String::new();
        let _ = writeln!(out, "Measured on {machine}.\n");
        let _ = writeln!(
            out,
            "Ratios are to the {baseline} measured alternately with each row (the median ratio: the median over the rounds of alternation of each round's ratio of medians, or for rows alternating single operations the ratio of the medians), except in the metrics and token-bound rows: there, to the same pool with the feature off.\n"
        );
        let _ = writeln!(
            out,
            "| operation | strategy | median | p99 | ops/s | median ÷ baseline | p99 ÷ baseline | provider requests per 1,000 ops |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|");
        for ((_, operation, strategy), row) in rows.iter() {
            let Some(ours) = Figures::of(&row.samples) else {
                continue;
            };
            let mean_secs = row.samples.iter().map(Duration::as_secs_f64).sum::<f64>()
                / row.samples.len() as f64;
            let base = if row.paired_baseline.is_empty() {
                rows.iter()
                    .find(|((_, o, s), _)| o == operation && s == baseline)
                    .and_then(|(_, r)| Figures::of(&r.samples))
            } else {
                Figures::of(&row.paired_baseline)
            };
            let ratio = |ours: Duration, theirs: Duration| {
                if theirs.is_zero() {
                    "–".to_owned()
                } else {
                    format!("{:.3}", ours.as_secs_f64() / theirs.as_secs_f64())
                }
            };
            let (median_ratio, p99_ratio) = match (base, median_of(&row.round_ratios)) {
                (Some(base), Some(rounds)) => (format!("{rounds:.3}"), ratio(ours.p99, base.p99)),
                (Some(base), None) => (ratio(ours.median, base.median), ratio(ours.p99, base.p99)),
                (None, _) => ("–".to_owned(), "–".to_owned()),
            };
            let requests = format!(
                "{:.1}",
                row.provider_requests as f64 * 1000.0 / row.ops.max(1) as f64
            );
            let _ = writeln!(
                out,
                "| {operation} | {strategy} | {} | {} | {:.0} | {median_ratio} | {p99_ratio} | {requests} |",
                format_duration(ours.median),
                format_duration(ours.p99),
                if mean_secs > 0.0 {
                    1.0 / mean_secs
                } else {
                    0.0
                },
            );
        }
        out
    }
}
