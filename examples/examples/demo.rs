//! The demo behind `make demo`: starts the local Azure PostgreSQL emulator, gets an access token
//! with azure_identity's real `ClientSecretCredential` (pointed at the emulator's mock Entra), logs
//! in over verified TLS with the token as password, and reports what happened.
//!
//! Run: `make demo` (or `cargo run -p postgres-entra-examples --example demo`).

use azure_core::credentials::TokenCredential;
use postgres_entra_testkit::{Emulator, Endpoint};
use std::time::Instant;

const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    println!(
        "starting the local emulator (PostgreSQL with Entra ID login + mock Entra endpoints)..."
    );
    let emulator = Emulator::start()?;
    println!(
        "  PostgreSQL on {}:{} (TLS only, CA {}), mock Entra on {}  [{:.1?}]",
        emulator.host(),
        emulator.port(),
        emulator.ca_cert_path().display(),
        emulator.entra_url(),
        started.elapsed()
    );

    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp)?;
    let fetch = Instant::now();
    let token = credential.get_token(&[SCOPE], None).await?;
    println!(
        "got an access token for service principal `{}` from the token endpoint: {} bytes, expires {}  [{:.1?}]",
        sp.role_name,
        token.token.secret().len(),
        token.expires_on,
        fetch.elapsed()
    );

    let mut config = emulator.pg_config(&sp.role_name);
    config.password(token.token.secret());
    let connect = Instant::now();
    let (client, connection) = config.connect(emulator.tls()?).await?;
    let driver = tokio::spawn(connection);
    let row = client
        .query_one(
            "select current_user, version(), ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (user, version, ssl): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    println!(
        "logged in over TLS={ssl} as `{user}` in {:.1?}: {}",
        connect.elapsed(),
        version.split(" on ").next().unwrap_or(&version)
    );
    drop(client);
    let _ = driver.await;

    let logins = emulator.logins();
    println!(
        "summary: token requests {}, logins checked {} ({} accepted), total {:.1?}",
        emulator.requests(Endpoint::Token),
        logins.len(),
        logins.iter().filter(|l| l.outcome.is_ok()).count(),
        started.elapsed()
    );
    drop(emulator);
    println!("emulator stopped and removed");
    Ok(())
}
