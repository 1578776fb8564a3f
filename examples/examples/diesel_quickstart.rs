//! diesel-async with Entra ID login: its deadpool pool and its bb8 pool, whose new
//! `AsyncPgConnection`s log in with access tokens through one connector.
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example diesel_quickstart
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use postgres_entra_diesel::diesel_async::{AsyncPgConnection, RunQueryDsl};
use postgres_entra_diesel::{Bb8Pool, DeadpoolPool, EntraDiesel, SessionOptions, diesel};
use postgres_entra_examples::{BoxError, Target};
use std::time::Duration;

/// Who the connection is logged in as.
async fn current_user(connection: &mut AsyncPgConnection) -> Result<String, BoxError> {
    let user = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(
        "current_user::text",
    ))
    .get_result(connection)
    .await?;
    Ok(user)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let target = Target::from_env(Duration::from_secs(3600))?;
    println!("connecting to {}", target.description);

    // Checks sslmode, host and cloud now; `check()` logs in once, so that a wrong role or CA is
    // reported at startup with its reason.
    let entra = EntraDiesel::new(
        target.pg_config.clone(),
        &target.connector,
        SessionOptions::new(),
    )?;
    entra.check().await?;

    // diesel-async's deadpool pool.
    let pool = DeadpoolPool::builder(entra.manager()).max_size(8).build()?;
    let mut connection = match pool.get().await {
        Ok(connection) => connection,
        // diesel-async carries a failed connect as text: `explain` returns it typed.
        Err(error) => return Err(entra.explain(&error).map_or(error.into(), Into::into)),
    };
    println!(
        "deadpool: logged in as `{}`",
        current_user(&mut connection).await?
    );

    // A bb8 pool on the same logins (and so the same token cache).
    let bb8_pool: Bb8Pool = postgres_entra_diesel::bb8::Pool::builder()
        .max_size(8)
        .connection_timeout(Duration::from_secs(20))
        .max_lifetime(None)
        .idle_timeout(None)
        .build(entra.manager())
        .await?;
    let mut connection = match bb8_pool.get().await {
        Ok(connection) => connection,
        // bb8 reports every failed connect as `TimedOut`.
        Err(error) => return Err(entra.explain(&error).map_or(error.into(), Into::into)),
    };
    println!(
        "bb8: logged in as `{}`",
        current_user(&mut connection).await?
    );
    println!("token cache: {:?}", entra.token_cache().stats());
    Ok(())
}
