//! Where a sqlx pool's connections log in. sqlx takes its password from the pool's connect options
//! and offers no hook before a connect, so the options point at a private local socket of this
//! process, and this relay performs each login for sqlx: a token from the cache, TLS to the server
//! with the connector's roots (full verification), the role the rules give, one retry with a
//! different token when the server refuses (the login every adapter runs, `PoolCore::login`).
//! Then it passes bytes both ways. sqlx's connect options never hold a token, and sqlx's TLS and
//! its trust roots are never used.
//!
//! The socket lives in a directory only this user can open (`$XDG_RUNTIME_DIR/postgres-entra`,
//! else `postgres-entra-<uid>` in the temporary directory; an absolute path), and only this process may use it
//! (checked by the peer's credentials). Its file is removed when the pool is dropped or closed; a
//! process killed before that leaves the file, which the next pool of this user removes.
//!
//! sqlx keeps nothing beside a connection, and pings a connection before handing it out
//! (`test_before_acquire`, its default): the relay fails that ping when the connection's session is
//! due for retirement, and sqlx closes the connection and hands out another, with no callback of
//! the pool's and no round trip of its own (see [`pipe::RetireAt`]).
//!
//! The relay accepts until the pool is closed or its last handle dropped (sqlx's close event), so
//! a `sqlx::PgPool` cloned out of the adapter's pool keeps logging in.

use bytes::{Buf, BufMut, BytesMut};
use rustls::pki_types::ServerName;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_rustls::TlsConnector;

use postgres_entra::__private::{PoolCore, config_error, tls_config};
use postgres_entra::Error;

mod login;
mod pipe;

pub(crate) use crate::relay::pipe::RetireAt;

/// The start of every error the relay answers with, by which `explain` recognises it.
pub(crate) const MARKER: &str = "postgres-entra: ";

/// How long a client may take over its startup message.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);
/// PostgreSQL's own limit on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP: usize = 10_000;
/// The protocol codes of a startup packet.
const PROTOCOL_3: i32 = 196_608;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

/// Where the relay reaches the server, and how it checks it.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// A pool's relay: its socket, and the task accepting on it (which ends when told to stop,
/// or when the pool closes).
#[derive(Debug)]
pub(crate) struct Relay {
    directory: PathBuf,
    port: u16,
    stop: Arc<tokio::sync::Notify>,
}

/// A socket's file, removed when the task serving it ends, whichever way it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn socket_path(directory: &Path, port: u16) -> PathBuf {
    directory.join(format!(".s.PGSQL.{port}"))
}

/// The directory of this user's relay sockets, created private (0700) and checked to be this
/// user's own directory, not a link.
fn private_directory() -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = nix::unistd::geteuid().as_raw();
    let directory = directory_for(
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        &std::env::temp_dir(),
        uid,
    )?;
    match std::fs::DirBuilder::new().mode(0o700).create(&directory) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let metadata = std::fs::symlink_metadata(&directory)?;
    if !metadata.is_dir() || metadata.uid() != uid || metadata.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not a directory of this user's that only this user can open",
            directory.display()
        )));
    }
    Ok(directory)
}

/// Where the sockets go: `$XDG_RUNTIME_DIR/postgres-entra` when that is an absolute path (the XDG
/// base directory specification has relative paths ignored), else `postgres-entra-<uid>` in the
/// temporary directory, made absolute now: sqlx opens the socket by path, later, from whatever
/// the process's working directory is then.
fn directory_for(runtime: Option<PathBuf>, temporary: &Path, uid: u32) -> io::Result<PathBuf> {
    match runtime.filter(|runtime| runtime.is_absolute()) {
        Some(runtime) => Ok(runtime.join("postgres-entra")),
        None => std::path::absolute(temporary.join(format!("postgres-entra-{uid}"))),
    }
}

/// Removes the sockets in `directory` that nothing listens on any more (left by a process that
/// was killed): once per process.
fn sweep(directory: &Path) {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir(directory) else {
            return;
        };
        for entry in entries.flatten().take(1024) {
            let path = entry.path();
            let is_socket = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".s.PGSQL."));
            if is_socket
                && std::os::unix::net::UnixStream::connect(&path)
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    });
}

/// Binds a new socket in `directory` under a free name.
fn bind(directory: &Path) -> io::Result<(UnixListener, u16)> {
    for _ in 0..64 {
        let port = fastrand::u16(1024..);
        let path = socket_path(directory, port);
        match UnixListener::bind(&path) {
            Ok(listener) => return Ok((listener, port)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                // Another pool's, or one left by a killed process.
                if std::os::unix::net::UnixStream::connect(&path)
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
                {
                    let _ = std::fs::remove_file(&path);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free socket name after 64 tries",
    ))
}

impl Relay {
    /// Starts the relay of `core`'s pool, reaching the server at `upstream`, until told to stop
    /// ([`Relay::stop_on`]) or its runtime ends; the accepting task owns the socket's file, which
    /// goes with it. Sessions that are due end at the pings `retire_at` names.
    pub(crate) fn start(
        core: &PoolCore,
        upstream: Upstream,
        retire_at: RetireAt,
    ) -> Result<Self, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error(
                "the sqlx pool must be created within a Tokio runtime (its logins run on it)",
            )
        })?;
        let unavailable = |e: io::Error| {
            config_error(format!(
                "cannot create the sqlx pool's private login socket: {e}"
            ))
        };
        let directory = private_directory().map_err(unavailable)?;
        sweep(&directory);
        let (listener, port) = {
            let _entered = runtime.enter();
            bind(&directory).map_err(unavailable)?
        };
        let server_name = ServerName::try_from(upstream.host.clone())
            .map_err(|e| config_error(format!("the host `{}`: {e}", upstream.host)))?;
        let link = Arc::new(Link {
            core: core.clone(),
            upstream,
            server_name,
            tls: TlsConnector::from(tls_config(core.connector())),
            retire_at,
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let file = SocketFile(socket_path(&directory, port));
        runtime.spawn(accept(listener, file, link, stop.clone()));
        Ok(Self {
            directory,
            port,
            stop,
        })
    }

    /// Stops accepting when `closed` fires (the pool is closed, or gone).
    pub(crate) fn stop_on(&self, closed: sqlx::pool::CloseEvent) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            closed.await;
            stop.notify_one();
        });
    }

    /// `base` pointed at this relay: the socket, no TLS (the socket is this process's own), no
    /// password.
    pub(crate) fn options(&self, base: &PgConnectOptions) -> PgConnectOptions {
        base.clone()
            .socket(&self.directory)
            .port(self.port)
            .ssl_mode(PgSslMode::Disable)
            .password("")
    }
}

/// What every relayed connection of a pool shares.
struct Link {
    core: PoolCore,
    upstream: Upstream,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    retire_at: RetireAt,
}

/// Accepts connections from this process until told to stop (or the relay is dropped), and
/// keeps accepting after errors (a process out of file descriptors, say), pausing a little.
async fn accept(
    listener: UnixListener,
    _file: SocketFile,
    link: Arc<Link>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut pause = Duration::from_millis(10);
    let mut said = false;
    loop {
        let accepted = tokio::select! {
            () = stop.notified() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, _)) => {
                pause = Duration::from_millis(10);
                if !from_this_process(&client) {
                    continue;
                }
                tokio::spawn(serve(client, link.clone()));
            }
            Err(error) => {
                if !said {
                    said = true;
                    // A log sink that panics (the application's) must not end the accepting:
                    // the pool could never connect again.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        tracing::warn!(
                            pool = link.core.name(),
                            %error,
                            "the sqlx pool's login socket could not accept a connection; trying again"
                        );
                    }));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Whether `client` was connected by this process (or, where the platform does not say which
/// process, by this user).
fn from_this_process(client: &UnixStream) -> bool {
    match client.peer_cred() {
        Ok(peer) => match peer.pid() {
            Some(pid) => u32::try_from(pid).is_ok_and(|pid| pid == std::process::id()),
            None => peer.uid() == nix::unistd::geteuid().as_raw(),
        },
        Err(_) => false,
    }
}

/// One connection: sqlx's startup, the login, then bytes both ways.
async fn serve(mut client: UnixStream, link: Arc<Link>) {
    let parameters = match tokio::time::timeout(STARTUP_TIMEOUT, read_startup(&mut client)).await {
        Ok(Ok(Some(parameters))) => parameters,
        // A client that sent nothing usable, or took too long: nothing to answer.
        Ok(Ok(None) | Err(_)) | Err(_) => return,
    };
    let core = &link.core;
    let login = core.login(|role, entry| link.attempt(role, entry, &parameters));
    // A client that hangs up while its login runs ends it (as a dropped connect does in the
    // other adapters).
    let outcome = tokio::select! {
        outcome = login => outcome,
        () = hung_up(&client) => return,
    };
    let ((server, after_ok), session) = match outcome {
        Ok(logged_in) => logged_in,
        Err(error) => {
            let _ = client.write_all(&error_response(&error)).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    let mut greeting = BytesMut::with_capacity(after_ok.len() + 9);
    greeting.put_u8(b'R');
    greeting.put_i32(8);
    greeting.put_i32(0);
    greeting.extend_from_slice(&after_ok);
    if client.write_all(&greeting).await.is_err() {
        return;
    }
    pipe::run(client, server, &link, session).await;
}

/// Completes when the client hangs up (or sends anything before its login is answered).
async fn hung_up(client: &UnixStream) {
    let mut byte = [0u8; 1];
    loop {
        if client.readable().await.is_err() {
            return;
        }
        match client.try_read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            _ => return,
        }
    }
}

/// Reads sqlx's startup message (declining a TLS or GSS request first): its parameters, or
/// `None` for anything else.
async fn read_startup(client: &mut UnixStream) -> io::Result<Option<Vec<(String, String)>>> {
    loop {
        let length = client.read_i32().await?;
        let Some(body) = usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_sub(4))
            .filter(|l| (4..=MAX_STARTUP).contains(l))
        else {
            return Ok(None);
        };
        let mut packet = vec![0u8; body];
        client.read_exact(&mut packet).await?;
        let mut packet = &packet[..];
        match packet.get_i32() {
            SSL_REQUEST | GSSENC_REQUEST => client.write_all(b"N").await?,
            PROTOCOL_3 => return Ok(parse_parameters(packet)),
            _ => return Ok(None),
        }
    }
}

/// The `name\0value\0...\0` list of a startup message.
fn parse_parameters(mut packet: &[u8]) -> Option<Vec<(String, String)>> {
    let mut parameters = Vec::new();
    loop {
        let name = cstr(&mut packet)?;
        if name.is_empty() {
            return packet.is_empty().then_some(parameters);
        }
        let value = cstr(&mut packet)?;
        parameters.push((name, value));
    }
}

fn cstr(packet: &mut &[u8]) -> Option<String> {
    let end = packet.iter().position(|b| *b == 0)?;
    let text = String::from_utf8(packet[..end].to_vec()).ok()?;
    *packet = &packet[end + 1..];
    Some(text)
}

/// An `ErrorResponse` (FATAL) saying what went wrong, as our error says it: the SQLSTATE of a
/// refusal or of the server's error, else 08001 (the client could not connect).
fn error_response(error: &Error) -> Vec<u8> {
    let code = error.sqlstate().unwrap_or("08001").to_owned();
    let message = format!("{MARKER}{error}");
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code.as_str()),
        (b'M', message.as_str()),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.replace('\0', " ").as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut response = vec![b'E'];
    response.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    response.extend_from_slice(&fields);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::login::error_fields;

    #[test]
    fn the_socket_directory_is_an_absolute_path_whatever_the_variables_say() {
        let cwd = std::env::current_dir().unwrap();
        let tmp = Path::new("/tmp");
        for (runtime, temporary, expected) in [
            (
                Some("/run/user/7"),
                tmp,
                PathBuf::from("/run/user/7/postgres-entra"),
            ),
            // A relative XDG_RUNTIME_DIR is ignored, as the XDG specification says.
            (
                Some("run/user/7"),
                tmp,
                PathBuf::from("/tmp/postgres-entra-7"),
            ),
            (Some(""), tmp, PathBuf::from("/tmp/postgres-entra-7")),
            (None, tmp, PathBuf::from("/tmp/postgres-entra-7")),
            // A relative TMPDIR is taken from the working directory now.
            (
                None,
                Path::new("scratch"),
                cwd.join("scratch/postgres-entra-7"),
            ),
        ] {
            let directory = directory_for(runtime.map(PathBuf::from), temporary, 7).unwrap();
            assert_eq!(directory, expected, "{runtime:?} {temporary:?}");
        }
    }

    #[test]
    fn startup_parameters_and_error_fields_are_read_whole_or_not_at_all() {
        assert_eq!(
            parse_parameters(b"user\0u\0database\0d\0\0"),
            Some(vec![
                ("user".into(), "u".into()),
                ("database".into(), "d".into())
            ])
        );
        for bad in [&b"user\0u"[..], b"user\0u\0\0extra", b"\xff\0x\0\0"] {
            assert_eq!(parse_parameters(bad), None, "{bad:?}");
        }
        let (code, severity, message) =
            error_fields(b"SFATAL\0VFATAL\0C28000\0Mrole \"x\" does not exist\0\0");
        assert_eq!(code.as_deref(), Some("28000"));
        assert_eq!(severity, "FATAL");
        assert_eq!(message, "role \"x\" does not exist");
    }

    /// What a server (or anything between) sends is read without a panic, however malformed:
    /// error fields, startup parameters, and message framing at any split.
    #[test]
    fn malformed_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x7e1a);
        for _ in 0..20_000 {
            let bytes: Vec<u8> = (0..rng.usize(0..64))
                .map(|_| match rng.u8(..4) {
                    0 => 0,
                    1 => b'Z',
                    _ => rng.u8(..),
                })
                .collect();
            let _ = error_fields(&bytes);
            let _ = parse_parameters(&bytes);
            let mut framer = pipe::Framer::default();
            let split = rng.usize(..=bytes.len());
            for part in [&bytes[..split], &bytes[split..]] {
                if framer.feed(part, |_| {}).is_err() {
                    break;
                }
            }
        }
    }
}
