//! The doctor's steps against the server: network, TLS, the login and a query, and what their
//! failures mean.

use postgres_entra::__private::flatten;
use postgres_entra::{Error, LoginRejected, RoleSource, TokenClaims};
use std::net::SocketAddr;
use std::time::Duration;

use super::step::{Found, Step, Timed, skipped};
use crate::settings::Server;
use crate::tls::{self, TlsFailure};

/// 5. DNS and TCP.
pub(super) async fn network(
    server: &Server,
    host: &str,
    steps: &mut Vec<Step>,
) -> Option<SocketAddr> {
    let mut step = Timed::start(5, "network");
    match resolve_and_connect(server, host, &mut step).await {
        Ok(address) => {
            steps.push(step.pass());
            Some(address)
        }
        Err((cause, fix)) => {
            steps.push(step.fail(cause, fix));
            None
        }
    }
}

/// 6. TLS: the chain, the root that verified it, the host name.
pub(super) async fn tls_step(
    server: &Server,
    host: &str,
    address: Option<SocketAddr>,
    steps: &mut Vec<Step>,
) -> bool {
    let Some(address) = address else {
        steps.push(skipped(6, "tls", "a TCP connection (step 5)"));
        return false;
    };
    let mut step = Timed::start(6, "tls");
    match tls::probe(address, host, &server.tls_roots(), server.timeout).await {
        Ok(handshake) => {
            step.detail(format!(
                "{} {}; host name {host} verified",
                handshake.protocol, handshake.cipher_suite
            ));
            for (i, cert) in handshake.chain.iter().enumerate() {
                step.detail(format!(
                    "chain[{i}]: {} (issued by {})",
                    cert.subject, cert.issuer
                ));
            }
            step.detail(format!("trusted root: {}", handshake.verified_by));
            steps.push(step.pass());
            true
        }
        Err(failure) => {
            let (cause, fix) = tls_failure(failure, host, server);
            steps.push(step.fail(cause, fix));
            false
        }
    }
}

/// 7. The login, through the library, as a pool would log in.
pub(super) async fn login(
    server: &Server,
    found: &Found,
    tls_ok: bool,
    steps: &mut Vec<Step>,
) -> Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let connector = match &found.connector {
        Some(connector) if found.claims_ok && found.role_ok && tls_ok => connector,
        _ => {
            steps.push(skipped(
                7,
                "login",
                "a usable token (step 3), the role (step 4) and TLS (step 6)",
            ));
            return None;
        }
    };
    let mut step = Timed::start(7, "login");
    let connected = postgres_entra_tokio_postgres::connect(connector, &server.pg_config()).await;
    match connected {
        Ok((client, connection)) => {
            let driver = tokio::spawn(async move {
                let _ = connection.await;
            });
            step.detail(format!("logged in to database {}", server.dbname));
            steps.push(step.pass());
            Some((client, driver))
        }
        Err(error) => {
            let (cause, fix) = login_failure(&error, server, found.claims.as_ref());
            steps.push(step.fail(cause, fix));
            None
        }
    }
}

/// 8. A query: `current_user` and the server's version.
pub(super) async fn query(
    client: Option<(tokio_postgres::Client, tokio::task::JoinHandle<()>)>,
    steps: &mut Vec<Step>,
) -> Option<(String, String)> {
    let Some((client, driver)) = client else {
        steps.push(skipped(8, "query", "a login (step 7)"));
        return None;
    };
    let mut step = Timed::start(8, "query");
    let done = match client
        .query_one("select current_user::text, version()", &[])
        .await
    {
        Ok(row) => {
            let (user, version): (String, String) = (row.get(0), row.get(1));
            step.detail(format!("current_user = {user}"));
            step.detail(version.clone());
            steps.push(step.pass());
            Some((user, version))
        }
        Err(e) => {
            steps.push(step.fail(
                flatten(&e),
                "the login worked but the query did not: check the role's privileges",
            ));
            None
        }
    };
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    done
}

pub(super) async fn resolve_and_connect(
    server: &Server,
    host: &str,
    step: &mut Timed,
) -> Result<SocketAddr, (String, String)> {
    let addresses: Vec<SocketAddr> = match server.hostaddr {
        Some(address) => {
            step.detail(format!("{host} at {address} (PGHOSTADDR, not resolved)"));
            vec![SocketAddr::new(address, server.port)]
        }
        None => match tokio::net::lookup_host((host, server.port)).await {
            Ok(found) => {
                let found: Vec<SocketAddr> = found.collect();
                step.detail(format!(
                    "{host} resolves to {}",
                    found
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                found
            }
            Err(e) => {
                return Err((
                    format!("{host} does not resolve: {e}"),
                    "check the server name; behind a private endpoint, this machine must use the private DNS zone (privatelink.postgres.database.azure.com)".to_owned(),
                ));
            }
        },
    };
    let mut last = String::new();
    for address in addresses {
        match tokio::time::timeout(server.timeout, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_)) => {
                step.detail(format!("TCP connection to {address} opened"));
                return Ok(address);
            }
            Ok(Err(e)) => last = format!("{address}: {e}"),
            Err(_) => last = format!("{address}: no answer within {:?}", server.timeout),
        }
    }
    Err((
        format!("no TCP connection: {last}"),
        format!(
            "check that the server runs and that port {} is open from here: the server's firewall rules or virtual network, a private endpoint, a proxy (PgBouncer listens on 6432)",
            server.port
        ),
    ))
}

pub(super) fn tls_failure(failure: TlsFailure, host: &str, server: &Server) -> (String, String) {
    let trust_hint = |issuer: &str| match &server.sslrootcert {
        Some(path) => format!(
            "the chain ends at a certificate issued by `{issuer}`, which is not in {}: add that CA's certificate to the file",
            path.display()
        ),
        None => format!(
            "the chain ends at a certificate issued by `{issuer}`, which is none of the Azure roots (DigiCert Global Root G2, Microsoft RSA Root CA 2017, DigiCert Global Root CA, Microsoft ECC Root CA 2017): if this server is yours (a private CA, a TLS-inspecting proxy, a local emulator), download that CA's certificate and set PGSSLROOTCERT to it"
        ),
    };
    match failure {
        TlsFailure::Declined => (
            "the server declined TLS (it answered the SSLRequest with N)".to_owned(),
            "token login needs TLS: the token is never sent in clear text. Azure servers always offer TLS: check that you reach the server itself and not a proxy without TLS".to_owned(),
        ),
        TlsFailure::Io(e) => (
            format!("the connection failed during the TLS handshake: {e}"),
            "check for a proxy or firewall that interferes with TLS".to_owned(),
        ),
        TlsFailure::Roots(e) => (e, "fix PGSSLROOTCERT (a PEM file of CA certificates)".to_owned()),
        TlsFailure::Handshake {
            error,
            certificate,
            chain,
        } => {
            let listing = chain
                .iter()
                .enumerate()
                .map(|(i, c)| format!("chain[{i}]: {} (issued by {})", c.subject, c.issuer))
                .collect::<Vec<_>>()
                .join("; ");
            let cause = if listing.is_empty() {
                error
            } else {
                format!("{error}; {listing}")
            };
            let fix = match certificate {
                Some(rustls::CertificateError::NotValidForName)
                | Some(rustls::CertificateError::NotValidForNameContext { .. }) => {
                    let names = chain
                        .first()
                        .map(|c| c.dns_names.join(", "))
                        .unwrap_or_default();
                    format!(
                        "the certificate is for {names}, not {host}: connect with the server's own name (PGHOST) and give an address, if needed, with PGHOSTADDR"
                    )
                }
                Some(rustls::CertificateError::Expired)
                | Some(rustls::CertificateError::ExpiredContext { .. })
                | Some(rustls::CertificateError::NotValidYet)
                | Some(rustls::CertificateError::NotValidYetContext { .. }) => {
                    "check this machine's clock (NTP), then the server's certificate".to_owned()
                }
                _ => match chain.last() {
                    Some(top) => trust_hint(&top.issuer),
                    None => "the server presented no certificate the handshake could use".to_owned(),
                },
            };
            (cause, fix)
        }
    }
}

pub(super) fn login_failure(
    error: &Error,
    server: &Server,
    claims: Option<&TokenClaims>,
) -> (String, String) {
    match error {
        Error::LoginRejected(rejected) => {
            // The error's own list of likely fixes gives way to the doctor's, which knows more.
            let text = flatten(error);
            let cause = text
                .split(". Likely fixes:")
                .next()
                .unwrap_or(&text)
                .to_owned();
            (cause, login_fix(rejected, claims))
        }
        Error::Postgres {
            code: Some(code), ..
        } if code == "3D000" => (
            flatten(error),
            format!(
                "the database `{}` does not exist on this server: set PGDATABASE (or --dbname) to one that does (`postgres` always exists)",
                server.dbname
            ),
        ),
        Error::Tls { .. } => (
            flatten(error),
            "see step 6; the same roots are used here".to_owned(),
        ),
        Error::Connect { .. } => (
            flatten(error),
            "see step 5: the server could be reached a moment ago".to_owned(),
        ),
        Error::Postgres { .. } => (flatten(error), "see the server's message".to_owned()),
        _ => (flatten(error), "see the message".to_owned()),
    }
}

/// The likely fix for a refused login: the role is missing, named differently, mapped to another
/// principal, or the principal is not in the group. Microsoft Learn, "Manage Microsoft Entra
/// roles in Azure Database for PostgreSQL": `pgaadauth_create_principal(name, isAdmin, isMfa)` and
/// `pgaadauth_create_principal_with_oid(name, objectId, objectType, isAdmin, isMfa)`.
pub(super) fn login_fix(rejected: &LoginRejected, claims: Option<&TokenClaims>) -> String {
    let role = rejected.role();
    let mut fix = String::new();
    if matches!(
        rejected.role_source(),
        RoleSource::ConnectionConfig | RoleSource::Connector
    ) {
        fix.push_str(&format!(
            "If `{role}` is an Entra group's role, this principal must be a member of that group (checked at every login): add it to the group, or log in as its own role by unsetting PGUSER. "
        ));
    }
    let oid = claims
        .and_then(TokenClaims::object_id)
        .unwrap_or("<object id>");
    let own_name = claims
        .and_then(TokenClaims::role_name)
        .map(|(name, _)| name);
    match (rejected.role_source(), &own_name) {
        (RoleSource::ConnectionConfig | RoleSource::Connector, Some(name)) if *name != role => {
            fix.push_str(&format!(
                "PGUSER is `{role}` but the token names the principal `{name}`: if `{role}` is not a group it belongs to, use `{name}`. "
            ));
        }
        (_, None) => fix.push_str(&format!(
            "For a service principal the role is its display name as given to pgaadauth_create_principal; check `{role}` is that name. "
        )),
        _ => {}
    }
    let (role_literal, oid_literal) = (quote_literal(role), quote_literal(oid));
    fix.push_str(&format!(
        "As an Entra administrator of the server, connected to the `postgres` database, create the role: select * from pgaadauth_create_principal({role_literal}, false, false); — or, if `{role}` exists for another principal, map it to this one: select * from pgaadauth_create_principal_with_oid({role_literal}, {oid_literal}, 'service', false, false); (object type user, group or service)"
    ));
    fix
}

/// `value` as a SQL string literal, as PostgreSQL's own `quote_literal` writes it: each quote
/// doubled, and, when it holds a backslash, an `E''` literal with each backslash doubled (so that
/// it reads the same whatever `standard_conforming_strings` says).
pub fn quote_literal(value: &str) -> String {
    let quoted = value.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}
