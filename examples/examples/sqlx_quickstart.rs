//! sqlx with Entra ID login: your `PgConnectOptions` and `PgPoolOptions` become a pool whose new
//! connections log in with access tokens, kept current in the pool's connect options.
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example sqlx_quickstart
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command. (sqlx has no PGHOSTADDR: the name must resolve.)

use postgres_entra_examples::{BoxError, Target};
use postgres_entra_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let target = Target::from_env(Duration::from_secs(3600))?;
    println!("connecting to {}", target.description);
    if !target.pg_config.get_hostaddrs().is_empty() {
        return Err("sqlx has no hostaddr: unset PGHOSTADDR and make PGHOST resolve".into());
    }

    let host = match target.pg_config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => return Err("a TCP host is needed".into()),
    };
    // The user's own options, as they would be loaded today; the adapter adds the token, TLS
    // verify-full with the connector's roots, and the role (here: the configured user, or the
    // token's name when it is empty).
    let options = PgConnectOptions::new_without_pgpass()
        .host(&host)
        .port(
            target
                .pg_config
                .get_ports()
                .first()
                .copied()
                .unwrap_or(5432),
        )
        .database(target.pg_config.get_dbname().unwrap_or("postgres"))
        .username(target.pg_config.get_user().unwrap_or(""));
    let pool = postgres_entra_sqlx::connect_with(
        options,
        PgPoolOptions::new()
            .max_connections(8)
            // Sessions end with their token instead, kept through an identity-provider outage.
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(20)),
        &target.connector,
        postgres_entra_sqlx::SessionOptions::new(),
    )
    .await?; // opens one connection now: a wrong role or CA is an error here

    let (user,): (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&*pool)
        .await
        .map_err(|e| match pool.explain(&e) {
            Some(why) => format!("{e}: {why}"),
            None => e.to_string(),
        })?;
    println!("logged in as `{user}`");
    println!("token cache: {:?}", pool.token_cache().stats());
    pool.close().await;
    Ok(())
}
