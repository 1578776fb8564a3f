//! Shared set-up for the examples: where to connect and with which credential.
//!
//! With `PGHOST` set, the examples run against that server (real Azure Database for PostgreSQL),
//! with a credential chosen from the usual variables by `postgres_entra::EnvCredential`'s rules
//! (`AzureTokenSource::from_env`):
//!
//! | variables set | credential |
//! |---|---|
//! | `AZURE_TOKEN_CREDENTIALS` | the one it names (`ManagedIdentityCredential`, `dev`, ...) |
//! | `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET` | `ClientSecretCredential` |
//! | `AZURE_FEDERATED_TOKEN_FILE` (+ tenant, client id) | `WorkloadIdentityCredential` (AKS) |
//! | `IDENTITY_ENDPOINT` with `IDENTITY_HEADER` (App Service), or `AZURE_MANAGED_IDENTITY=1` (a VM) | `ManagedIdentityCredential` (`AZURE_CLIENT_ID` picks a user-assigned one) |
//! | none of these | `DeveloperToolsCredential` (`az login` / `azd auth login`) |
//!
//! plus `PGPORT` (5432), `PGDATABASE` (postgres), `PGUSER` (the role; needed for service
//! principals), `PGHOSTADDR` (an address to reach `PGHOST` at, e.g. a private endpoint's) and
//! `PGSSLROOTCERT` (a CA file instead of the Azure roots).
//!
//! The credentials are built with `AzureTokenSource`'s constructors, as the README does: retries
//! are left to the token cache, so an identity provider's error reaches the log at once. The
//! choice is `postgres-entra doctor`'s (`postgres_entra_cli::settings`), so that the doctor checks
//! exactly what the examples do.
//!
//! Without `PGHOST`, they start the local emulator and log in as its service principal.

pub mod web;

use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots, TokenSource};
use postgres_entra_cli::settings::{Server, credential_from_env};
use postgres_entra_testkit::Emulator;
use std::env::var;
use std::sync::Arc;
use std::time::Duration;

/// A boxed error for the examples' `main`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the examples connect, and how they log in.
#[derive(Debug)]
pub struct Target {
    /// Host, port, database and (optionally) user.
    pub pg_config: tokio_postgres::Config,
    /// Tokens, TLS and role name.
    pub connector: EntraConnector,
    /// The token source behind the connector.
    pub source: Arc<dyn TokenSource>,
    /// The emulator, when running locally (stopped and removed when dropped).
    pub emulator: Option<Emulator>,
    /// One line saying what this is, for the example's output.
    pub description: String,
}

impl Target {
    /// Real Azure when `PGHOST` is set, otherwise a fresh local emulator whose tokens live
    /// `emulator_token_lifetime`.
    pub fn from_env(emulator_token_lifetime: Duration) -> Result<Self, BoxError> {
        match Self::azure_from_env()? {
            Some(target) => Ok(target),
            None => Self::emulator(emulator_token_lifetime),
        }
    }

    /// The Azure server and credential the environment names, or `None` when `PGHOST` is unset.
    pub fn azure_from_env() -> Result<Option<Self>, BoxError> {
        match var("PGHOST") {
            Ok(host) if !host.is_empty() => Self::azure(host).map(Some),
            _ => Ok(None),
        }
    }

    fn azure(host: String) -> Result<Self, BoxError> {
        // The same choices as `postgres-entra doctor` makes (crates/postgres-entra-cli).
        let chosen = credential_from_env(None)?;
        let server = Server::from_env()?;
        let pg_config = server.pg_config();
        // The cloud, and so the token scope, follows the host of the pool it serves.
        let connector = EntraConnector::builder(chosen.source.clone())
            .tls_roots(server.tls_roots())
            .build()?;
        Ok(Self {
            pg_config,
            connector,
            source: chosen.source,
            emulator: None,
            description: format!(
                "Azure server {host}, credential: {:?} ({})",
                chosen.kind, chosen.reason
            ),
        })
    }

    /// A fresh local emulator whose tokens live `token_lifetime`, and its service principal.
    pub fn emulator(token_lifetime: Duration) -> Result<Self, BoxError> {
        let emulator = Emulator::builder().token_lifetime(token_lifetime).start()?;
        let sp = emulator.service_principal();
        let source = Arc::new(AzureTokenSource::fresh(
            emulator.client_secret_credentials(&sp)?,
        )?);
        let connector = EntraConnector::builder(source.clone())
            .role_name(&sp.role_name)
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
            .build()?;
        let pg_config = emulator.server_config();
        let description = format!(
            "local emulator on {}:{} (service principal `{}`, tokens live {}s; set PGHOST to use Azure)",
            emulator.host(),
            emulator.port(),
            sp.role_name,
            token_lifetime.as_secs()
        );
        Ok(Self {
            pg_config,
            connector,
            source,
            emulator: Some(emulator),
            description,
        })
    }

    /// The same settings as a `deadpool_postgres::Config`, as a user would load from env or serde.
    pub fn deadpool_config(&self, max_size: usize) -> deadpool_postgres::Config {
        let mut config = deadpool_postgres::Config::new();
        if let Some(tokio_postgres::config::Host::Tcp(host)) = self.pg_config.get_hosts().first() {
            config.host = Some(host.clone());
        }
        config.port = self.pg_config.get_ports().first().copied();
        config.dbname = self.pg_config.get_dbname().map(str::to_owned);
        config.user = self.pg_config.get_user().map(str::to_owned);
        config.pool = Some(deadpool_postgres::PoolConfig::new(max_size));
        config
    }
}

/// Installs, as the global OpenTelemetry meter provider, an SDK provider whose metrics a
/// Prometheus registry serves; returns the registry. Call it before building connectors: they
/// take the global provider's meter when built (or give them one with `.meter(..)`).
///
/// This is the application's choice, not the library's: the library records through the
/// `opentelemetry` API only, and any exporter (OTLP, Prometheus, ...) works.
pub fn install_prometheus_metrics() -> Result<prometheus::Registry, BoxError> {
    let registry = prometheus::Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(exporter)
        .build();
    postgres_entra::opentelemetry_0_33::global::set_meter_provider(provider);
    Ok(registry)
}

/// `registry`'s metrics in the Prometheus text format, as `GET /metrics` serves them.
pub fn prometheus_text(registry: &prometheus::Registry) -> Result<String, BoxError> {
    Ok(prometheus::TextEncoder::new().encode_to_string(&registry.gather())?)
}

/// The samples of Prometheus `text` about pools and tokens, shortened for a terminal: no
/// histogram buckets, and without the scope, identity and token-scope labels every sample carries.
pub fn metrics_summary(text: &str) -> Vec<String> {
    const DROPPED: [&str; 5] = [
        "otel_scope_name",
        "otel_scope_version",
        "otel_scope_schema_url",
        "postgres_entra_identity",
        "postgres_entra_scope",
    ];
    text.lines()
        .filter(|line| {
            (line.starts_with("db_client_connection") || line.starts_with("postgres_entra"))
                && !line.contains("_bucket{")
        })
        .map(|line| {
            let Some((name, rest)) = line.split_once('{') else {
                return line.to_owned();
            };
            let Some((labels, value)) = rest.rsplit_once('}') else {
                return line.to_owned();
            };
            let kept: Vec<&str> = labels
                .split("\",")
                .map(|label| label.trim_end_matches('"'))
                .filter(|label| !DROPPED.iter().any(|d| label.starts_with(&format!("{d}="))))
                .collect();
            if kept.is_empty() {
                format!("{name}{value}")
            } else {
                format!("{name}{{{}\"}}{value}", kept.join("\","))
            }
        })
        .collect()
}
