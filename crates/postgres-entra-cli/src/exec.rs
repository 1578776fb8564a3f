//! `postgres-entra exec -- <command>`: runs a libpq-based or URL-based tool (psql, pg_dump,
//! migrations) with a fresh token in its environment only, the role chosen as the pools choose
//! it, and TLS verified against the Azure roots (or `PGSSLROOTCERT`).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use postgres_entra::{CacheOptions, Cloud, TokenCache, TokenSource};
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use crate::settings::{ChosenCredential, Server};

/// What a URL's user, password and path may carry unencoded (RFC 3986's unreserved characters).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// libpq's settings that `exec` refuses: the ones that would send the token without verified TLS,
/// or that cannot work with a token.
pub fn refused_settings(
    sslmode: Option<&str>,
    channel_binding: Option<&str>,
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
    Ok(())
}

/// The child's environment, and the file of trusted roots it names (removed when this is
/// dropped).
pub struct Prepared {
    /// The variables to set for the child.
    pub env: Vec<(&'static str, OsString)>,
    /// The role the token logs in as, and where the name came from.
    pub role: (String, &'static str),
    _roots: Option<tempfile::NamedTempFile>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Prepared")
            .field("variables", &names)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Why `exec` did not run the command.
#[derive(Debug)]
pub enum NotRun {
    /// The settings cannot work (plaintext, no host, a Unix socket, an app-only token without a
    /// role name).
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

/// A fresh token for `server`, and the environment that hands it to a libpq tool: `PGHOST`,
/// `PGHOSTADDR`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`, `PGSSLMODE=verify-full`,
/// `PGSSLROOTCERT` and, with `database_url`, `DATABASE_URL` (libpq's URL form).
pub async fn prepare(
    server: &Server,
    credential: ChosenCredential,
    database_url: bool,
) -> Result<Prepared, NotRun> {
    let host = server.host.clone().ok_or_else(|| {
        NotRun::Settings("no server: set PGHOST (or --host) to the server's name".to_owned())
    })?;
    if host.starts_with('/') || host.contains(',') {
        return Err(NotRun::Settings(format!(
            "PGHOST `{host}` is not one TCP host name: token login needs TLS to a named server"
        )));
    }
    let scope = server
        .scope
        .clone()
        .unwrap_or_else(|| Cloud::from_host(&host).scope().to_owned());
    let source = credential.source;
    let cache = TokenCache::builder(source.clone())
        .scope(scope)
        .options(CacheOptions::default().fetch_timeout(server.timeout))
        .build()
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
                Some((name, claim)) => (name.to_owned(), claim),
                None => {
                    return Err(NotRun::Settings(format!(
                        "the token of {} is app-only and names no role: set PGUSER (or --user) to the principal's role name (its display name)",
                        source.identity()
                    )));
                }
            }
        }
    };
    let (roots_path, roots) = match &server.sslrootcert {
        Some(path) => (path.clone(), None),
        None => {
            let file = azure_roots_file().map_err(|e| {
                NotRun::Settings(format!("could not write the Azure roots to a file: {e}"))
            })?;
            (file.path().to_path_buf(), Some(file))
        }
    };
    let mut env: Vec<(&'static str, OsString)> = vec![
        ("PGHOST", host.clone().into()),
        ("PGPORT", server.port.to_string().into()),
        ("PGDATABASE", server.dbname.clone().into()),
        ("PGUSER", role.0.clone().into()),
        ("PGPASSWORD", token.secret().into()),
        ("PGSSLMODE", "verify-full".into()),
        ("PGSSLROOTCERT", roots_path.clone().into()),
    ];
    if let Some(address) = server.hostaddr {
        env.push(("PGHOSTADDR", address.to_string().into()));
    }
    if database_url {
        env.push((
            "DATABASE_URL",
            url(&host, server, &role.0, token.secret(), &roots_path).into(),
        ));
    }
    Ok(Prepared {
        env,
        role: (role.0, role.1),
        _roots: roots,
    })
}

/// libpq's URL: `postgresql://role:token@host:port/db?sslmode=verify-full&sslrootcert=...`.
fn url(host: &str, server: &Server, role: &str, token: &str, roots: &std::path::Path) -> String {
    let encode = |s: &str| utf8_percent_encode(s, UNRESERVED).to_string();
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    format!(
        "postgresql://{}:{}@{host}:{}/{}?sslmode=verify-full&sslrootcert={}",
        encode(role),
        encode(token),
        server.port,
        encode(&server.dbname),
        encode(&roots.to_string_lossy()),
    )
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

/// How the child ended, as this process's exit status: its own code, or 128 + the signal that
/// ended it (as shells report it).
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return u8::try_from(128 + signal).unwrap_or(255);
        }
    }
    1
}

/// Runs `command` with `prepared`'s environment, forwarding SIGTERM and SIGHUP to it and
/// outliving SIGINT and SIGQUIT (see [`Signals`]), and returns its exit status. Err: it could not
/// be started (126: not executable, 127: not found).
pub async fn run(command: &[OsString], prepared: &Prepared) -> Result<u8, (u8, String)> {
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
        .envs(prepared.env.iter().map(|(k, v)| (k, v)));
    let mut child = child.spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        (code, format!("{}: {e}", PathBuf::from(program).display()))
    })?;
    let status = signals.wait_forwarding(&mut child).await;
    status
        .map(exit_code)
        .map_err(|e| (125, format!("waiting for the command: {e}")))
}

/// The signals `exec` forwards to its command (SIGTERM, SIGHUP) or outlives (SIGINT, SIGQUIT: a
/// terminal sends those to the command itself), registered so that none of them ends this process
/// before the command (and the roots file).
#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            interrupt: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn wait_forwarding(
        mut self,
        child: &mut tokio::process::Child,
    ) -> std::io::Result<std::process::ExitStatus> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let forward = |signal: Signal| {
            if let Some(pid) = pid {
                let _ = kill(pid, signal);
            }
        };
        loop {
            tokio::select! {
                status = child.wait() => return status,
                _ = self.terminate.recv() => forward(Signal::SIGTERM),
                _ = self.hangup.recv() => forward(Signal::SIGHUP),
                _ = self.interrupt.recv() => {}
                _ = self.quit.recv() => {}
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn register() -> std::io::Result<Self> {
        Ok(Self)
    }

    async fn wait_forwarding(
        self,
        child: &mut tokio::process::Child,
    ) -> std::io::Result<std::process::ExitStatus> {
        child.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_channel_binding_are_refused() {
        for mode in ["disable", "allow", "DISABLE"] {
            let error = refused_settings(Some(mode), None).unwrap_err();
            assert!(error.contains("clear text"), "{error}");
        }
        for mode in ["prefer", "require", "verify-ca", "verify-full"] {
            refused_settings(Some(mode), None).unwrap();
        }
        assert!(refused_settings(Some("sometimes"), None).is_err());
        assert!(refused_settings(None, Some("require")).is_err());
        refused_settings(None, Some("prefer")).unwrap();
    }

    #[test]
    fn the_url_encodes_what_libpq_would_misread() {
        let server = Server {
            port: 6432,
            dbname: "my db".to_owned(),
            ..Server::default()
        };
        let url = url(
            "::1",
            &server,
            "alice@contoso.com",
            "a.b-c_d",
            std::path::Path::new("/tmp/roots x.pem"),
        );
        assert_eq!(
            url,
            "postgresql://alice%40contoso.com:a.b-c_d@[::1]:6432/my%20db?sslmode=verify-full&sslrootcert=%2Ftmp%2Froots%20x.pem"
        );
    }

    #[test]
    fn exit_codes_pass_through_and_signals_read_as_shells_report_them() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(0)), 0);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(std::process::ExitStatus::from_raw(15)), 143);
    }
}
