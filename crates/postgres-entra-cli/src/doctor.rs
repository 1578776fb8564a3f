//! `postgres-entra doctor`: the login path taken apart, one step at a time, each with its time,
//! and on failure its cause and fix. A step that needs a failed one is skipped; the others run.

use postgres_entra::{
    AzureTokenSource, Cloud, EntraConnector, Error, LoginRejected, RoleSource, Token, TokenCache,
    TokenClaims, TokenSource,
};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use crate::settings::{ChosenCredential, Server};
use crate::tls::{self, TlsFailure};

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It worked.
    Pass,
    /// It worked, with something to look at.
    Warn,
    /// It failed: see the cause and the fix.
    Fail,
    /// It needs a step that failed.
    Skipped,
}

/// One step of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// 1 to 8.
    pub number: u8,
    /// `credential`, `token`, `claims`, `role`, `network`, `tls`, `login`, `query`.
    pub name: &'static str,
    /// How it ended.
    pub status: Status,
    /// How long it took, in milliseconds.
    pub millis: u64,
    /// What it found.
    pub details: Vec<String>,
    /// Why it failed (or what the warning is about).
    pub cause: Option<String>,
    /// What to do about it.
    pub fix: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// One line: what works, or the first failure.
    pub summary: String,
}

impl Report {
    /// Whether no step failed.
    pub fn ok(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s.status, Status::Pass | Status::Warn))
    }

    /// The first failed step, if any.
    pub fn first_failure(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.status == Status::Fail)
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::from("postgres-entra doctor\n");
        for step in &self.steps {
            let status = match step.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            out.push_str(&format!(
                "{}. {:<10} {status}  {:>6} ms\n",
                step.number, step.name, step.millis
            ));
            for line in &step.details {
                out.push_str(&format!("     {line}\n"));
            }
            if let Some(cause) = &step.cause {
                out.push_str(&format!("     cause: {cause}\n"));
            }
            if let Some(fix) = &step.fix {
                out.push_str(&format!("     fix:   {fix}\n"));
            }
        }
        out.push_str(&format!("\n{}\n", self.summary));
        out
    }
}

/// A step in progress.
struct Timed {
    number: u8,
    name: &'static str,
    started: Instant,
    details: Vec<String>,
}

impl Timed {
    fn start(number: u8, name: &'static str) -> Self {
        Self {
            number,
            name,
            started: Instant::now(),
            details: Vec::new(),
        }
    }

    fn detail(&mut self, line: impl Into<String>) {
        self.details.push(line.into());
    }

    fn end(self, status: Status, cause: Option<String>, fix: Option<String>) -> Step {
        Step {
            number: self.number,
            name: self.name,
            status,
            millis: self.started.elapsed().as_millis() as u64,
            details: self.details,
            cause,
            fix,
        }
    }

    fn pass(self) -> Step {
        self.end(Status::Pass, None, None)
    }

    fn warn(self, cause: impl Into<String>, fix: impl Into<String>) -> Step {
        self.end(Status::Warn, Some(cause.into()), Some(fix.into()))
    }

    fn fail(self, cause: impl Into<String>, fix: impl Into<String>) -> Step {
        self.end(Status::Fail, Some(cause.into()), Some(fix.into()))
    }
}

fn skipped(number: u8, name: &'static str, needs: &str) -> Step {
    Step {
        number,
        name,
        status: Status::Skipped,
        millis: 0,
        details: vec![format!("needs {needs}")],
        cause: None,
        fix: None,
    }
}

fn in_minutes(at: SystemTime) -> String {
    match at.duration_since(SystemTime::now()) {
        Ok(left) => format!("in {} min", left.as_secs() / 60),
        Err(past) => format!("{} s ago", past.duration().as_secs()),
    }
}

/// The audience a scope asks for: the scope without `/.default`.
fn audience_of(scope: &str) -> &str {
    scope.strip_suffix("/.default").unwrap_or(scope)
}

/// Runs the steps against `server` with `credential` (or the reason there is none).
pub async fn run(server: &Server, credential: Result<ChosenCredential, String>) -> Report {
    let mut steps = Vec::new();
    let Some(host) = server.host.clone() else {
        let step = Timed::start(1, "credential").fail(
            "no server to check",
            "set PGHOST (or --host) to the server's name, e.g. mydb.postgres.database.azure.com",
        );
        return Report {
            summary: "FAIL at step 1 (credential): no server to check".to_owned(),
            steps: vec![step],
        };
    };
    let cloud = Cloud::from_host(&host);
    let scope = server
        .scope
        .clone()
        .unwrap_or_else(|| cloud.scope().to_owned());
    let needed_scope = cloud.scope();

    // 1. The credential.
    let mut step = Timed::start(1, "credential");
    let source = match credential {
        Ok(chosen) => {
            let source = AzureTokenSource::new(chosen.credential.clone());
            step.detail(format!("{} ({:?})", source.identity(), chosen.kind));
            step.detail(format!("why: {}", chosen.reason));
            step.detail(if chosen.seen.is_empty() {
                "credential variables set: none".to_owned()
            } else {
                format!(
                    "credential variables set: {} (values not shown)",
                    chosen.seen.join(", ")
                )
            });
            steps.push(step.pass());
            Some(source)
        }
        Err(problem) => {
            steps.push(step.fail(
                problem,
                "set the variables of one credential: AZURE_TENANT_ID + AZURE_CLIENT_ID + AZURE_CLIENT_SECRET, or AZURE_FEDERATED_TOKEN_FILE (+ tenant and client id), or run on Azure with a managed identity, or `az login`",
            ));
            None
        }
    };

    // 2. A token.
    let token: Option<std::sync::Arc<Token>> = match &source {
        None => {
            steps.push(skipped(2, "token", "a credential (step 1)"));
            None
        }
        Some(source) => {
            let mut step = Timed::start(2, "token");
            step.detail(format!("scope {scope}"));
            let options = postgres_entra::CacheOptions::default().fetch_timeout(server.timeout);
            let cache = TokenCache::builder(source.clone())
                .scope(scope.clone())
                .options(options)
                .build();
            let fetched = match cache {
                Ok(cache) => cache.get().await.map_err(Error::from),
                Err(e) => Err(e),
            };
            match fetched {
                Ok(token) => {
                    step.detail(format!(
                        "received; expires {}",
                        in_minutes(token.expires_on())
                    ));
                    steps.push(step.pass());
                    Some(token)
                }
                Err(Error::Token(e)) => {
                    let mut fix = e.kind().advice().to_owned();
                    if e.kind() == postgres_entra::TokenErrorKind::CredentialRejected {
                        fix.push_str(
                            " (AADSTS7000215: the client secret is wrong or expired; AADSTS700016: the client id is unknown in this tenant; AADSTS90002: the tenant id is wrong)",
                        );
                    }
                    // The error's own advice goes to the fix.
                    let text = e.to_string();
                    let cause = text
                        .strip_suffix(&format!("; {}", e.kind().advice()))
                        .unwrap_or(&text)
                        .to_owned();
                    steps.push(step.fail(cause, fix));
                    None
                }
                Err(e) => {
                    steps.push(step.fail(e.to_string(), "check --scope"));
                    None
                }
            }
        }
    };

    // 3. What the token says.
    let mut claims_ok = false;
    let claims: Option<TokenClaims> = match &token {
        None => {
            steps.push(skipped(3, "claims", "a token (step 2)"));
            None
        }
        Some(token) => {
            let mut step = Timed::start(3, "claims");
            match token.claims() {
                Ok(claims) => {
                    let audience = claims.audience().join(", ");
                    step.detail(format!("audience {audience}"));
                    step.detail(format!(
                        "tenant {}, object id {}",
                        claims.tenant_id().unwrap_or("(none)"),
                        claims.object_id().unwrap_or("(none)")
                    ));
                    if let Some(app) = claims.app_id() {
                        step.detail(format!("app id {app}"));
                    }
                    let names: Vec<String> = [
                        ("upn", claims.upn()),
                        ("preferred_username", claims.preferred_username()),
                        ("unique_name", claims.unique_name()),
                        ("xms_mirid name", claims.managed_identity_name()),
                    ]
                    .into_iter()
                    .filter_map(|(claim, value)| value.map(|v| format!("{claim}={v}")))
                    .collect();
                    step.detail(if names.is_empty() {
                        "names: none (an app-only token)".to_owned()
                    } else {
                        format!("names: {}", names.join(", "))
                    });
                    if let Some(expires) = claims.expires_at() {
                        step.detail(format!("expires {}", in_minutes(expires)));
                    }
                    let wanted = audience_of(needed_scope);
                    if !claims.audience().iter().any(|a| a == wanted) {
                        steps.push(step.fail(
                            format!(
                                "the token is for {audience}, but {host} ({cloud}) accepts tokens for {wanted}"
                            ),
                            format!(
                                "request the scope of the server's cloud: {needed_scope} (drop --scope, or give the connector .cloud(..) / .scope(..) for this server)"
                            ),
                        ));
                    } else if claims
                        .expires_at()
                        .is_some_and(|at| at <= SystemTime::now())
                    {
                        steps.push(step.fail(
                            "the token has already expired",
                            "check this machine's clock (NTP)",
                        ));
                    } else {
                        steps.push(step.pass());
                        claims_ok = true;
                    }
                    Some(claims.clone())
                }
                Err(e) => {
                    steps.push(step.fail(
                        format!("the token's claims cannot be read: {e}"),
                        "the credential returned something other than an Entra access token: check the scope and the credential type",
                    ));
                    None
                }
            }
        }
    };

    // 4. The role.
    let role_ok = match &claims {
        None => {
            steps.push(skipped(4, "role", "the token's claims (step 3)"));
            false
        }
        Some(claims) => {
            let mut step = Timed::start(4, "role");
            let app_only = claims.upn().is_none()
                && claims.preferred_username().is_none()
                && claims.unique_name().is_none()
                && claims.managed_identity_name().is_none();
            match (&server.user, claims.role_name()) {
                (Some(user), _) => {
                    step.detail(format!("{user} (from PGUSER / --user)"));
                    if app_only {
                        steps.push(step.warn(
                            format!(
                                "the token is app-only (service principal, app id {}): PostgreSQL knows it by the name given to pgaadauth_create_principal",
                                claims.app_id().unwrap_or("?")
                            ),
                            format!(
                                "make sure `{user}` is the app registration's display name, as created by an Entra admin"
                            ),
                        ));
                    } else {
                        steps.push(step.pass());
                    }
                    true
                }
                (None, Ok(role)) => {
                    step.detail(format!(
                        "{} (from the token's {} claim)",
                        role.name, role.claim
                    ));
                    steps.push(step.pass());
                    true
                }
                (None, Err(e)) => {
                    steps.push(step.fail(
                        e.to_string(),
                        "set PGUSER (or --user) to the service principal's display name",
                    ));
                    false
                }
            }
        }
    };

    // 5. DNS and TCP.
    let mut step = Timed::start(5, "network");
    let address: Option<SocketAddr> = match resolve_and_connect(server, &host, &mut step).await {
        Ok(address) => {
            steps.push(step.pass());
            Some(address)
        }
        Err((cause, fix)) => {
            steps.push(step.fail(cause, fix));
            None
        }
    };

    // 6. TLS.
    let tls_ok = match address {
        None => {
            steps.push(skipped(6, "tls", "a TCP connection (step 5)"));
            false
        }
        Some(address) => {
            let mut step = Timed::start(6, "tls");
            match tls::probe(address, &host, &server.tls_roots(), server.timeout).await {
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
                    let (cause, fix) = tls_failure(failure, &host, server);
                    steps.push(step.fail(cause, fix));
                    false
                }
            }
        }
    };

    // 7. Login.
    let client = if !(claims_ok && role_ok && tls_ok) {
        steps.push(skipped(
            7,
            "login",
            "a usable token (step 3), the role (step 4) and TLS (step 6)",
        ));
        None
    } else {
        let mut step = Timed::start(7, "login");
        let source = source.clone().expect("a role implies a credential");
        let connector = EntraConnector::builder(source)
            .scope(scope.clone())
            .tls_roots(server.tls_roots())
            .build();
        let connected = match connector {
            Ok(connector) => connector.connect(&server.pg_config()).await,
            Err(e) => Err(e),
        };
        match connected {
            Ok((client, connection)) => {
                let driver = tokio::spawn(connection);
                step.detail(format!("logged in to database {}", server.dbname));
                steps.push(step.pass());
                Some((client, driver))
            }
            Err(error) => {
                let (cause, fix) = login_failure(&error, server, claims.as_ref());
                steps.push(step.fail(cause, fix));
                None
            }
        }
    };

    // 8. A query.
    let mut done = None;
    match client {
        None => steps.push(skipped(8, "query", "a login (step 7)")),
        Some((client, driver)) => {
            let mut step = Timed::start(8, "query");
            match client
                .query_one("select current_user::text, version()", &[])
                .await
            {
                Ok(row) => {
                    let (user, version): (String, String) = (row.get(0), row.get(1));
                    step.detail(format!("current_user = {user}"));
                    step.detail(version.clone());
                    steps.push(step.pass());
                    done = Some((user, version));
                }
                Err(e) => steps.push(step.fail(
                    e.to_string(),
                    "the login worked but the query did not: check the role's privileges",
                )),
            }
            drop(client);
            let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
        }
    }

    let summary = match (steps.iter().find(|s| s.status == Status::Fail), done) {
        (None, Some((user, version))) => {
            let short = version.split(" on ").next().unwrap_or(&version).to_owned();
            format!("OK: logged in to {host} as {user} ({short}) with an Entra ID token")
        }
        (Some(failed), _) => format!(
            "FAIL at step {} ({}): {}",
            failed.number,
            failed.name,
            failed.cause.as_deref().unwrap_or("")
        ),
        (None, None) => "FAIL: the checks did not finish".to_owned(),
    };
    Report { steps, summary }
}

async fn resolve_and_connect(
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

fn tls_failure(failure: TlsFailure, host: &str, server: &Server) -> (String, String) {
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

fn login_failure(error: &Error, server: &Server, claims: Option<&TokenClaims>) -> (String, String) {
    match error {
        Error::LoginRejected(rejected) => {
            // The error's own list of likely fixes gives way to the doctor's, which knows more.
            let text = error.to_string();
            let cause = text
                .split(". Likely fixes:")
                .next()
                .unwrap_or(&text)
                .to_owned();
            (cause, login_fix(rejected, claims))
        }
        Error::Postgres(e) if e.code().is_some_and(|c| c.code() == "3D000") => (
            format!("{error} (SQLSTATE 3D000)"),
            format!(
                "the database `{}` does not exist on this server: set PGDATABASE (or --dbname) to one that does (`postgres` always exists)",
                server.dbname
            ),
        ),
        Error::Tls { .. } => (
            error.to_string(),
            "see step 6; the same roots are used here".to_owned(),
        ),
        Error::Connect { .. } => (
            error.to_string(),
            "see step 5: the server could be reached a moment ago".to_owned(),
        ),
        Error::Postgres(e) => (
            match e.code() {
                Some(code) => format!("{error} (SQLSTATE {})", code.code()),
                None => error.to_string(),
            },
            "see the server's message".to_owned(),
        ),
        _ => (error.to_string(), "see the message".to_owned()),
    }
}

/// The likely fix for a refused login: the role is missing, named differently, mapped to another
/// principal, or the principal is not in the group. Microsoft Learn, "Manage Microsoft Entra
/// roles in Azure Database for PostgreSQL": `pgaadauth_create_principal(name, isAdmin, isMfa)` and
/// `pgaadauth_create_principal_with_oid(name, objectId, objectType, isAdmin, isMfa)`.
fn login_fix(rejected: &LoginRejected, claims: Option<&TokenClaims>) -> String {
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
    let own_name = claims.and_then(|c| c.role_name().ok()).map(|r| r.name);
    match (rejected.role_source(), &own_name) {
        (RoleSource::ConnectionConfig | RoleSource::Connector, Some(name)) if name != role => {
            fix.push_str(&format!(
                "PGUSER is `{role}` but the token names the principal `{name}`: if `{role}` is not a group it belongs to, use `{name}`. "
            ));
        }
        (_, None) => fix.push_str(&format!(
            "For a service principal the role is its display name as given to pgaadauth_create_principal; check `{role}` is that name. "
        )),
        _ => {}
    }
    fix.push_str(&format!(
        "As an Entra administrator of the server, connected to the `postgres` database, create the role: select * from pgaadauth_create_principal('{role}', false, false); — or, if `{role}` exists for another principal, map it to this one: select * from pgaadauth_create_principal_with_oid('{role}', '{oid}', 'service', false, false); (object type user, group or service)"
    ));
    fix
}
