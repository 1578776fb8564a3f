//! deadpool-postgres with Entra ID login: your `deadpool_postgres::Config` becomes a pool whose
//! connections log in with access tokens, and stays a plain `deadpool_postgres::Pool`.
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example deadpool_quickstart
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use postgres_entra_deadpool::{create_pool, entra_error};
use postgres_entra_examples::{BoxError, Target};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let target = Target::from_env(Duration::from_secs(3600))?;
    println!("connecting to {}", target.description);

    let config = target.deadpool_config(8);
    // Checks sslmode, host and cloud now; the pool is a plain deadpool_postgres::Pool.
    let pool: deadpool_postgres::Pool = create_pool(&config, target.connector.clone())?;

    let client = match pool.get().await {
        Ok(client) => client,
        Err(error) => {
            // deadpool's own message is "error communicating with the server" whatever happened;
            // the typed reason (token, login, TLS, network, ...) comes back with entra_error.
            if let Some(entra) = entra_error(&error) {
                return Err(format!("Entra ID login failed: {entra}").into());
            }
            return Err(error.into());
        }
    };
    let row = client
        .query_one(
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await?;
    let (user, ssl): (String, bool) = (row.get(0), row.get(1));
    println!("logged in as `{user}` (TLS: {ssl})");
    println!("token cache: {:?}", target.connector.cache().stats());
    Ok(())
}
