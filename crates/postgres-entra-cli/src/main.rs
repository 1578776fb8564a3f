//! `postgres-entra doctor` and `postgres-entra token`. See `postgres-entra --help`.

use clap::{Args, Parser, Subcommand};
use postgres_entra_cli::settings::{CredentialKind, Server, credential_from_env};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Microsoft Entra ID login to Azure Database for PostgreSQL: check it, step by step.
///
/// Reads the same environment as the library's examples: PGHOST, PGHOSTADDR, PGPORT,
/// PGDATABASE, PGUSER, PGSSLROOTCERT for the server; AZURE_TENANT_ID, AZURE_CLIENT_ID,
/// AZURE_CLIENT_SECRET, AZURE_FEDERATED_TOKEN_FILE, IDENTITY_ENDPOINT, AZURE_MANAGED_IDENTITY for
/// the credential (else `az login`). Flags override. No token or secret is ever printed.
#[derive(Debug, Parser)]
#[command(name = "postgres-entra", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks the credential, the token, its claims, the role, the network, TLS, the login and a
    /// query, and says how to fix the first step that fails. Exit status 0 when all pass.
    Doctor(Options),
    /// Prints the claims of a token from the configured credential (never the token itself).
    Token(Options),
}

#[derive(Debug, Args)]
struct Options {
    /// The server's name, as its certificate names it.
    #[arg(long, env = "PGHOST")]
    host: Option<String>,
    /// An address to reach the host at (e.g. a private endpoint's), instead of resolving it.
    #[arg(long, env = "PGHOSTADDR")]
    hostaddr: Option<IpAddr>,
    /// The server's port.
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    port: u16,
    /// The database.
    #[arg(long, env = "PGDATABASE", default_value = "postgres")]
    dbname: String,
    /// The role to log in as (default: the name the token carries).
    #[arg(long, env = "PGUSER")]
    user: Option<String>,
    /// A PEM file of CA certificates to trust instead of the Azure roots.
    #[arg(long, env = "PGSSLROOTCERT")]
    sslrootcert: Option<PathBuf>,
    /// The token scope (default: the one the host's cloud needs).
    #[arg(long)]
    scope: Option<String>,
    /// The credential to use instead of the one the environment chooses.
    #[arg(long, value_enum)]
    credential: Option<CredentialKind>,
    /// Seconds each network step and the token request may take.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl Options {
    fn server(&self) -> Server {
        let non_empty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        Server {
            host: non_empty(&self.host),
            hostaddr: self.hostaddr,
            port: self.port,
            dbname: self.dbname.clone(),
            user: non_empty(&self.user),
            sslrootcert: self
                .sslrootcert
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            scope: non_empty(&self.scope),
            timeout: Duration::from_secs(self.timeout.max(1)),
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("postgres-entra: {e}"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor(options) => {
            let report = postgres_entra_cli::doctor::run(
                &options.server(),
                credential_from_env(options.credential),
            )
            .await;
            if options.json {
                print_json(&report);
            } else {
                print!("{}", report.to_text());
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Token(options) => {
            let result = match credential_from_env(options.credential) {
                Ok(credential) => postgres_entra_cli::token(&options.server(), credential).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(report) if options.json => {
                    print_json(&report);
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    print!("{}", report.to_text());
                    ExitCode::SUCCESS
                }
                Err(e) if options.json => {
                    print_json(&serde_json::json!({ "error": e }));
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("postgres-entra token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
