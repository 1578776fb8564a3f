//! Logging in with tokio-postgres: TLS forced and verified, each attempt of the login that
//! `PoolCore::login` runs (token, role, one retry with a different token), and tokio-postgres's
//! errors sorted into ours.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::{ChannelBinding, Host, SslMode};
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use postgres_entra::__private::{
    Attempt, Entry, PoolCore, PoolHost, Session, certificate_error, config_error, connect_error,
    flatten, postgres_error, tls_config, tls_declined, tls_error,
};
use postgres_entra::{EntraConnector, Error, SessionOptions};

use crate::connection::Connection;

/// How a pool's connections log in: its settings (TLS required), the connector, and the pool's
/// share of the library ([`PoolCore`]). For the pool adapters.
pub struct PgLogin {
    core: PoolCore,
    config: Config,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for PgLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's `Config` prints its password as `_`; ours never holds one anyway.
        f.debug_struct("PgLogin")
            .field("core", &self.core)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// `host:port/database` for the first host of `config`: the name OpenTelemetry's conventions
/// suggest for a pool that has none.
fn default_name(config: &Config) -> String {
    let host = tcp_hosts(config).next().unwrap_or("localhost");
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config
        .get_dbname()
        .or(config.get_user().filter(|user| !user.is_empty()))
        .unwrap_or("postgres");
    format!("{host}:{port}/{database}")
}

fn tcp_hosts(config: &Config) -> impl Iterator<Item = &str> {
    config.get_hosts().iter().filter_map(|host| match host {
        Host::Tcp(name) => Some(name.as_str()),
        #[cfg(unix)]
        Host::Unix(_) => None,
    })
}

/// Checks `config` can carry a token safely and returns it with TLS required: `sslmode=disable`
/// is an error, `prefer` (tokio-postgres's default) becomes `require`, which with rustls verifies
/// the chain and the host name.
fn secure_config(config: &Config) -> Result<Config, Error> {
    let mut config = config.clone();
    match config.get_ssl_mode() {
        SslMode::Disable => {
            return Err(config_error(
                "sslmode=disable would send the access token in clear text; token login requires TLS (use sslmode=require)",
            ));
        }
        SslMode::Prefer => {
            config.ssl_mode(SslMode::Require);
        }
        _ => {}
    }
    if config
        .get_hosts()
        .iter()
        .any(|h| !matches!(h, Host::Tcp(_)))
    {
        return Err(config_error(
            "a Unix-socket host cannot carry TLS; token login needs a TCP host name",
        ));
    }
    if config.get_channel_binding() == ChannelBinding::Require {
        return Err(config_error(
            "channel_binding=require cannot work with token login (the token is sent as a cleartext password inside TLS); use prefer or disable",
        ));
    }
    Ok(config)
}

fn refused_login(error: &tokio_postgres::Error) -> Option<(&str, &str)> {
    let db = error.as_db_error()?;
    matches!(db.code().code(), "28000" | "28P01").then(|| (db.code().code(), db.message()))
}

/// Finds a rustls error in `error`'s source chain.
fn rustls_cause<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// Every host of `config`, with the address it is reached at (`hostaddr`, when given) and its
/// port, as tokio-postgres pairs them.
fn hosts(config: &Config) -> Vec<PoolHost<'_>> {
    let ports = config.get_ports();
    let addresses = config.get_hostaddrs();
    tcp_hosts(config)
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            (host, addresses.get(i).copied(), port)
        })
        .collect()
}

/// `host:port` for every host of `config`, for messages.
fn targets(config: &Config) -> String {
    hosts(config)
        .iter()
        .map(|(host, _, port)| format!("{host}:{port}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// tokio-postgres has no public error kind; these are its messages (tokio-postgres 0.7, `Error`'s
/// `Display`) for a server that declined TLS, a failed handshake, and a connection that could not
/// be made or broke before the login finished. Each is pinned by a test against the real crate.
const TLS_DECLINED: &str = "server does not support TLS";
const TLS_HANDSHAKE: &str = "error performing TLS handshake";
const NETWORK: [&str; 3] = [
    "error connecting to server",
    "error communicating with the server",
    "connection closed",
];

/// Sorts a failed connect that was not a refused login into TLS, network or server, keeping the
/// typed cause underneath (the server's `DbError`, rustls' error, the `io::Error`) as the source.
fn classify(error: tokio_postgres::Error, config: &Config) -> Error {
    if let Some(db) = error.as_db_error() {
        return postgres_error(
            Some(db.code().code()),
            format!("{}: {}", db.severity(), db.message()),
            Some(Arc::new(db.clone())),
        );
    }
    let text = flatten(&error);
    if text.contains(TLS_DECLINED) {
        return tls_declined();
    }
    if let Some(tls) = rustls_cause(&error) {
        return certificate_error(tls.clone());
    }
    if text.starts_with(TLS_HANDSHAKE) {
        return tls_error(
            "the TLS handshake failed",
            error.into_source().map(Arc::from),
        );
    }
    if NETWORK.iter().any(|prefix| text.starts_with(prefix)) {
        let io = match error.into_source().map(|e| e.downcast::<std::io::Error>()) {
            Some(Ok(io)) => *io,
            // tokio-postgres's "connection closed" has no cause.
            _ => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, text),
        };
        return connect_error(targets(config), io);
    }
    // tokio-postgres prints its cause and returns it as the source too: the text says both.
    postgres_error(None, text, None)
}

impl PgLogin {
    /// The logins of a pool with `config` (its user, when set and not empty, being one the
    /// settings name explicitly): checked now (TLS, TCP hosts a token may go to, no channel
    /// binding, the cloud). `create_limit`: how long the pool lets one connect take.
    pub fn new(
        connector: &EntraConnector,
        config: &Config,
        options: SessionOptions,
        create_limit: Option<Duration>,
    ) -> Result<Self, Error> {
        let config = secure_config(config)?;
        let core = PoolCore::new(
            connector,
            &hosts(&config),
            config.get_user(),
            options,
            default_name(&config),
            create_limit,
        )?;
        let tls = MakeRustlsConnect::new(Arc::unwrap_or_clone(tls_config(connector)));
        Ok(Self { core, config, tls })
    }

    /// The pool's share of the library.
    pub fn core(&self) -> &PoolCore {
        &self.core
    }

    /// Opens a connection: the login ([`PoolCore::login`]) and its session.
    pub async fn open(&self) -> Result<(Client, Connection, Session), Error> {
        let ((client, connection), session) = self
            .core
            .login(|role, entry| self.attempt(role, entry))
            .await?;
        Ok((client, connection, session))
    }

    /// Opens one connection and closes it: a startup check that reports a permanent mistake at
    /// once (an untrusted certificate, a missing role, a credential the provider refuses).
    pub async fn check(&self) -> Result<(), Error> {
        let (client, connection, _session) = self.open().await?;
        let task = tokio::spawn(connection);
        let outcome = client
            .simple_query("")
            .await
            .map(drop)
            .map_err(|e| classify(e, &self.config));
        drop(client);
        let _ = task.await;
        outcome
    }

    /// One login as `role` with `entry`'s token.
    async fn attempt(&self, role: String, entry: Arc<Entry>) -> Attempt<(Client, Connection)> {
        let mut config = self.config.clone();
        config.user(&role).password(entry.secret());
        match config.connect(self.tls.clone()).await {
            Ok((client, inner)) => Attempt::LoggedIn((client, Connection { inner })),
            Err(error) => match refused_login(&error) {
                Some((code, message)) => Attempt::Refused {
                    code: code.to_owned(),
                    message: message.to_owned(),
                },
                None => Attempt::Failed(classify(error, &self.config)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The tokio-postgres messages `classify` relies on, produced by the real crate against
    //! loopback listeners.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A listener that reads the first message (the SSLRequest, or the startup message without
    /// TLS), answers `answer`, and closes.
    async fn answering(answer: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut length = [0u8; 4];
                let _ = socket.read_exact(&mut length).await;
                let mut rest = vec![0u8; (u32::from_be_bytes(length) as usize).saturating_sub(4)];
                let _ = socket.read_exact(&mut rest).await;
                let _ = socket.write_all(answer).await;
            }
        });
        port
    }

    fn config(port: u16, ssl_mode: SslMode) -> Config {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("u")
            .password("not-a-token")
            .ssl_mode(ssl_mode)
            .connect_timeout(Duration::from_secs(5));
        config
    }

    fn tls() -> MakeRustlsConnect {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        MakeRustlsConnect::new(config)
    }

    /// What tokio-postgres says (the whole chain), and what `classify` makes of it.
    async fn failure(config: &Config) -> (String, Error) {
        let error = match config.get_ssl_mode() {
            SslMode::Disable => config.connect(tokio_postgres::NoTls).await.err(),
            _ => config.connect(tls()).await.err(),
        }
        .expect("the connect fails");
        (flatten(&error), classify(error, config))
    }

    #[tokio::test]
    async fn a_server_declining_tls_is_recognised_by_tokio_postgres_own_words() {
        let port = answering(b"N").await;
        let (text, error) = failure(&config(port, SslMode::Require)).await;
        assert!(text.contains(TLS_DECLINED), "{text}");
        assert!(matches!(error, Error::Tls { .. }), "{error}");
        assert!(error.to_string().contains("declined TLS"), "{error}");
    }

    #[tokio::test]
    async fn a_failed_handshake_is_a_tls_error() {
        let port = answering(b"Snot a TLS server hello").await;
        let (text, error) = failure(&config(port, SslMode::Require)).await;
        assert!(text.starts_with(TLS_HANDSHAKE), "{text}");
        assert!(matches!(error, Error::Tls { .. }), "{error}");
    }

    #[tokio::test]
    async fn network_failures_are_connect_errors_naming_the_target() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let (text, error) = failure(&config(port, SslMode::Require)).await;
        assert!(text.starts_with(NETWORK[0]), "{text}");
        assert!(
            matches!(&error, Error::Connect { target, .. } if *target == format!("127.0.0.1:{port}")),
            "{error}"
        );

        // Hung up on after the SSLRequest.
        let hangs_up = answering(b"").await;
        let (text, error) = failure(&config(hangs_up, SslMode::Require)).await;
        assert!(text.starts_with(NETWORK[1]), "{text}");
        assert!(matches!(error, Error::Connect { .. }), "{error}");

        // Hung up on after the startup message (plaintext, only to produce the message).
        let (text, error) = failure(&config(hangs_up, SslMode::Disable)).await;
        assert!(text.starts_with(NETWORK[2]), "{text}");
        assert!(matches!(error, Error::Connect { .. }), "{error}");
    }

    /// A failure tokio-postgres does not say more about (here a server answering the startup
    /// with a message out of place) is not taken for one that passes by itself.
    #[tokio::test]
    async fn an_unclassified_failure_is_not_transient() {
        let port = answering(&[b'Z', 0, 0, 0, 5, b'I']).await;
        let (text, error) = failure(&config(port, SslMode::Disable)).await;
        assert!(text.contains("unexpected message"), "{text}");
        assert!(
            matches!(error, Error::Postgres { code: None, .. }),
            "{error}"
        );
        assert!(!error.is_transient(), "{error}");
    }
}
