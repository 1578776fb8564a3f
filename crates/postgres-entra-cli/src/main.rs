//! `postgres-entra doctor`, `postgres-entra token` and `postgres-entra exec`. See
//! `postgres-entra --help`.

use clap::{Args, Parser, Subcommand};
use postgres_entra_cli::settings::{CredentialKind, Server, credential_from_env};
use std::ffi::OsString;
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
    /// Runs a command (psql, pg_dump, a migration tool) with a fresh token for it alone:
    /// PGPASSWORD, PGUSER (from --user, else the token), PGSSLMODE=verify-full, PGSSLROOTCERT (the
    /// Azure roots in a private file, removed afterwards), PGHOST, PGPORT, PGDATABASE, and
    /// DATABASE_URL. Exits with the command's status (128 + N if signal N ended it); 125 when no
    /// token could be had (the doctor's first steps say why), 126/127 when the command could not
    /// be run.
    Exec(ExecOptions),
}

#[derive(Debug, Args)]
struct ExecOptions {
    #[command(flatten)]
    server: ServerOptions,
    /// Leave DATABASE_URL as it is rather than set it (tools that read only DATABASE_URL need it).
    #[arg(long)]
    no_database_url: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

#[derive(Debug, Args)]
struct Options {
    #[command(flatten)]
    server: ServerOptions,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServerOptions {
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
}

impl ServerOptions {
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
                &options.server.server(),
                credential_from_env(options.server.credential),
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
            let result = match credential_from_env(options.server.credential) {
                Ok(credential) => {
                    postgres_entra_cli::token(&options.server.server(), credential).await
                }
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
        Command::Exec(options) => exec(options).await,
    }
}

async fn exec(options: ExecOptions) -> ExitCode {
    use postgres_entra_cli::exec::{NotRun, prepare, refused_settings, run};
    let fail = |message: &str| {
        eprintln!("postgres-entra exec: {message}");
        ExitCode::from(125)
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Err(why) = refused_settings(
        var("PGSSLMODE").as_deref(),
        var("PGCHANNELBINDING").as_deref(),
    ) {
        return fail(&why);
    }
    let server = options.server.server();
    let credential = match credential_from_env(options.server.credential) {
        Ok(credential) => credential,
        Err(why) => return fail(&why),
    };
    let prepared = match prepare(&server, credential, !options.no_database_url).await {
        Ok(prepared) => prepared,
        Err(NotRun::Settings(why)) => return fail(&why),
        Err(NotRun::Token(why)) => {
            eprintln!("postgres-entra exec: no token, so the command was not run: {why}");
            let report = postgres_entra_cli::doctor::token_steps(
                &server,
                credential_from_env(options.server.credential),
            )
            .await;
            eprint!("{}", report.to_text());
            return ExitCode::from(125);
        }
    };
    match run(&options.command, &prepared).await {
        Ok(code) => ExitCode::from(code),
        Err((code, why)) => {
            eprintln!("postgres-entra exec: {why}");
            ExitCode::from(code)
        }
    }
}
