//! A relayed connection's login: TCP and TLS to the server, the startup with sqlx's parameters,
//! the password exchange (cleartext, MD5 or SCRAM-SHA-256), and the server's answer.

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use postgres_entra::__private::{
    Attempt, Entry, certificate_error, connect_error, postgres_error, tls_declined, tls_error,
};
use postgres_entra::Error;

use crate::relay::{Link, Upstream, cstr};

/// The longest message the relay reads whole while logging in (PostgreSQL's own messages at
/// login are small; an error is a few hundred bytes).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// The server's end of a relayed connection.
pub(crate) type Server = TlsStream<TcpStream>;

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
pub(crate) fn error_fields(mut body: &[u8]) -> (Option<String>, String, String) {
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
    pub(crate) async fn attempt(
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
            Err(error) => Attempt::Failed(connect_error(self.targets(), error)),
        }
    }

    /// TCP to the server, then TLS (declined: an error, and no token is sent).
    async fn open(&self) -> Result<Server, Error> {
        let Upstream { host, port } = &self.upstream;
        let network = |e: io::Error| connect_error(self.targets(), e);
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
                    None,
                ));
            }
        }
        self.tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(
                |e| match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(tls) => certificate_error(tls.clone()),
                    None => connect_error(self.targets(), e),
                },
            )
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
                                None,
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
                        code => Attempt::Failed(postgres_error(
                            code,
                            format!("{severity}: {message}"),
                            None,
                        )),
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
                    None,
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
