//! bb8 with Entra ID login: a connection manager whose connections log in with access tokens,
//! with bb8's own lifetime and idle timeout off (sessions end with their token) and test_on_check_out.
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example bb8_quickstart
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use postgres_entra_bb8::{EntraConnectionManager, SessionOptions};
use postgres_entra_examples::{BoxError, Target};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let target = Target::from_env(Duration::from_secs(3600))?;
    println!("connecting to {}", target.description);

    // Checks sslmode, host and cloud now; `check()` logs in once, so that a wrong role or CA is
    // reported at startup with its reason rather than as bb8's timeout.
    let manager = EntraConnectionManager::new(
        target.pg_config.clone(),
        &target.connector,
        SessionOptions::new(),
    )?;
    manager.check().await?;
    let pool = bb8::Pool::builder()
        .max_size(8)
        // Sessions end with their token (`SessionOptions::token_bound`), which keeps them while the
        // identity provider is unavailable; bb8's own lifetime and idle timeout would not.
        .max_lifetime(None)
        .idle_timeout(None)
        .test_on_check_out(true)
        .connection_timeout(Duration::from_secs(20))
        .build(manager.clone())
        .await?;

    // bb8 reports every failed connect as `TimedOut`; the manager says why.
    let client = match pool.get().await {
        Ok(client) => client,
        Err(error) => match manager.explain(&error) {
            Some(why) => return Err(why.into()),
            None => return Err(error.into()),
        },
    };
    let row = client.query_one("select current_user", &[]).await?;
    println!("logged in as `{}`", row.get::<_, String>(0));
    println!("token cache: {:?}", manager.token_cache().stats());
    Ok(())
}
