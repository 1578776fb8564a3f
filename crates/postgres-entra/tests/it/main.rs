//! The core against the local emulator: real PostgreSQL, real TLS, azure_identity's real
//! credentials talking to the mock Entra endpoints.

mod connect;
mod lifetimes;
mod provider_errors;
mod sharing;
mod tls;

use postgres_entra::{EntraConnector, TlsRoots, TokenSource};
use postgres_entra_testkit::Emulator;
use std::sync::Arc;

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
