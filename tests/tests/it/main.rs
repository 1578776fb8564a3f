//! End-to-end tests: every pool adapter against the local emulator, with azure_identity's real
//! credentials, short token lifetimes, identity-provider, server and network faults, bad input,
//! and load. The pool scenarios are written once (`scenarios.rs`) and run for each adapter
//! (`pools.rs`) that can do what they check. Every test runs with tracing at TRACE captured (log records included), and ends
//! by searching the capture for every token the emulator issued.

/// Runs each scenario in braces as a test for each pool adapter listed: one module per adapter
/// (`deadpool`, `bb8`, `sqlx`, `diesel_deadpool`, `diesel_bb8`), one test per scenario in it. After `only [pools] { scenarios }`
/// come scenarios that only some of the listed adapters run.
macro_rules! for_pools {
    ([$($pool:ident),* $(,)?] $scenarios:tt) => {
        for_pools!([$($pool),*] $scenarios only [] {});
    };
    ([$($pool:ident),* $(,)?] $scenarios:tt only $some:tt $extra:tt) => {
        $( for_pools!(@pool $pool $scenarios $some $extra); )*
    };
    (@pool deadpool $($rest:tt)*) => { for_pools!(@tests deadpool Deadpool $($rest)*); };
    (@pool bb8 $($rest:tt)*) => { for_pools!(@tests bb8 Bb8 $($rest)*); };
    (@pool sqlx $($rest:tt)*) => { for_pools!(@tests sqlx Sqlx $($rest)*); };
    (@pool diesel_deadpool $($rest:tt)*) => {
        for_pools!(@tests diesel_deadpool DieselDeadpool $($rest)*);
    };
    (@pool diesel_bb8 $($rest:tt)*) => { for_pools!(@tests diesel_bb8 DieselBb8 $($rest)*); };
    (@tests $module:ident $pool:ident $scenarios:tt [$($some:ident),* $(,)?] $extra:tt) => {
        mod $module {
            for_pools!(@each $pool $scenarios);
            $( for_pools!(@if $module $some $pool $extra); )*
        }
    };
    (@if deadpool deadpool $pool:ident $extra:tt) => { for_pools!(@each $pool $extra); };
    (@if bb8 bb8 $pool:ident $extra:tt) => { for_pools!(@each $pool $extra); };
    (@if sqlx sqlx $pool:ident $extra:tt) => { for_pools!(@each $pool $extra); };
    (@if diesel_deadpool diesel_deadpool $pool:ident $extra:tt) => {
        for_pools!(@each $pool $extra);
    };
    (@if diesel_bb8 diesel_bb8 $pool:ident $extra:tt) => { for_pools!(@each $pool $extra); };
    (@if $module:ident $other:ident $pool:ident $extra:tt) => {};
    (@each $pool:ident { $($scenario:ident),* $(,)? }) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario::<crate::pools::$pool>().await
            }
        )*
    };
}

/// Prints a figure the test measured, and records it under the test's name for `make figures`
/// (see [`record_figure`]).
macro_rules! figure {
    ($($arg:tt)*) => {
        $crate::record_figure(format!($($arg)*))
    };
}

mod alerts;
mod claims_corpus;
mod deadpool_only;
mod diesel_only;
mod docs;
mod faults;
mod from_env;
mod hosts_corpus;
mod metrics;
mod misconfiguration;
mod outages;
mod pools;
mod refresh;
mod reports;
mod scenarios;
mod secrecy;
mod sessions;
mod slow_logs;
mod sqlx_only;

use postgres_entra::{
    AzureTokenSource, CacheOptions, EntraConnector, EntraConnectorBuilder, TlsRoots, TokenCache,
};
pub use postgres_entra_testkit::TestConnector;
use postgres_entra_testkit::{Emulator, EmulatorBuilder, MetricsReader, trace_capture};
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Prints `text` and appends it, with the test's name, to `target/tmp/figures/<test>.txt`, from
/// which `make figures` writes `docs/figures.txt`: the figures docs/reliability.md quotes, each
/// checked against that file by `docs::the_figures_the_docs_quote_are_the_recorded_ones`. A
/// test's file is rewritten by its first figure of a run. Call it from the test's own thread (its
/// name is the test's).
pub fn record_figure(text: String) {
    use std::io::Write as _;
    static STARTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    println!("{text}");
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("figures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{test}.txt"));
    let first = {
        let mut started = STARTED.lock().unwrap();
        let first = !started.contains(&test);
        if first {
            started.push(test.clone());
        }
        first
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(!first)
        .truncate(first)
        .open(path)
        .unwrap();
    writeln!(file, "{test}: {text}").unwrap();
}

/// The fuzz corpus `fuzz/corpus/<target>` (at least 10 inputs) followed by `count` inputs made from
/// it by a seeded generator, as `make test` replays what `make fuzz` found: bytes replaced by or
/// inserted from `syntax`, tails cut, and runs of `syntax[0]` appended (deep nesting, long names).
pub fn fuzz_corpus_and_mutations(
    target: &str,
    seed: u64,
    syntax: &[u8],
    count: usize,
) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus at {}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    let corpus = inputs.len();
    assert!(corpus >= 10, "corpus has {corpus} inputs");
    let mut rng = fastrand::Rng::with_seed(seed);
    let pick = |rng: &mut fastrand::Rng| syntax[rng.usize(..syntax.len())];
    for _ in 0..count {
        let mut input = inputs[rng.usize(..corpus)].clone();
        for _ in 0..rng.usize(1..8) {
            match rng.u8(..4) {
                0 if !input.is_empty() => {
                    let i = rng.usize(..input.len());
                    input[i] = pick(&mut rng);
                }
                1 => {
                    let i = rng.usize(..=input.len());
                    input.insert(i, pick(&mut rng));
                }
                2 if !input.is_empty() => input.truncate(rng.usize(..input.len())),
                _ => input.extend(std::iter::repeat_n(syntax[0], rng.usize(..300))),
            }
        }
        inputs.push(input);
    }
    inputs
}

/// `duration` in milliseconds, as the docs quote it.
pub fn ms(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1000.0)
}

/// `duration` in seconds, to a tenth, as the docs quote it.
pub fn secs(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// Bytes captured so far.
pub fn captured_len() -> usize {
    trace_capture().len()
}

/// Everything captured so far, as text.
pub fn captured_text() -> String {
    trace_capture().text()
}

/// An emulator for one test, with the TRACE capture on. When the test ends (without panicking)
/// the capture is searched for every token the emulator issued: a hit fails the test.
#[derive(Debug)]
pub struct Suite {
    emulator: Emulator,
}

impl Suite {
    /// An emulator issuing tokens that live `lifetime`.
    pub async fn start(lifetime: Duration) -> Self {
        Self::with(Emulator::builder().token_lifetime(lifetime)).await
    }

    /// An emulator from `builder`.
    pub async fn with(builder: EmulatorBuilder) -> Self {
        trace_capture();
        tracing::info!("suite: starting an emulator");
        Self {
            emulator: builder.start_async().await.unwrap(),
        }
    }

    /// Searches the capture for every issued token; returns how many tokens were searched for.
    pub fn assert_no_token_in_traces(&self) -> usize {
        let text = captured_text();
        assert!(
            text.contains("suite: starting an emulator"),
            "the TRACE capture is live"
        );
        let tokens = self.emulator.issued_tokens();
        for token in &tokens {
            let signature = token.rsplit('.').next().unwrap_or(token);
            assert!(
                !text.contains(token.as_str()),
                "a token appeared in the traces"
            );
            assert!(
                !text.contains(signature),
                "a token's signature appeared in the traces"
            );
        }
        tokens.len()
    }
}

impl Deref for Suite {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        &self.emulator
    }
}

impl Drop for Suite {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_no_token_in_traces();
        }
    }
}

/// The service principal's token source for `emulator`: azure_identity's `ClientSecretCredential`,
/// a new one per request and without azure_core's own retries, as `AzureTokenSource::client_secret`
/// builds it.
pub fn service_principal_source(emulator: &Emulator) -> AzureTokenSource {
    let sp = emulator.service_principal();
    AzureTokenSource::fresh(emulator.client_secret_credentials(&sp).unwrap()).unwrap()
}

/// A connector for the service principal of `emulator`, trusting the emulator's CA, over a cache
/// the test can read.
pub fn connector(emulator: &Emulator) -> TestConnector {
    connector_with(emulator, CacheOptions::default())
}

/// [`connector`] with cache `options`.
pub fn connector_with(emulator: &Emulator, options: CacheOptions) -> TestConnector {
    let cache = service_principal_cache(emulator, options);
    TestConnector::over(
        EntraConnector::builder_with_cache(cache.clone())
            .role_name(emulator.service_principal().role_name)
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned())),
        cache,
    )
}

/// A connector for the service principal, to finish building; told nothing of the cloud, so
/// each pool's host decides the scope.
pub fn connector_builder(emulator: &Emulator) -> EntraConnectorBuilder {
    let sp = emulator.service_principal();
    EntraConnector::builder(service_principal_source(emulator))
        .role_name(sp.role_name)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
}

/// The service principal made a member of a new group named `group`, and [`connector_builder`]
/// logging in as the group: (the principal, the group, the builder). Revoked by taking the
/// principal out of the group.
pub async fn member_of_group(
    emulator: &Emulator,
    group: &str,
) -> (
    postgres_entra_testkit::Identity,
    postgres_entra_testkit::Identity,
    EntraConnectorBuilder,
) {
    let sp = emulator.service_principal();
    let readers = emulator
        .add_group(group, std::slice::from_ref(&sp))
        .await
        .unwrap();
    (sp, readers, connector_builder(emulator).role_name(group))
}

/// [`connector`] recording its metrics (and its pools') into a reader of its own.
pub fn metered_connector(emulator: &Emulator) -> (MetricsReader, EntraConnector) {
    let reader = MetricsReader::new();
    let connector = connector_builder(emulator)
        .meter(reader.meter())
        .build()
        .unwrap();
    (reader, connector)
}

/// A connector whose credential has the wrong client secret: no token can be had.
pub fn wrong_secret_connector(emulator: &Emulator) -> EntraConnector {
    let mut sp = emulator.service_principal();
    sp.client_secret = Some("wrong-secret".into());
    let credentials = emulator.client_secret_credentials(&sp).unwrap();
    EntraConnector::builder(AzureTokenSource::fresh(credentials).unwrap())
        .role_name(sp.role_name)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap()
}

/// A cache over the service principal's `ClientSecretCredential` (built, as the README
/// recommends, without azure_core's own retries), to see what the cache does with each answer of
/// the identity provider.
pub fn service_principal_cache(emulator: &Emulator, options: CacheOptions) -> TokenCache {
    TokenCache::builder(service_principal_source(emulator))
        .options(options)
        .build()
        .unwrap()
}

/// Outcome of a load run.
#[derive(Debug, Default)]
pub struct Load {
    /// Checkouts that succeeded.
    pub ok: u64,
    /// Checkouts that failed.
    pub failed: u64,
    /// What the first failure said.
    pub first_error: Option<String>,
}

/// How long [`hammer`] lets one checkout run before it counts it as hung.
const HANG: Duration = Duration::from_secs(30);

/// Runs `checkout` from `tasks` concurrent tasks until `duration` has passed.
pub async fn hammer<F, Fut>(tasks: usize, duration: Duration, checkout: F) -> Load
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let checkout = Arc::new(checkout);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (checkout, ok, failed, first_error) = (
                checkout.clone(),
                ok.clone(),
                failed.clone(),
                first_error.clone(),
            );
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    // Every pool here bounds a checkout by its timeouts (20 s at most): a
                    // checkout or query still pending after three times that is a hang, reported
                    // as a failure rather than left to the test runner's kill.
                    let outcome =
                        tokio::time::timeout(HANG, checkout())
                            .await
                            .unwrap_or_else(|_| {
                                Err(format!("a checkout or its query hung for {HANG:?}"))
                            });
                    match outcome {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let first_error = first_error.lock().unwrap().take();
    Load {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        first_error,
    }
}

/// `hammer` on `checkout_as(role)`: checkouts that log in as `role`.
pub(crate) async fn churn<P: pools::PoolUnderTest>(
    pool: &P,
    tasks: usize,
    run: Duration,
    role: &'static str,
) -> Load {
    let pool = pool.clone();
    hammer(tasks, run, move || {
        let pool = pool.clone();
        async move { pool.checkout_as(role).await }
    })
    .await
}

/// `error` and all its sources, as a reporter like anyhow's `{:#}` prints them.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// Token requests expected for `run` with tokens living `lifetime`: one per half a lifetime (the
/// refresh point), plus the cold start.
pub fn expected_requests(run: Duration, lifetime: Duration) -> std::ops::RangeInclusive<u64> {
    let refreshes = run.as_secs_f64() / (lifetime.as_secs_f64() * 0.5);
    (refreshes.floor() as u64).max(1)..=refreshes.ceil() as u64 + 2
}
