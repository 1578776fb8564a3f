//! The core against the local emulator: real PostgreSQL, real TLS, azure_identity's real
//! credentials talking to the mock Entra endpoints.

mod connect;
mod lifetimes;
mod metrics;
mod provider_errors;
mod sharing;
mod tls;

use postgres_entra::{AccessToken, EntraConnector, FnTokenSource, TlsRoots, TokenSource};
use postgres_entra_testkit::Emulator;
use postgres_entra_testkit::{Identity, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// A connector for `emulator` trusting its CA.
pub fn connector(
    emulator: &Emulator,
    source: Arc<dyn TokenSource>,
    role: Option<&str>,
) -> EntraConnector {
    let mut builder =
        EntraConnector::builder(source).tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()));
    if let Some(role) = role {
        builder = builder.role_name(role);
    }
    builder.build().unwrap()
}

/// Connects and returns `current_user`.
pub async fn current_user(
    connector: &EntraConnector,
    config: &tokio_postgres::Config,
) -> Result<String, postgres_entra::Error> {
    let (client, connection) = connector.connect(config).await?;
    tokio::spawn(connection);
    let row = client.query_one("select current_user", &[]).await?;
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
    (source, calls)
}
