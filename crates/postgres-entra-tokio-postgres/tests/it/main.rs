//! The token layer and the tokio-postgres login against the local emulator: real PostgreSQL, real
//! TLS, azure_identity's real credentials talking to the mock Entra endpoints.

mod connect;
mod lifetimes;
mod metrics;
mod provider_errors;
mod sharing;
mod tls;

use postgres_entra::{AccessToken, EntraConnector, TlsRoots, TokenCache, TokenSource};
use postgres_entra_testkit::{Emulator, FnTokenSource, Identity, TestConnector, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// A connector for `emulator` trusting its CA.
pub fn connector(
    emulator: &Emulator,
    source: impl TokenSource + 'static,
    role: Option<&str>,
) -> TestConnector {
    let cache = TokenCache::builder(source).build().unwrap();
    let mut builder = EntraConnector::builder_with_cache(cache.clone())
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()));
    if let Some(role) = role {
        builder = builder.role_name(role);
    }
    TestConnector::over(builder, cache)
}

/// Connects and returns `current_user`.
pub async fn current_user(
    connector: &EntraConnector,
    config: &tokio_postgres::Config,
) -> Result<String, postgres_entra::Error> {
    let (client, connection) = postgres_entra_tokio_postgres::connect(connector, config).await?;
    tokio::spawn(connection);
    let row = client
        .query_one("select current_user", &[])
        .await
        .expect("a query on a fresh connection");
    Ok(row.get(0))
}

/// A source minting tokens from the emulator: the `n`-th call gets `options(n)`.
pub fn minting(
    emulator: &Arc<Emulator>,
    identity: Identity,
    options: fn(usize) -> TokenOptions,
) -> (Arc<dyn TokenSource>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (emulator, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new(format!("minting-{}", identity.role_name), move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let token = emulator.issue_token(&identity, options(n)).unwrap();
        async move {
            Ok(AccessToken::new(
                token,
                SystemTime::now() + Duration::from_secs(3600),
            ))
        }
    });
    (Arc::new(source), calls)
}
