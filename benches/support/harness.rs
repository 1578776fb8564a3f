//! What every benchmark shares: the runtime, the local emulator (with a password role for the
//! static baseline), the credential and connector, and the ways of timing an operation: for
//! criterion, as samples, and paired with a baseline.

use azure_core::credentials::TokenCredential;
use postgres_entra::{
    AzureTokenSource, EntraConnector, EntraConnectorBuilder, TlsRoots, TokenCache,
};
use postgres_entra_testkit::{Emulator, Endpoint};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::recorder::Recorder;

/// The strategy every ratio compares with: a password role on the same TLS + LDAP login path.
pub(crate) const BASELINE: &str = "static password";
pub(crate) const STATIC_ROLE: &str = "bench_static";
pub(crate) const STATIC_PASSWORD: &str = "bench-static-password";
/// Below azure_identity's own 300 s refresh window, so its internal cache never answers: every
/// `get_token` of the naive strategy reaches the identity provider, as with a credential that
/// does not cache (the Azure CLI ones) or a cache miss per connect.
pub(crate) const TOKEN_LIFETIME: Duration = Duration::from_secs(240);

pub(crate) struct Bench {
    pub(crate) runtime: Runtime,
    pub(crate) emulator: Emulator,
    pub(crate) credential: Arc<dyn TokenCredential>,
    /// The connector's one token cache.
    pub(crate) cache: TokenCache,
    pub(crate) connector: EntraConnector,
    pub(crate) tls: MakeRustlsConnect,
    /// The password role's settings, password included.
    pub(crate) static_config: tokio_postgres::Config,
    /// The service principal's settings; the connector adds the token.
    pub(crate) token_config: tokio_postgres::Config,
    pub(crate) recorder: Recorder,
}

/// The median of some samples.
fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// The service principal's connector, trusting the emulator's CA.
fn connector_builder(
    emulator: &Emulator,
    credential: &Arc<dyn TokenCredential>,
) -> EntraConnectorBuilder {
    EntraConnector::builder(AzureTokenSource::new(credential.clone()))
        .role_name(emulator.service_principal().role_name)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
}

impl Bench {
    /// sqlx's connect options for the emulator's server over sqlx's own TLS (rustls,
    /// verify-full, the emulator's CA), no user yet.
    pub(crate) fn sqlx_options(&self) -> sqlx::postgres::PgConnectOptions {
        sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .host(self.emulator.host())
            .port(self.emulator.port())
            .database(self.emulator.database())
            .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
            .ssl_root_cert_from_pem(self.emulator.ca_pem().as_bytes().to_vec())
    }

    pub(crate) fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let emulator = Emulator::builder()
            .token_lifetime(TOKEN_LIFETIME)
            .start()
            .unwrap();
        runtime
            .block_on(emulator.add_password_role(STATIC_ROLE, STATIC_PASSWORD))
            .unwrap();
        let sp = emulator.service_principal();
        let credential: Arc<dyn TokenCredential> = emulator.client_secret_credential(&sp).unwrap();
        let cache = TokenCache::builder(AzureTokenSource::new(credential.clone()))
            .build()
            .unwrap();
        let connector = EntraConnector::builder_with_cache(cache.clone())
            .role_name(sp.role_name.clone())
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
            .build()
            .unwrap();
        let tls = emulator.tls().unwrap();
        let mut static_config = emulator.pg_config(STATIC_ROLE);
        static_config.password(STATIC_PASSWORD);
        let token_config = emulator.pg_config(&sp.role_name);
        Self {
            runtime,
            emulator,
            credential,
            cache,
            connector,
            tls,
            static_config,
            token_config,
            recorder: Recorder::default(),
        }
    }

    /// A connector like [`Bench::connector`] (its own token cache), to finish building.
    pub(crate) fn connector_builder(&self) -> EntraConnectorBuilder {
        connector_builder(&self.emulator, &self.credential)
    }

    /// Runs `op` `iters` times and returns the total time: criterion's `iter_custom`.
    pub(crate) fn timed<F, Fut>(&self, iters: u64, op: F) -> Duration
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        self.runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                op().await;
            }
            start.elapsed()
        })
    }

    /// `n` runs of `op`, each timed; and the identity-provider requests they made.
    async fn samples<F, Fut>(&self, n: usize, op: &F) -> (Vec<Duration>, u64)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = ()>,
    {
        let requests_before = self.provider_requests();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            op().await;
            samples.push(t.elapsed());
        }
        (samples, self.provider_requests() - requests_before)
    }

    /// Requests the mock identity provider received so far.
    pub(crate) fn provider_requests(&self) -> u64 {
        self.emulator.requests(Endpoint::Token)
    }

    /// Delays every answer of the mock identity provider by `ms` milliseconds.
    pub(crate) fn set_provider_latency(&self, ms: u64) {
        self.emulator
            .set_latency(Endpoint::Token, Duration::from_millis(ms));
    }

    /// Measures `candidate` against `baseline`, each under its strategy's name in the summary, in
    /// alternating chunks, so that drift over the run (a shared machine, sockets piling up in
    /// TIME_WAIT) weighs on both alike, and records both for the summary: the candidate's median
    /// ratio is the median of the per-round ratios of each chunk's median to the baseline chunk's
    /// beside it (with chunks of 50 or more; with smaller ones, the ratio of the medians of all
    /// samples), and its p99 ratio compares all its samples with all the baseline's.
    pub(crate) fn paired<B, BF, C, CF>(
        &self,
        operation: &str,
        (base_strategy, baseline): (&str, B),
        (strategy, candidate): (&str, C),
        rounds: usize,
        chunk: usize,
    ) where
        B: Fn() -> BF,
        BF: Future<Output = ()>,
        C: Fn() -> CF,
        CF: Future<Output = ()>,
    {
        let (mut base, mut ours, mut requests, mut base_requests) = (Vec::new(), Vec::new(), 0, 0);
        let mut round_ratios = Vec::with_capacity(rounds);
        self.runtime.block_on(async {
            // Baseline first in even rounds, candidate first in odd ones: neither always follows
            // the other.
            for round in 0..rounds {
                let (mut ours_median, mut base_median) = (Duration::ZERO, Duration::ZERO);
                for candidate_turn in [round % 2 == 1, round % 2 == 0] {
                    if candidate_turn {
                        let (s, r) = self.samples(chunk, &candidate).await;
                        ours_median = median(&s);
                        ours.extend(s);
                        requests += r;
                    } else {
                        let (s, r) = self.samples(chunk, &baseline).await;
                        base_median = median(&s);
                        base.extend(s);
                        base_requests += r;
                    }
                }
                // A round's ratio needs chunks big enough for their medians to mean something.
                if chunk >= 50 && !base_median.is_zero() {
                    round_ratios.push(ours_median.as_secs_f64() / base_median.as_secs_f64());
                }
            }
        });
        self.recorder.record(operation, base_strategy, base.clone());
        self.recorder
            .record_requests(operation, base_strategy, base_requests);
        self.recorder
            .record_paired(operation, strategy, ours, base, round_ratios);
        self.recorder.record_requests(operation, strategy, requests);
    }
}
