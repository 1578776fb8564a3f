//! Where a sqlx pool's connections log in. sqlx takes its password from the pool's connect options
//! and offers no hook before a connect, so the options point at a private local socket of this
//! process, and this relay performs each login for sqlx: a token from the cache, TLS to the server
//! with the connector's roots (full verification), the role the rules give, one retry with a
//! different token when the server refuses (the login every adapter runs, `PoolCore::login`).
//! Then it passes bytes both ways. sqlx's connect options never hold a token, and sqlx's TLS and
//! its trust roots are never used.
//!
//! The socket lives in a directory only this user can open (`$XDG_RUNTIME_DIR/postgres-entra`,
//! else `postgres-entra-<uid>` in the temporary directory), and only this process may use it
//! (checked by the peer's credentials). Its file is removed when the pool is dropped or closed; a
//! process killed before that leaves the file, which the next pool of this user removes.
//!
//! sqlx keeps nothing beside a connection, so the pool's `before_acquire` and `after_release` ask
//! the relay whether a connection's session is due for retirement with an in-band query carrying
//! the relay's nonce, which the relay answers itself, without a round trip to the server.

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use postgres_entra::__private::{
    Attempt, Entry, PoolCore, Session, config_error, connect_error, postgres_error, tls_config,
    tls_declined, tls_error,
};
use postgres_entra::Error;

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
/// The longest message the relay reads whole while logging in (PostgreSQL's own messages at
/// login are small; an error is a few hundred bytes).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;
const BUFFER: usize = 32 * 1024;

/// Where the relay reaches the server, and how it checks it.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// A pool's relay: its socket, and the task accepting on it (which ends when this is dropped,
/// or when the pool closes).
#[derive(Debug)]
pub(crate) struct Relay {
    directory: PathBuf,
    port: u16,
    question: Arc<str>,
    accepting: tokio::task::AbortHandle,
    stop: Arc<tokio::sync::Notify>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accepting.abort();
        let _ = std::fs::remove_file(socket_path(&self.directory, self.port));
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
    let directory = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("postgres-entra"),
        None => std::env::temp_dir().join(format!("postgres-entra-{uid}")),
    };
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
    /// Starts the relay of `core`'s pool, reaching the server at `upstream`, until it is dropped
    /// (or told to stop with [`Relay::stop_on`]).
    pub(crate) fn start(core: &PoolCore, upstream: Upstream) -> Result<Self, Error> {
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
            nonce: format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        });
        let question = due_query(&link.nonce).into();
        let stop = Arc::new(tokio::sync::Notify::new());
        let accepting = runtime.spawn(accept(listener, link, stop.clone()));
        Ok(Self {
            directory,
            port,
            question,
            accepting: accepting.abort_handle(),
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

    /// The query by which a pool's callback asks whether its connection's session is due.
    pub(crate) fn due_query(&self) -> Arc<str> {
        self.question.clone()
    }
}

fn due_query(nonce: &str) -> String {
    format!("/* postgres-entra: is this session due for retirement? {nonce} */")
}

/// What every relayed connection of a pool shares.
struct Link {
    core: PoolCore,
    upstream: Upstream,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    nonce: String,
}

/// Accepts connections from this process until told to stop (or the relay is dropped), and
/// keeps accepting after errors (a process out of file descriptors, say), pausing a little.
async fn accept(listener: UnixListener, link: Arc<Link>, stop: Arc<tokio::sync::Notify>) {
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
                    tracing::warn!(
                        pool = link.core.name(),
                        %error,
                        "the sqlx pool's login socket could not accept a connection; trying again"
                    );
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
    let status = after_ok
        .last()
        .copied()
        .filter(|_| after_ok.len() >= 6)
        .unwrap_or(b'I');
    pipe(client, server, &link, session, status).await;
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

/// The server's end of a relayed connection.
type Server = TlsStream<TcpStream>;

/// A whole message read while logging in: its type and body.
async fn read_message(server: &mut Server) -> io::Result<(u8, BytesMut)> {
    let tag = server.read_u8().await?;
    let length = server.read_i32().await?;
    let body = usize::try_from(length)
        .ok()
        .and_then(|l| l.checked_sub(4))
        .filter(|l| *l <= MAX_LOGIN_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a malformed message"))?;
    let mut message = BytesMut::zeroed(body);
    server.read_exact(&mut message).await?;
    Ok((tag, message))
}

/// The fields of an `ErrorResponse` body: (code, severity, message).
fn error_fields(mut body: &[u8]) -> (Option<String>, String, String) {
    let (mut code, mut severity, mut message) = (None, String::new(), String::new());
    while let Some((&tag, rest)) = body.split_first() {
        if tag == 0 {
            break;
        }
        body = rest;
        let Some(value) = cstr(&mut body) else {
            break;
        };
        match tag {
            b'C' => code = Some(value),
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, severity, message)
}

impl Link {
    fn targets(&self) -> String {
        format!("{}:{}", self.upstream.host, self.upstream.port)
    }

    /// One login as `role` with `entry`'s token: TCP, TLS, the startup with sqlx's parameters
    /// (its user replaced by the role), the password exchange. Logged in: the TLS stream and what
    /// the server sent after `AuthenticationOk`, up to and including `ReadyForQuery`.
    async fn attempt(
        &self,
        role: String,
        entry: Arc<Entry>,
        parameters: &[(String, String)],
    ) -> Attempt<(Server, BytesMut)> {
        let mut server = match self.open().await {
            Ok(server) => server,
            Err(error) => return Attempt::Failed(error),
        };
        match self
            .authenticate(&mut server, &role, &entry, parameters)
            .await
        {
            Ok(Ok(after_ok)) => Attempt::LoggedIn((server, after_ok)),
            Ok(Err(refused)) => refused,
            Err(error) => Attempt::Failed(connect_error(
                self.targets(),
                format!("the connection broke during the login: {error}"),
            )),
        }
    }

    /// TCP to the server, then TLS (declined: an error, and no token is sent).
    async fn open(&self) -> Result<Server, Error> {
        let Upstream { host, port } = &self.upstream;
        let network = |e: io::Error| connect_error(self.targets(), e.to_string());
        let mut tcp = TcpStream::connect((host.as_str(), *port))
            .await
            .map_err(network)?;
        let _ = tcp.set_nodelay(true);
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await.map_err(network)?;
        match tcp.read_u8().await.map_err(network)? {
            b'S' => {}
            b'N' => return Err(tls_declined()),
            _ => {
                return Err(tls_error(
                    "the server answered the TLS request with something else than yes or no",
                ));
            }
        }
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(tls) => tls_error(format!(
                    "{tls}; the server's certificate must chain to a trusted root (TlsRoots) and name the host you connect to"
                )),
                None => connect_error(self.targets(), format!("during the TLS handshake: {e}")),
            })
    }

    /// The startup and the password exchange. `Ok(Err(..))`: the server refused (or failed) the
    /// login.
    async fn authenticate(
        &self,
        server: &mut Server,
        role: &str,
        entry: &Entry,
        parameters: &[(String, String)],
    ) -> io::Result<Result<BytesMut, Attempt<(Server, BytesMut)>>> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut out = BytesMut::new();
        let startup = parameters
            .iter()
            .filter(|(name, _)| name != "user")
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .chain([("user", role)]);
        frontend::startup_message(startup, &mut out)?;
        server.write_all(&out).await?;
        let password = entry.secret().as_bytes();
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, mut body) = read_message(server).await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(invalid("a malformed authentication request"));
                    }
                    out.clear();
                    match body.get_i32() {
                        0 => break,
                        3 => frontend::password_message(password, &mut out)?,
                        5 if body.len() >= 4 => {
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = md5_hash(role.as_bytes(), password, salt);
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        10 => {
                            let offered = body[..]
                                .split(|b| *b == 0)
                                .any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offered {
                                return Err(invalid(
                                    "the server offers no SASL mechanism this relay supports",
                                ));
                            }
                            let exchange =
                                ScramSha256::new(password, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                SCRAM_SHA_256,
                                exchange.message(),
                                &mut out,
                            )?;
                            scram = Some(exchange);
                        }
                        11 => {
                            let exchange = scram
                                .as_mut()
                                .ok_or_else(|| invalid("an unexpected SASL message"))?;
                            exchange.update(&body)?;
                            frontend::sasl_response(exchange.message(), &mut out)?;
                        }
                        12 => {
                            let exchange = scram
                                .as_mut()
                                .ok_or_else(|| invalid("an unexpected SASL message"))?;
                            exchange.finish(&body)?;
                            continue;
                        }
                        other => {
                            return Ok(Err(Attempt::Failed(postgres_error(
                                None,
                                format!(
                                    "the server asked for an authentication method this relay does not support ({other})"
                                ),
                            ))));
                        }
                    }
                    server.write_all(&out).await?;
                }
                b'E' => {
                    let (code, severity, message) = error_fields(&body);
                    return Ok(Err(match code.as_deref() {
                        Some(code @ ("28000" | "28P01")) => Attempt::Refused {
                            code: code.to_owned(),
                            message,
                        },
                        code => {
                            Attempt::Failed(postgres_error(code, format!("{severity}: {message}")))
                        }
                    }));
                }
                b'N' => {}
                _ => return Err(invalid("an unexpected message during the login")),
            }
        }
        // After AuthenticationOk: parameters, the backend key, notices, then ReadyForQuery.
        let mut after_ok = BytesMut::new();
        loop {
            let (tag, body) = read_message(server).await?;
            if tag == b'E' {
                let (code, severity, message) = error_fields(&body);
                return Ok(Err(Attempt::Failed(postgres_error(
                    code.as_deref(),
                    format!("{severity}: {message}"),
                ))));
            }
            after_ok.put_u8(tag);
            after_ok.put_i32(body.len() as i32 + 4);
            after_ok.extend_from_slice(&body);
            if tag == b'Z' {
                return Ok(Ok(after_ok));
            }
        }
    }
}

/// What both directions of a relayed connection share.
struct Flow {
    /// `ReadyForQuery` messages the server still owes (one per simple query, sync or function
    /// call sent).
    owed: AtomicI64,
    /// The client sent extended-protocol messages not yet followed by a sync.
    unsynced: AtomicBool,
    /// The transaction status of the last `ReadyForQuery`.
    status: AtomicU8,
}

/// Walks a byte stream of messages, message by message, across reads.
#[derive(Default)]
struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    tag: u8,
}

/// What the framer found at a point of the stream.
enum Found {
    /// A message of type `tag` and body length `length` starts here (its header ends at `at`).
    Start { tag: u8, length: usize, at: usize },
    /// A message's body byte at `at` (only the first is reported: the status of `Z`).
    FirstByte { tag: u8, at: usize },
    /// The message in progress ends at `at`.
    End { tag: u8, at: usize },
}

impl Framer {
    /// Feeds `chunk`, calling `found` for each message start, first body byte and end.
    fn feed(&mut self, chunk: &[u8], mut found: impl FnMut(Found)) -> io::Result<()> {
        let mut i = 0;
        while i < chunk.len() {
            if self.remaining == 0 && self.have < 5 {
                let take = (5 - self.have).min(chunk.len() - i);
                self.header[self.have..self.have + take].copy_from_slice(&chunk[i..i + take]);
                self.have += take;
                i += take;
                if self.have == 5 {
                    self.tag = self.header[0];
                    let length = i32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    let body = usize::try_from(length)
                        .ok()
                        .and_then(|l| l.checked_sub(4))
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "a malformed message")
                        })?;
                    found(Found::Start {
                        tag: self.tag,
                        length: body,
                        at: i,
                    });
                    self.remaining = body;
                    if body == 0 {
                        self.have = 0;
                        found(Found::End {
                            tag: self.tag,
                            at: i,
                        });
                    }
                }
            } else {
                let take = self.remaining.min(chunk.len() - i);
                if self.have == 5 {
                    found(Found::FirstByte {
                        tag: self.tag,
                        at: i,
                    });
                    self.have = 6;
                }
                self.remaining -= take;
                i += take;
                if self.remaining == 0 {
                    self.have = 0;
                    found(Found::End {
                        tag: self.tag,
                        at: i,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Bytes both ways until either side closes; the session ends with the connection.
async fn pipe(client: UnixStream, server: Server, link: &Link, session: Session, status: u8) {
    let flow = Flow {
        owed: AtomicI64::new(0),
        unsynced: AtomicBool::new(false),
        status: AtomicU8::new(status),
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = tokio::io::split(server);
    let client_write = tokio::sync::Mutex::new(client_write);
    let due = due_query(&link.nonce);
    tokio::select! {
        _ = upstream(client_read, server_write, &client_write, &flow, &session, due.as_bytes()) => {}
        _ = downstream(server_read, &client_write, &flow) => {}
    }
    drop(session);
}

/// The question a pool's callback asks, as the simple-query message sqlx sends for it.
fn due_message(due: &[u8]) -> Vec<u8> {
    let mut message = BytesMut::new();
    let query = std::str::from_utf8(due).unwrap_or_default();
    let _ = frontend::query(query, &mut message);
    message.to_vec()
}

/// A stretch of what the client sent: bytes to pass on, or a whole message that is the size of
/// the pool's question.
enum Piece {
    Forward(usize, usize),
    Candidate(Vec<u8>),
}

/// Client to server, except the pool's question, answered here when the connection is idle.
async fn upstream(
    mut client: tokio::net::unix::OwnedReadHalf,
    mut server: tokio::io::WriteHalf<Server>,
    client_write: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    flow: &Flow,
    session: &Session,
    due: &[u8],
) -> io::Result<()> {
    let question = due_message(due);
    let mut framer = Framer::default();
    let mut buffer = vec![0u8; BUFFER];
    // A message that may be the question, held until it is complete.
    let mut held: Option<Vec<u8>> = None;
    loop {
        let n = client.read(&mut buffer).await?;
        if n == 0 {
            let _ = server.shutdown().await;
            return Ok(());
        }
        let chunk = &buffer[..n];
        let mut pieces = Vec::new();
        let mut cursor = 0;
        framer.feed(chunk, |found| match found {
            Found::Start { tag, length, at } => {
                match tag {
                    b'Q' | b'S' | b'F' => {
                        flow.owed.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                match tag {
                    b'S' => flow.unsynced.store(false, Ordering::SeqCst),
                    b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                        flow.unsynced.store(true, Ordering::SeqCst);
                    }
                    _ => {}
                }
                // Only a message whose header is in this chunk is held (a header split across
                // reads, which sqlx's single write of the question never makes, is passed on).
                if tag == b'Q' && length + 5 == question.len() && at >= 5 && at - 5 >= cursor {
                    pieces.push(Piece::Forward(cursor, at - 5));
                    held = Some(chunk[at - 5..at].to_vec());
                    cursor = at;
                }
            }
            Found::End { at, .. } => {
                if let Some(mut message) = held.take() {
                    message.extend_from_slice(&chunk[cursor..at]);
                    pieces.push(Piece::Candidate(message));
                    cursor = at;
                }
            }
            Found::FirstByte { .. } => {}
        })?;
        match &mut held {
            Some(message) => message.extend_from_slice(&chunk[cursor..]),
            None => pieces.push(Piece::Forward(cursor, chunk.len())),
        }
        for piece in pieces {
            match piece {
                Piece::Forward(from, to) if from < to => server.write_all(&chunk[from..to]).await?,
                Piece::Forward(..) => {}
                Piece::Candidate(message) => {
                    let question_asked = message == question;
                    // Asked before the client's lock is taken: it may log and start a request.
                    let due = question_asked && session.is_due();
                    let mut writer = client_write.lock().await;
                    // The question itself is owed an answer; nothing else may be.
                    let idle = flow.owed.load(Ordering::SeqCst) == 1
                        && !flow.unsynced.load(Ordering::SeqCst);
                    if question_asked && idle {
                        let status = flow.status.load(Ordering::SeqCst);
                        writer.write_all(&due_answer(due, status)).await?;
                        flow.owed.fetch_sub(1, Ordering::SeqCst);
                        drop(writer);
                        if due {
                            session.retired();
                        }
                    } else {
                        drop(writer);
                        server.write_all(&message).await?;
                    }
                }
            }
        }
        server.flush().await?;
    }
}

/// The answer to the pool's question: `SELECT 1` (due) or `SELECT 0`, then `ReadyForQuery` with
/// the connection's transaction status.
fn due_answer(due: bool, status: u8) -> Vec<u8> {
    let tag: &[u8] = if due { b"SELECT 1\0" } else { b"SELECT 0\0" };
    let mut answer = Vec::with_capacity(32);
    answer.push(b'C');
    answer.extend_from_slice(&(tag.len() as u32 + 4).to_be_bytes());
    answer.extend_from_slice(tag);
    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, status]);
    answer
}

/// Server to client, counting the `ReadyForQuery` messages owed (under the client's write lock,
/// once written, so that an answer from the relay never overtakes them).
async fn downstream(
    mut server: tokio::io::ReadHalf<Server>,
    client_write: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    flow: &Flow,
) -> io::Result<()> {
    let mut framer = Framer::default();
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = server.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        let chunk = &buffer[..n];
        let mut ready = 0;
        let mut status = None;
        framer.feed(chunk, |found| match found {
            Found::FirstByte { tag: b'Z', at } => status = Some(chunk[at]),
            Found::End { tag: b'Z', .. } => ready += 1,
            _ => {}
        })?;
        let mut writer = client_write.lock().await;
        writer.write_all(chunk).await?;
        if let Some(status) = status {
            flow.status.store(status, Ordering::SeqCst);
        }
        if ready > 0 {
            flow.owed.fetch_sub(ready, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framer_finds_messages_across_any_split() {
        // Z (status T), a 3-byte D, and an empty-bodied S, split at every point.
        let stream: Vec<u8> = [
            &[b'Z', 0, 0, 0, 5, b'T'][..],
            &[b'D', 0, 0, 0, 7, 1, 2, 3][..],
            &[b'S', 0, 0, 0, 4][..],
        ]
        .concat();
        for split in 0..=stream.len() {
            let mut framer = Framer::default();
            let mut events = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                let offset = if part.as_ptr() == stream.as_ptr() {
                    0
                } else {
                    split
                };
                framer
                    .feed(part, |found| {
                        events.push(match found {
                            Found::Start { tag, length, at } => (tag, 's', length, offset + at),
                            Found::FirstByte { tag, at } => (tag, 'f', 0, offset + at),
                            Found::End { tag, at } => (tag, 'e', 0, offset + at),
                        })
                    })
                    .unwrap();
            }
            assert_eq!(
                events,
                [
                    (b'Z', 's', 1, 5),
                    (b'Z', 'f', 0, 5),
                    (b'Z', 'e', 0, 6),
                    (b'D', 's', 3, 11),
                    (b'D', 'f', 0, 11),
                    (b'D', 'e', 0, 14),
                    (b'S', 's', 0, 19),
                    (b'S', 'e', 0, 19),
                ],
                "split at {split}"
            );
        }
        let mut framer = Framer::default();
        assert!(framer.feed(&[b'X', 0, 0, 0, 2], |_| {}).is_err());
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
            let mut framer = Framer::default();
            let split = rng.usize(..=bytes.len());
            for part in [&bytes[..split], &bytes[split..]] {
                if framer.feed(part, |_| {}).is_err() {
                    break;
                }
            }
        }
    }
}
