//! `postgres-entra-emulator`: runs the local Azure Database for PostgreSQL emulator until
//! interrupted, and prints the shell lines that point an application (or the `postgres-entra`
//! tool) at it: its managed identity (App Service style, `IDENTITY_ENDPOINT` on loopback) and its
//! server, after unsetting every variable that would choose another credential (a client secret or
//! a federated token, which would reach Microsoft's real login endpoint):
//!
//! ```sh
//! eval "$(postgres-entra-emulator --token-lifetime 60 &)"   # or run it in another terminal
//! ```

use postgres_entra_testkit::{Emulator, Endpoint};
use std::time::Duration;

const USAGE: &str = "usage: postgres-entra-emulator [--token-lifetime SECONDS]

Starts a private PostgreSQL server with Entra ID token login and mock Entra endpoints on loopback,
prints `unset` and `export` lines that select its managed identity (IDENTITY_ENDPOINT,
IDENTITY_HEADER) and its server (PG*), and runs until Ctrl-C or SIGTERM, then stops the server and
removes its files.";

/// Variables that would make a credential chain choose something other than the emulator's
/// managed identity (and reach Microsoft's login endpoint), or a server other than the emulator.
const UNSET: [&str; 14] = [
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_AUTHORITY_HOST",
    "AZURE_MANAGED_IDENTITY",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "PGUSER",
    "PGHOSTADDR",
    "PGSERVICE",
    "DATABASE_URL",
];

fn parse_args() -> Result<Duration, String> {
    let mut lifetime = Duration::from_secs(3600);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--token-lifetime" => {
                let value = args
                    .next()
                    .ok_or("--token-lifetime needs a number of seconds")?;
                let secs: u64 = value.parse().map_err(|_| {
                    format!("--token-lifetime: `{value}` is not a number of seconds")
                })?;
                lifetime = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(lifetime)
}

fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let lifetime = match parse_args() {
        Ok(lifetime) => lifetime,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("postgres-entra-emulator: {message}\n");
            }
            eprintln!("{USAGE}");
            std::process::exit(if message.is_empty() { 0 } else { 2 });
        }
    };
    let emulator = match Emulator::builder()
        .token_lifetime(lifetime)
        .private_cluster()
        .start()
    {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!("postgres-entra-emulator: could not start: {e}");
            std::process::exit(1);
        }
    };
    let mi = emulator.managed_identity();
    let [endpoint, header] = emulator.app_service_env();
    let vars = [
        ("PGHOST", emulator.host().to_owned()),
        ("PGPORT", emulator.port().to_string()),
        ("PGDATABASE", emulator.database().to_owned()),
        ("PGSSLMODE", "verify-full".to_owned()),
        (
            "PGSSLROOTCERT",
            emulator.ca_cert_path().display().to_string(),
        ),
        (endpoint.0, endpoint.1),
        (header.0, header.1),
    ];
    println!(
        "# postgres-entra emulator (pid {}), tokens live {}s; its managed identity logs in as {} (the name its tokens carry)",
        std::process::id(),
        lifetime.as_secs(),
        mi.role_name,
    );
    println!("unset {}", UNSET.join(" "));
    for (name, value) in vars {
        println!("export {name}={}", shell_quote(&value));
    }

    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                eprintln!("postgres-entra-emulator: cannot listen for SIGTERM: {e}");
                std::process::exit(1);
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!(
        "postgres-entra-emulator: stopping; served {} token and {} managed-identity requests, checked {} logins",
        emulator.requests(Endpoint::Token),
        emulator.requests(Endpoint::ManagedIdentity),
        emulator.logins().len()
    );
    drop(emulator);
}
