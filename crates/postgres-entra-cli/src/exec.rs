//! `postgres-entra exec -- <command>`: runs a libpq-based or URL-based tool (psql, pg_dump,
//! migrations) with a fresh token for it alone, on one explicit connection: the server resolved
//! once, by the library's own checks (one TCP host a token may go to, verified TLS), and given to
//! the command as exactly these variables, with every other libpq variable removed (services,
//! service files, host addresses and lists, TLS downgrades), and the credential's own secrets
//! removed unless asked for.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use postgres_entra::TokenSource;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::settings::{ChosenCredential, Server};

/// What a URL's user, password, host and path may carry unencoded (RFC 3986's unreserved
/// characters).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The libpq variables the command may inherit: session settings, which cannot point it at
/// another server or weaken its TLS. Every other variable whose name starts with `PG` is removed:
/// the ones libpq reads (PostgreSQL 13 to 18: libpq's "Environment Variables" page, and the
/// `PQconninfoOptions` and `EnvironmentOptions` tables of `fe-connect.c`) are `PGHOST`,
/// `PGHOSTADDR`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`, `PGPASSFILE`, `PGREQUIREAUTH`,
/// `PGCHANNELBINDING`, `PGSERVICE`, `PGSERVICEFILE`, `PGSYSCONFDIR`, `PGSSLMODE`, `PGREQUIRESSL`,
/// `PGSSLNEGOTIATION`, `PGSSLCOMPRESSION`, `PGSSLCERT`, `PGSSLKEY`, `PGSSLCERTMODE`,
/// `PGSSLROOTCERT`, `PGSSLCRL`, `PGSSLCRLDIR`, `PGSSLSNI`, `PGREQUIREPEER`,
/// `PGSSLMINPROTOCOLVERSION`, `PGSSLMAXPROTOCOLVERSION`, `PGMINPROTOCOLVERSION`,
/// `PGMAXPROTOCOLVERSION`, `PGGSSENCMODE`, `PGKRBSRVNAME`, `PGGSSLIB`, `PGGSSDELEGATION`,
/// `PGTARGETSESSIONATTRS`, `PGLOADBALANCEHOSTS` and `PGREALM`; a variable a later libpq adds goes
/// the same way.
pub const LIBPQ_KEPT: [&str; 8] = [
    "PGAPPNAME",
    "PGCLIENTENCODING",
    "PGOPTIONS",
    "PGCONNECT_TIMEOUT",
    "PGDATESTYLE",
    "PGTZ",
    "PGGEQO",
    "PGLOCALEDIR",
];

/// The credential variables that hold a secret or lead to one, removed from the command's
/// environment unless `--keep-credential-env` asks otherwise: a migration tool has no use for the
/// service's identity.
pub const CREDENTIAL_SECRETS: [&str; 12] = [
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
];

/// libpq's settings that `exec` refuses: the ones that would send the token without verified TLS,
/// that cannot work with a token, or that name a connection `exec` does not make (a service).
pub fn refused_settings(
    sslmode: Option<&str>,
    channel_binding: Option<&str>,
    service: Option<&str>,
) -> Result<(), String> {
    match sslmode.map(str::to_ascii_lowercase).as_deref() {
        Some(mode @ ("disable" | "allow")) => {
            return Err(format!(
                "PGSSLMODE={mode} would send the access token in clear text; token login requires TLS (unset PGSSLMODE: exec sets verify-full)"
            ));
        }
        Some("prefer" | "require" | "verify-ca" | "verify-full") | None => {}
        Some(other) => return Err(format!("PGSSLMODE={other} is not an sslmode")),
    }
    if channel_binding.is_some_and(|b| b.eq_ignore_ascii_case("require")) {
        return Err(
            "PGCHANNELBINDING=require cannot work with token login (the token is sent as a cleartext password inside TLS); unset it"
                .to_owned(),
        );
    }
    if let Some(service) = service {
        return Err(format!(
            "PGSERVICE={service}: exec gives the command one connection it checked itself and reads no service file; unset PGSERVICE and name the server with PGHOST, PGPORT and PGDATABASE"
        ));
    }
    Ok(())
}

/// What the command's environment is made of, besides the variables `exec` sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildEnv {
    /// Set `DATABASE_URL` (else remove an inherited one).
    pub database_url: bool,
    /// Keep the credential's own variables ([`CREDENTIAL_SECRETS`]).
    pub keep_credential_env: bool,
}

/// The command's environment, and the file of trusted roots it names (removed when this is
/// dropped).
pub struct Prepared {
    /// The command's whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// The role the token logs in as, and where the name came from.
    pub role: (String, &'static str),
    _roots: Option<tempfile::NamedTempFile>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&OsStr> = self.env.iter().map(|(name, _)| name.as_os_str()).collect();
        f.debug_struct("Prepared")
            .field("variables", &names)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Why `exec` did not run the command.
#[derive(Debug)]
pub enum NotRun {
    /// The settings cannot work (plaintext, no host, a host a token may not go to, an app-only
    /// token without a role name).
    Settings(String),
    /// No token could be had: the provider's error (the doctor's first steps say more).
    Token(String),
}

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotRun::Settings(why) | NotRun::Token(why) => f.write_str(why),
        }
    }
}

/// The one connection `exec` gives the command, resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The server's name (what TLS verifies).
    pub host: String,
    /// The address it is reached at, when given.
    pub hostaddr: Option<std::net::IpAddr>,
    /// The port.
    pub port: u16,
    /// The database.
    pub dbname: String,
    /// The role.
    pub user: String,
    /// The file of trusted roots.
    pub sslrootcert: PathBuf,
}

impl Target {
    /// The variables that give a libpq tool this connection, with `password`:
    /// `PGSSLMODE=verify-full`, and `PGGSSENCMODE=disable` (libpq otherwise tries GSS encryption
    /// before TLS when a Kerberos ticket is at hand, whatever `sslmode` says).
    fn variables(&self, password: &str) -> Vec<(&'static str, OsString)> {
        let mut variables: Vec<(&'static str, OsString)> = vec![
            ("PGHOST", self.host.clone().into()),
            ("PGPORT", self.port.to_string().into()),
            ("PGDATABASE", self.dbname.clone().into()),
            ("PGUSER", self.user.clone().into()),
            ("PGPASSWORD", password.into()),
            ("PGSSLMODE", "verify-full".into()),
            ("PGSSLROOTCERT", self.sslrootcert.clone().into()),
            ("PGGSSENCMODE", "disable".into()),
        ];
        if let Some(address) = self.hostaddr {
            variables.push(("PGHOSTADDR", address.to_string().into()));
        }
        variables
    }

    /// libpq's URL for this connection: every part percent-encoded, so that no value can end
    /// the part it is in. `hostaddr` is left to `PGHOSTADDR` (sqlx would take it for the host).
    /// `None` for a database named `.` or `..`, which URL parsers take for a path step.
    pub fn url(&self, password: &str) -> Option<String> {
        if self.dbname == "." || self.dbname == ".." {
            return None;
        }
        let encode = |s: &str| utf8_percent_encode(s, UNRESERVED).to_string();
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            encode(&self.host)
        };
        Some(format!(
            "postgresql://{}:{}@{host}:{}/{}?sslmode=verify-full&sslrootcert={}",
            encode(&self.user),
            encode(password),
            self.port,
            encode(&self.dbname),
            encode(&self.sslrootcert.to_string_lossy()),
        ))
    }
}

/// The command's environment: `parent`'s, less every libpq variable but [`LIBPQ_KEPT`], less
/// [`CREDENTIAL_SECRETS`] (unless kept) and `DATABASE_URL`, plus `set`.
pub fn child_environment(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    set: Vec<(&'static str, OsString)>,
    keep_credential_env: bool,
) -> Vec<(OsString, OsString)> {
    let removed = |name: &OsStr| {
        let name = name.to_string_lossy();
        (name.starts_with("PG") && !LIBPQ_KEPT.contains(&name.as_ref()))
            || name == "DATABASE_URL"
            || (!keep_credential_env && CREDENTIAL_SECRETS.contains(&name.as_ref()))
    };
    let mut env: Vec<(OsString, OsString)> = parent
        .into_iter()
        .filter(|(name, _)| !removed(name))
        .collect();
    env.extend(set.into_iter().map(|(name, value)| (name.into(), value)));
    env
}

/// A fresh token for `server`, and the environment that hands it, with the one connection it is
/// for, to a libpq tool (see [`Target::variables`], [`child_environment`]).
pub async fn prepare(
    server: &Server,
    credential: ChosenCredential,
    options: ChildEnv,
) -> Result<Prepared, NotRun> {
    let host = server.host.clone().ok_or_else(|| {
        NotRun::Settings("no server: set PGHOST (or --host) to the server's name".to_owned())
    })?;
    let source = credential.source;
    let connector = server
        .connector(source.clone())
        .map_err(|e| NotRun::Settings(e.to_string()))?;
    // The library's checks: one host name or address, a server a token may go to.
    let cache = connector
        .token_cache_for(&host, server.hostaddr)
        .map_err(|e| NotRun::Settings(e.to_string()))?;
    let token = cache
        .get()
        .await
        .map_err(|e| NotRun::Token(e.to_string()))?;
    let role = match &server.user {
        Some(user) => (user.clone(), "PGUSER / --user"),
        None => {
            let claims = token.claims().map_err(|e| NotRun::Token(e.to_string()))?;
            match claims.role_name() {
                Some((name, claim)) if !name.contains('\0') => (name.to_owned(), claim),
                _ => {
                    return Err(NotRun::Settings(format!(
                        "the token of {} names no role: set PGUSER (or --user) to the principal's role name (for an app-only token, its display name)",
                        source.identity()
                    )));
                }
            }
        }
    };
    let (sslrootcert, roots) = match &server.sslrootcert {
        Some(path) => (path.clone(), None),
        None => {
            let file = azure_roots_file().map_err(|e| {
                NotRun::Settings(format!("could not write the Azure roots to a file: {e}"))
            })?;
            (file.path().to_path_buf(), Some(file))
        }
    };
    let target = Target {
        host,
        hostaddr: server.hostaddr,
        port: server.port,
        dbname: server.dbname.clone(),
        user: role.0.clone(),
        sslrootcert,
    };
    let mut set = target.variables(token.secret());
    if options.database_url {
        let url = target.url(token.secret()).ok_or_else(|| {
            NotRun::Settings(format!(
                "the database `{}` cannot be named in DATABASE_URL (URL parsers take it for a path step): use --no-database-url",
                target.dbname
            ))
        })?;
        set.push(("DATABASE_URL", url.into()));
    }
    Ok(Prepared {
        env: child_environment(std::env::vars_os(), set, options.keep_credential_env),
        role,
        _roots: roots,
    })
}

/// The roots `TlsRoots::Azure` trusts, in a file only this user can read.
fn azure_roots_file() -> std::io::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new()
        .prefix("postgres-entra-roots-")
        .suffix(".pem")
        .tempfile()?;
    for (_, pem) in postgres_entra::__private::azure_roots() {
        file.write_all(pem.as_bytes())?;
    }
    file.flush()?;
    Ok(file)
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this status.
    Exited(u8),
    /// Signal N ended it: once the roots file is gone, `exec` ends by the same signal, as a shell
    /// expects of the command it ran.
    Signaled(i32),
}

impl Ended {
    /// As this process's exit status, were it to exit: the command's own, or 128 + N.
    pub fn code(self) -> u8 {
        match self {
            Ended::Exited(code) => code,
            Ended::Signaled(signal) => u8::try_from(128 + signal).unwrap_or(255),
        }
    }

    /// Ends this process as the command ended: by its signal (the default action, re-raised), or
    /// with its exit status.
    pub fn finish(self) -> std::process::ExitCode {
        #[cfg(unix)]
        if let Ended::Signaled(signal) = self {
            let _ = signal_hook::low_level::emulate_default_handler(signal);
        }
        std::process::ExitCode::from(self.code())
    }
}

fn ended(status: std::process::ExitStatus) -> Ended {
    if let Some(code) = status.code() {
        return Ended::Exited(u8::try_from(code & 0xff).unwrap_or(1));
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return Ended::Signaled(signal);
        }
    }
    Ended::Exited(1)
}

/// Runs `command` with `prepared`'s environment (only that), forwarding the signals sent to this
/// process to it (see [`forward_signals`]), and returns how it ended. Err: it could not be started
/// (126: not executable, 127: not found).
pub async fn run(command: &[OsString], prepared: &Prepared) -> Result<Ended, (u8, String)> {
    let (program, args) = command
        .split_first()
        .ok_or((125, "no command to run".to_owned()))?;
    // Before the child exists: a signal sent once it runs must find the handlers in place, not
    // end this process with the default action.
    let signals =
        Signals::register().map_err(|e| (125, format!("registering signal handlers: {e}")))?;
    let mut child = tokio::process::Command::new(program);
    child
        .args(args)
        .env_clear()
        .envs(prepared.env.iter().map(|(k, v)| (k, v)));
    let mut child = child.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        (code, format!("{}: {e}", Path::new(program).display()))
    })?;
    let forwarding = signals.forward_to(child.id());
    let status = child.wait().await;
    forwarding.stop();
    status
        .map(ended)
        .map_err(|e| (125, format!("waiting for the command: {e}")))
}

/// The signals `exec` passes on to its command. A signal the terminal sent to its whole
/// foreground group (Ctrl-C, Ctrl-\, a window resize, a hang-up: sent by the kernel) reached the
/// command already and is not sent twice; one sent to `exec` alone (`kill`, a supervisor) is
/// passed on. Job control (stop and continue) keeps its default.
#[cfg(unix)]
const FORWARDED: [i32; 10] = [
    signal_hook::consts::SIGHUP,
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGQUIT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGUSR1,
    signal_hook::consts::SIGUSR2,
    signal_hook::consts::SIGALRM,
    signal_hook::consts::SIGWINCH,
    signal_hook::consts::SIGVTALRM,
    signal_hook::consts::SIGPROF,
];

/// The handlers of [`FORWARDED`], registered before the command starts so that none of those
/// signals ends `exec` before the command (and the roots file).
#[cfg(unix)]
struct Signals(signal_hook::iterator::SignalsInfo<signal_hook::iterator::exfiltrator::WithOrigin>);

/// Passing signals on, until [`Forwarding::stop`].
#[cfg(unix)]
struct Forwarding {
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(unix)]
impl Signals {
    fn register() -> std::io::Result<Self> {
        signal_hook::iterator::SignalsInfo::new(FORWARDED).map(Self)
    }

    /// Passes each signal on to process `pid`, but those the terminal sent to the whole group.
    fn forward_to(self, pid: Option<u32>) -> Forwarding {
        use signal_hook::low_level::siginfo::Cause;
        let mut signals = self.0;
        let handle = signals.handle();
        let pid = pid
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw);
        let thread = std::thread::spawn(move || {
            for origin in signals.forever() {
                if origin.cause == Cause::Kernel {
                    continue;
                }
                if let (Some(pid), Ok(signal)) =
                    (pid, nix::sys::signal::Signal::try_from(origin.signal))
                {
                    let _ = nix::sys::signal::kill(pid, signal);
                }
            }
        });
        Forwarding {
            handle,
            thread: Some(thread),
        }
    }
}

#[cfg(unix)]
impl Forwarding {
    fn stop(mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
struct Forwarding;

#[cfg(not(unix))]
impl Signals {
    fn register() -> std::io::Result<Self> {
        Ok(Self)
    }
    fn forward_to(self, _: Option<u32>) -> Forwarding {
        Forwarding
    }
}

#[cfg(not(unix))]
impl Forwarding {
    fn stop(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_channel_binding_and_services_are_refused() {
        for mode in ["disable", "allow", "DISABLE"] {
            let error = refused_settings(Some(mode), None, None).unwrap_err();
            assert!(error.contains("clear text"), "{error}");
        }
        for mode in ["prefer", "require", "verify-ca", "verify-full"] {
            refused_settings(Some(mode), None, None).unwrap();
        }
        assert!(refused_settings(Some("sometimes"), None, None).is_err());
        assert!(refused_settings(None, Some("require"), None).is_err());
        refused_settings(None, Some("prefer"), None).unwrap();
        let error = refused_settings(None, None, Some("prod")).unwrap_err();
        assert!(error.contains("PGSERVICE"), "{error}");
    }

    fn target() -> Target {
        Target {
            host: "db.postgres.database.azure.com".to_owned(),
            hostaddr: None,
            port: 6432,
            dbname: "my db/x?y#z".to_owned(),
            user: "o'brien@contoso.com".to_owned(),
            sslrootcert: PathBuf::from("/tmp/roots x.pem"),
        }
    }

    /// `url` parsed back (RFC 3986, as libpq and sqlx read it): host, port, database, user,
    /// password and the query's settings.
    fn parse_back(url: &str) -> (String, u16, String, String, String, Vec<(String, String)>) {
        let parsed = url::Url::parse(url).unwrap();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .unwrap()
                .into_owned()
        };
        let host = parsed.host_str().unwrap();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        (
            decode(host),
            parsed.port().unwrap(),
            decode(parsed.path().strip_prefix('/').unwrap()),
            decode(parsed.username()),
            decode(parsed.password().unwrap()),
            parsed.query_pairs().into_owned().collect(),
        )
    }

    #[test]
    fn the_url_parses_back_to_the_same_target() {
        let target = target();
        let url = target.url("a.b-c_d+/=").unwrap();
        assert_eq!(
            url,
            "postgresql://o%27brien%40contoso.com:a.b-c_d%2B%2F%3D@db.postgres.database.azure.com:6432/my%20db%2Fx%3Fy%23z?sslmode=verify-full&sslrootcert=%2Ftmp%2Froots%20x.pem"
        );
        let (host, port, dbname, user, password, query) = parse_back(&url);
        assert_eq!(
            (host.as_str(), port, dbname.as_str(), user.as_str()),
            (
                target.host.as_str(),
                6432,
                target.dbname.as_str(),
                target.user.as_str()
            )
        );
        assert_eq!(password, "a.b-c_d+/=");
        assert_eq!(
            query,
            [
                ("sslmode".to_owned(), "verify-full".to_owned()),
                ("sslrootcert".to_owned(), "/tmp/roots x.pem".to_owned())
            ]
        );
        let v6 = Target {
            host: "::1".to_owned(),
            ..target
        };
        assert_eq!(parse_back(&v6.url("t").unwrap()).0, "::1");
        let dot = Target {
            dbname: "..".to_owned(),
            ..v6
        };
        assert_eq!(dot.url("t"), None);
    }

    /// Any database, role, password and roots path (the parts a user or a token names) comes
    /// back from the URL as it went in, and no part spills into another.
    #[test]
    fn any_names_parse_back_from_the_url_unchanged() {
        let alphabet: Vec<char> = "aZ09 -._~:/?#[]@!$&'()*+,;=%\"\\\n\tü€😀\u{7f}"
            .chars()
            .collect();
        let mut rng = fastrand::Rng::with_seed(27);
        let word = |rng: &mut fastrand::Rng| -> String {
            (0..rng.usize(1..24))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect()
        };
        for _ in 0..5_000 {
            let target = Target {
                host: "db.postgres.database.azure.com".to_owned(),
                hostaddr: None,
                port: rng.u16(1..),
                dbname: word(&mut rng),
                user: word(&mut rng),
                sslrootcert: PathBuf::from(word(&mut rng)),
            };
            let password = word(&mut rng);
            let Some(url) = target.url(&password) else {
                assert!(matches!(target.dbname.as_str(), "." | ".."));
                continue;
            };
            let (host, port, dbname, user, back, query) = parse_back(&url);
            assert_eq!(host, target.host, "{url}");
            assert_eq!(port, target.port, "{url}");
            assert_eq!(dbname, target.dbname, "{url}");
            assert_eq!(user, target.user, "{url}");
            assert_eq!(back, password, "{url}");
            assert_eq!(query.len(), 2, "{url}");
            assert_eq!(query[0], ("sslmode".to_owned(), "verify-full".to_owned()));
            assert_eq!(query[1].1, target.sslrootcert.to_string_lossy(), "{url}");
        }
    }

    #[test]
    fn the_child_gets_libpq_settings_from_exec_alone_and_no_credential_secret() {
        let parent: Vec<(OsString, OsString)> = [
            ("PATH", "/usr/bin"),
            ("PGSERVICE", "elsewhere"),
            ("PGSERVICEFILE", "/tmp/evil.conf"),
            ("PGSYSCONFDIR", "/tmp"),
            ("PGHOSTADDR", "::2"),
            ("PGTARGETSESSIONATTRS", "read-write"),
            ("PGREQUIRESSL", "0"),
            ("PGSSLNEGOTIATION", "direct"),
            ("PGSOMETHINGNEW", "x"),
            ("PGAPPNAME", "migrations"),
            ("PGOPTIONS", "-c search_path=app"),
            ("DATABASE_URL", "postgres://evil/db"),
            ("AZURE_CLIENT_SECRET", "s3cret"),
            ("IDENTITY_HEADER", "h"),
            ("AZURE_CLIENT_ID", "id"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let set = target().variables("token");
        let env = child_environment(parent.clone(), set, false);
        let names: Vec<String> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        let pg: Vec<&str> = names
            .iter()
            .map(String::as_str)
            .filter(|n| n.starts_with("PG"))
            .collect();
        assert_eq!(
            pg,
            [
                "PGAPPNAME",
                "PGOPTIONS",
                "PGHOST",
                "PGPORT",
                "PGDATABASE",
                "PGUSER",
                "PGPASSWORD",
                "PGSSLMODE",
                "PGSSLROOTCERT",
                "PGGSSENCMODE"
            ]
        );
        for gone in ["DATABASE_URL", "AZURE_CLIENT_SECRET", "IDENTITY_HEADER"] {
            assert!(!names.iter().any(|n| n == gone), "{gone}");
        }
        assert!(names.iter().any(|n| n == "AZURE_CLIENT_ID"));
        assert!(names.iter().any(|n| n == "PATH"));
        let kept = child_environment(parent, Vec::new(), true);
        assert!(kept.iter().any(|(k, _)| k == "AZURE_CLIENT_SECRET"));
    }

    #[test]
    fn exit_codes_pass_through_and_signals_read_as_shells_report_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            ended(std::process::ExitStatus::from_raw(7 << 8)),
            Ended::Exited(7)
        );
        assert_eq!(
            ended(std::process::ExitStatus::from_raw(0)),
            Ended::Exited(0)
        );
        // Killed by SIGTERM (15).
        let killed = ended(std::process::ExitStatus::from_raw(15));
        assert_eq!(killed, Ended::Signaled(15));
        assert_eq!(killed.code(), 143);
    }
}
