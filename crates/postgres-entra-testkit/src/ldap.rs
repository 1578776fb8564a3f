//! The loopback LDAP responder PostgreSQL's `ldap` login method binds to: it takes the bind password
//! (the access token) and accepts the bind only if the token is valid for the role.

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use ldap3_proto::LdapCodec;
use ldap3_proto::proto::{
    LdapBindCred, LdapBindResponse, LdapMsg, LdapOp, LdapResult, LdapResultCode,
};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, Encoder, Framed};
use tracing::Dispatch;

use crate::servers::AzureServer;
use crate::shared::Shared;

/// The bind DN is `cn=<role>,ou=<server>`; pg_hba's `ldapprefix` and `ldapsuffix` build it, the
/// suffix naming the server (by the address the client reached), so that the check knows which
/// audience to expect.
const DN_PREFIX: &str = "cn=";

/// The `pg_hba.conf` lines that hand each password for `database` (`all` for every database), over
/// TLS only, to the responder on `port`.
pub(crate) fn hba_lines(database: &str, port: u16) -> Vec<String> {
    let method = |server: AzureServer| {
        format!(
            "ldap ldapserver=127.0.0.1 ldapport={port} ldapprefix=\"{DN_PREFIX}\" ldapsuffix=\",ou={}\"",
            server.ldap_unit()
        )
    };
    let mut lines: Vec<String> = AzureServer::ALL
        .iter()
        .map(|server| {
            format!(
                "hostssl {database} all {}/32 {}",
                server.address(),
                method(*server)
            )
        })
        .collect();
    lines.push(format!(
        "hostssl {database} all ::1/128 {}",
        method(AzureServer::Public)
    ));
    lines
}

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(handle(stream, shared.clone()));
    }
}

/// `LdapCodec` with its logging silenced: it traces every decoded message, bind password (the
/// access token) included, and the emulated server must not put tokens in the process's logs.
#[derive(Default)]
struct QuietLdapCodec(LdapCodec);

impl Decoder for QuietLdapCodec {
    type Item = LdapMsg;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<LdapMsg>, std::io::Error> {
        tracing::dispatcher::with_default(&Dispatch::none(), || self.0.decode(buf))
    }
}

impl Encoder<LdapMsg> for QuietLdapCodec {
    type Error = std::io::Error;

    fn encode(&mut self, msg: LdapMsg, buf: &mut BytesMut) -> Result<(), std::io::Error> {
        tracing::dispatcher::with_default(&Dispatch::none(), || self.0.encode(msg, buf))
    }
}

async fn handle(stream: TcpStream, shared: Arc<Shared>) {
    let mut framed = Framed::new(stream, QuietLdapCodec::default());
    while let Some(Ok(msg)) = framed.next().await {
        let LdapOp::BindRequest(request) = msg.op else {
            // PostgreSQL only binds and unbinds; anything else ends the session.
            break;
        };
        let (role, server) = request
            .dn
            .strip_prefix(DN_PREFIX)
            .and_then(|dn| dn.rsplit_once(",ou="))
            .and_then(|(role, unit)| Some((role, AzureServer::from_ldap_unit(unit)?)))
            .unwrap_or((&request.dn, AzureServer::Public));
        let (code, message) = match &request.cred {
            LdapBindCred::Simple(password) => match shared.check_login(role, password, server) {
                Ok(()) => (LdapResultCode::Success, String::new()),
                Err(rejection) => (LdapResultCode::InvalidCredentials, rejection.to_string()),
            },
            _ => (
                LdapResultCode::AuthMethodNotSupported,
                "only simple bind is supported".to_owned(),
            ),
        };
        let response = LdapMsg {
            msgid: msg.msgid,
            op: LdapOp::BindResponse(LdapBindResponse {
                res: LdapResult {
                    code,
                    matcheddn: String::new(),
                    message,
                    referral: Vec::new(),
                },
                saslcreds: None,
            }),
            ctrl: Vec::new(),
        };
        if framed.send(response).await.is_err() {
            break;
        }
    }
}
