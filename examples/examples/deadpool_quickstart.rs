//! deadpool-postgres with Entra ID login: your `deadpool_postgres::Config` becomes a deadpool pool
//! whose connections log in with access tokens; connections are deadpool-postgres's own
//! `ClientWrapper`s (statement cache included).
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example deadpool_quickstart
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use postgres_entra_deadpool::{SessionOptions, create_pool};
use postgres_entra_examples::{BoxError, Target};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let target = Target::from_env(Duration::from_secs(3600))?;
    println!("connecting to {}", target.description);

    let config = target.deadpool_config(8);
    // Checks sslmode, host and cloud now.
    let pool = create_pool(&config, &target.connector, SessionOptions::new())?;
    // One login now: a wrong role or CA is reported at startup, typed.
    pool.manager().check().await?;

    // A failed checkout carries our error: `{e}` says what went wrong (token, login, TLS, ...).
    let client = pool.get().await?;
    let row = client
        .query_one(
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (user, ssl): (String, bool) = (row.get(0), row.get(1));
    println!("logged in as `{user}` (TLS: {ssl})");
    println!("token cache: {:?}", pool.manager().token_cache().stats());
    Ok(())
}
