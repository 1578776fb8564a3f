//! `postgres-entra doctor`, `postgres-entra token` and `postgres-entra exec`. See
//! `postgres-entra --help`.

use clap::{Args, Parser, Subcommand};
use postgres_entra_cli::settings::{CredentialKind, Server, ServerFlags, credential_from_env};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// Microsoft Entra ID login to Azure Database for PostgreSQL: check it, step by step.
///
/// Reads the same environment as the library's examples: PGHOST, PGHOSTADDR, PGPORT,
/// PGDATABASE, PGUSER, PGSSLROOTCERT for the server (an empty one is unset, as for libpq);
/// AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_FEDERATED_TOKEN_FILE,
/// IDENTITY_ENDPOINT, AZURE_MANAGED_IDENTITY for the credential (else `az login`);
/// POSTGRES_ENTRA_ALLOWED_HOSTS for hosts other than Azure's servers and loopback that a token may
/// go to. Flags override. No token or secret is ever printed.
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
    /// Runs a command (psql, pg_dump, a migration tool) with a fresh token for it alone, on one
    /// connection checked here: PGHOST, PGHOSTADDR (if given), PGPORT, PGDATABASE, PGUSER (from
    /// --user, else the token), PGPASSWORD, PGSSLMODE=verify-full, PGSSLROOTCERT (the Azure roots
    /// in a private file, removed afterwards), PGGSSENCMODE=disable and DATABASE_URL. Every other
    /// PG* variable but PGAPPNAME, PGCLIENTENCODING, PGOPTIONS, PGCONNECT_TIMEOUT, PGDATESTYLE,
    /// PGTZ, PGGEQO and PGLOCALEDIR is removed, and so are the credential's secrets
    /// (AZURE_CLIENT_SECRET, IDENTITY_HEADER, ...) unless --keep-credential-env. Exits with the
    /// command's status, or by its signal; 125 when the settings cannot work or no token could be
    /// had (the doctor's first steps say why), 126/127 when the command could not be run.
    Exec(ExecOptions),
}

#[derive(Debug, Args)]
struct ExecOptions {
    #[command(flatten)]
    server: ServerOptions,
    /// Do not set DATABASE_URL (an inherited one is removed all the same: it could name another
    /// server, which would then receive the token through PGPASSWORD).
    #[arg(long)]
    no_database_url: bool,
    /// Keep the credential's own variables (AZURE_CLIENT_SECRET, IDENTITY_HEADER, ...) in the
    /// command's environment, for a command that needs the same identity.
    #[arg(long)]
    keep_credential_env: bool,
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
    /// The server's name, as its certificate names it [default: PGHOST].
    #[arg(long)]
    host: Option<String>,
    /// An address to reach the host at (e.g. a private endpoint's), instead of resolving it
    /// [default: PGHOSTADDR].
    #[arg(long)]
    hostaddr: Option<String>,
    /// The server's port [default: PGPORT, else 5432].
    #[arg(long)]
    port: Option<String>,
    /// The database [default: PGDATABASE, else postgres].
    #[arg(long)]
    dbname: Option<String>,
    /// The role to log in as [default: PGUSER, else the name the token carries].
    #[arg(long)]
    user: Option<String>,
    /// A PEM file of CA certificates to trust instead of the Azure roots [default:
    /// PGSSLROOTCERT].
    #[arg(long)]
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
    fn server(&self) -> Result<Server, String> {
        Server::resolve(ServerFlags {
            host: self.host.clone(),
            hostaddr: self.hostaddr.clone(),
            port: self.port.clone(),
            dbname: self.dbname.clone(),
            user: self.user.clone(),
            sslrootcert: self.sslrootcert.clone(),
            scope: self.scope.clone(),
            timeout: Some(self.timeout),
        })
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("postgres-entra: {e}"),
    }
}

/// A failure before any step ran, as text or JSON.
fn failed(command: &str, json: bool, message: &str) -> ExitCode {
    if json {
        print_json(&serde_json::json!({ "error": message }));
    } else {
        eprintln!("postgres-entra {command}: {message}");
    }
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor(options) => {
            let server = match options.server.server() {
                Ok(server) => server,
                Err(e) => return failed("doctor", options.json, &e),
            };
            let report = postgres_entra_cli::doctor::run(
                &server,
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
            let result = match (
                options.server.server(),
                credential_from_env(options.server.credential),
            ) {
                (Ok(server), Ok(credential)) => {
                    postgres_entra_cli::token(&server, credential).await
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
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
                Err(e) => failed("token", options.json, &e),
            }
        }
        Command::Exec(options) => exec(options).await,
    }
}

async fn exec(options: ExecOptions) -> ExitCode {
    use postgres_entra_cli::exec::{ChildEnv, NotRun, prepare, refused_settings, run};
    let fail = |message: &str| {
        eprintln!("postgres-entra exec: {message}");
        ExitCode::from(125)
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Err(why) = refused_settings(
        var("PGSSLMODE").as_deref(),
        var("PGCHANNELBINDING").as_deref(),
        var("PGSERVICE").as_deref(),
    ) {
        return fail(&why);
    }
    let server = match options.server.server() {
        Ok(server) => server,
        Err(why) => return fail(&why),
    };
    let credential = match credential_from_env(options.server.credential) {
        Ok(credential) => credential,
        Err(why) => return fail(&why),
    };
    let child = ChildEnv {
        database_url: !options.no_database_url,
        keep_credential_env: options.keep_credential_env,
    };
    let prepared = match prepare(&server, credential, child).await {
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
    let ran = run(&options.command, &prepared).await;
    // The roots file goes before this process ends, however it ends.
    drop(prepared);
    match ran {
        Ok(ended) => ended.finish(),
        Err((code, why)) => {
            eprintln!("postgres-entra exec: {why}");
            ExitCode::from(code)
        }
    }
}
