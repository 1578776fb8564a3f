//! `postgres-entra doctor`: the login path taken apart, one step at a time, each with its time,
//! and on failure its cause and fix. A step that needs a failed one is skipped; the others run.

use postgres_entra::__private::flatten;
use postgres_entra::{
    AccessToken, Cloud, EntraConnector, Error, LoginRejected, RoleSource, TokenClaims,
    TokenErrorKind, TokenSource,
};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
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

/// What the first steps established, for the later ones.
struct Found {
    host: String,
    /// The connector the library logs in with: the credential's tokens, the allowed hosts, the
    /// roots.
    connector: Option<EntraConnector>,
    claims: Option<TokenClaims>,
    /// The token is usable for this server (audience, expiry).
    claims_ok: bool,
    role_ok: bool,
}

/// Runs the steps against `server` with `credential` (or the reason there is none).
pub async fn run(server: &Server, credential: Result<ChosenCredential, String>) -> Report {
    let (mut steps, found) = match first_steps(server, credential).await {
        Ok(first) => first,
        Err(report) => return report,
    };
    let Some(found) = found else {
        return finish(steps, None);
    };
    let address = network(server, &found.host, &mut steps).await;
    let tls_ok = tls_step(server, &found.host, address, &mut steps).await;
    let client = login(server, &found, tls_ok, &mut steps).await;
    let done = query(client, &mut steps).await;
    finish(
        steps,
        done.map(|(user, version)| (found.host, user, version)),
    )
}

/// The steps that need no server: the credential, a token, its claims, the role. An early report
/// when there is no server to check.
#[allow(clippy::result_large_err)]
async fn first_steps(
    server: &Server,
    credential: Result<ChosenCredential, String>,
) -> Result<(Vec<Step>, Option<Found>), Report> {
    let Some(host) = server.host.clone() else {
        let step = Timed::start(1, "credential").fail(
            "no server to check",
            "set PGHOST (or --host) to the server's name, e.g. mydb.postgres.database.azure.com",
        );
        return Err(Report {
            summary: "FAIL at step 1 (credential): no server to check".to_owned(),
            steps: vec![step],
        });
    };
    let scope = server
        .scope
        .clone()
        .unwrap_or_else(|| Cloud::from_host(&host).scope().to_owned());
    let mut steps = Vec::new();
    let connector = credential_step(server, credential, &mut steps);
    let token = token_step(server, &host, &scope, connector.as_ref(), &mut steps).await;
    let (claims, claims_ok) = claims_step(&host, token.as_deref(), &mut steps);
    let role_ok = role_step(server, claims.as_ref(), &mut steps);
    Ok((
        steps,
        Some(Found {
            host,
            connector,
            claims,
            claims_ok,
            role_ok,
        }),
    ))
}

/// The report of the steps that need no server (credential, token, claims, role): what
/// `postgres-entra exec` shows when no token can be had.
pub async fn token_steps(server: &Server, credential: Result<ChosenCredential, String>) -> Report {
    match first_steps(server, credential).await {
        Ok((steps, _)) => finish(steps, None),
        Err(report) => report,
    }
}

/// 1. The credential, and the connector over it.
fn credential_step(
    server: &Server,
    credential: Result<ChosenCredential, String>,
    steps: &mut Vec<Step>,
) -> Option<EntraConnector> {
    let mut step = Timed::start(1, "credential");
    match credential {
        Ok(chosen) => {
            step.detail(format!("{} ({:?})", chosen.source.identity(), chosen.kind));
            step.detail(format!("why: {}", chosen.reason));
            step.detail(if chosen.seen.is_empty() {
                "credential variables set: none".to_owned()
            } else {
                format!(
                    "credential variables set: {} (values not shown)",
                    chosen.seen.join(", ")
                )
            });
            match server.connector(chosen.source) {
                Ok(connector) => {
                    steps.push(step.pass());
                    Some(connector)
                }
                Err(e) => {
                    steps.push(step.fail(
                        e.to_string(),
                        "fix the setting it names (POSTGRES_ENTRA_ALLOWED_HOSTS, --scope, PGSSLROOTCERT)",
                    ));
                    None
                }
            }
        }
        Err(problem) => {
            steps.push(step.fail(
                problem,
                "set the variables of one credential: AZURE_TENANT_ID + AZURE_CLIENT_ID + AZURE_CLIENT_SECRET, or AZURE_FEDERATED_TOKEN_FILE (+ tenant and client id), or run on Azure with a managed identity, or `az login`",
            ));
            None
        }
    }
}

/// The fix for a token the provider would not give, by kind.
fn token_fix(kind: TokenErrorKind, server: &Server) -> String {
    match kind {
        TokenErrorKind::CredentialRejected => format!(
            "{} (AADSTS7000215: the client secret is wrong or expired; AADSTS700016: the client id is unknown in this tenant; AADSTS90002: the tenant id is wrong)",
            kind.advice()
        ),
        TokenErrorKind::Timeout => format!(
            "no answer within {}: check network access to the identity provider from here (proxy, firewall, DNS); if it is merely slow, give it longer with --timeout",
            postgres_entra::__private::human(server.timeout)
        ),
        other => other.advice().to_owned(),
    }
}

/// Step 2, a token, once the library has checked that a token may go to `host` (the check every
/// pool makes).
async fn token_step(
    server: &Server,
    host: &str,
    scope: &str,
    connector: Option<&EntraConnector>,
    steps: &mut Vec<Step>,
) -> Option<Arc<AccessToken>> {
    let Some(connector) = connector else {
        steps.push(skipped(2, "token", "a credential (step 1)"));
        return None;
    };
    let mut step = Timed::start(2, "token");
    step.detail(format!("scope {scope}"));
    let cache = match connector.token_cache_for(host, server.hostaddr) {
        Ok(cache) => cache,
        Err(e) => {
            let text = e.to_string();
            let fix = if text.contains("allow_host") {
                format!(
                    "correct PGHOST, or, if `{host}` is your server under another name, allow it: {}={host}",
                    postgres_entra::ALLOWED_HOSTS_VARIABLE
                )
            } else if server.scope.is_some() {
                "drop --scope (the host's cloud decides the scope), or correct it".to_owned()
            } else {
                "correct PGHOST: token login needs one TCP host name or IP address".to_owned()
            };
            steps.push(step.fail(text, fix));
            return None;
        }
    };
    let fetched = cache.get().await.map_err(Error::from);
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
            // The error's own advice goes to the fix.
            let text = e.to_string();
            let mut cause = text
                .strip_suffix(&format!("; {}", e.kind().advice()))
                .unwrap_or(&text)
                .to_owned();
            if let Some(source) = std::error::Error::source(&e) {
                cause = format!("{cause}: {}", flatten(source));
            }
            steps.push(step.fail(cause, token_fix(e.kind(), server)));
            None
        }
        Err(e) => {
            steps.push(step.fail(e.to_string(), "check --scope"));
            None
        }
    }
}

/// 3. What the token says; whether it is usable for `host`.
fn claims_step(
    host: &str,
    token: Option<&AccessToken>,
    steps: &mut Vec<Step>,
) -> (Option<TokenClaims>, bool) {
    let Some(token) = token else {
        steps.push(skipped(3, "claims", "a token (step 2)"));
        return (None, false);
    };
    let mut step = Timed::start(3, "claims");
    let claims = match token.claims() {
        Ok(claims) => claims,
        Err(e) => {
            steps.push(step.fail(
                format!("the token's claims cannot be read: {e}"),
                "the credential returned something other than an Entra access token: check the scope and the credential type",
            ));
            return (None, false);
        }
    };
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
    let cloud = Cloud::from_host(host);
    let needed_scope = cloud.scope();
    let wanted = audience_of(needed_scope);
    let usable = if !claims.audience().iter().any(|a| a == wanted) {
        steps.push(step.fail(
            format!("the token is for {audience}, but {host} ({cloud}) accepts tokens for {wanted}"),
            format!(
                "request the scope of the server's cloud: {needed_scope} (drop --scope, or give the connector .cloud(..) / .scope(..) for this server)"
            ),
        ));
        false
    } else if claims
        .expires_at()
        .is_some_and(|at| at <= SystemTime::now())
    {
        steps.push(step.fail(
            "the token has already expired",
            "check this machine's clock (NTP)",
        ));
        false
    } else {
        steps.push(step.pass());
        true
    };
    (Some(claims), usable)
}

/// 4. The role.
fn role_step(server: &Server, claims: Option<&TokenClaims>, steps: &mut Vec<Step>) -> bool {
    let Some(claims) = claims else {
        steps.push(skipped(4, "role", "the token's claims (step 3)"));
        return false;
    };
    let mut step = Timed::start(4, "role");
    match (&server.user, claims.role_name()) {
        (Some(user), _) => {
            step.detail(format!("{user} (from PGUSER / --user)"));
            if claims.role_name().is_none() {
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
        (None, Some((name, claim))) => {
            step.detail(format!("{name} (from the token's {claim} claim)"));
            steps.push(step.pass());
            true
        }
        (None, None) => {
            let cause = if claims.is_app_only() {
                format!(
                    "the access token is app-only (service principal, appid {}) and carries no role name",
                    claims.app_id().unwrap_or("?")
                )
            } else {
                "the access token has no xms_mirid, upn, preferred_username or unique_name claim"
                    .to_owned()
            };
            steps.push(step.fail(
                cause,
                "set PGUSER (or --user) to the service principal's display name",
            ));
            false
        }
    }
}

/// 5. DNS and TCP.
async fn network(server: &Server, host: &str, steps: &mut Vec<Step>) -> Option<SocketAddr> {
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
async fn tls_step(
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
async fn login(
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
async fn query(
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

/// The report: the steps, and a summary line.
fn finish(steps: Vec<Step>, done: Option<(String, String, String)>) -> Report {
    let summary = match (steps.iter().find(|s| s.status == Status::Fail), done) {
        (None, Some((host, user, version))) => {
            let short = version.split(" on ").next().unwrap_or(&version).to_owned();
            format!("OK: logged in to {host} as {user} ({short}) with an Entra ID token")
        }
        (Some(failed), _) => format!(
            "FAIL at step {} ({}): {}",
            failed.number,
            failed.name,
            failed.cause.as_deref().unwrap_or("")
        ),
        (None, None) if steps.len() < 8 => {
            "OK: a token for this server, naming the role".to_owned()
        }
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

#[cfg(test)]
mod tests {
    use super::quote_literal;

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal("orders-api"), "'orders-api'");
        assert_eq!(quote_literal("o'brien"), "'o''brien'");
        assert_eq!(quote_literal(r"a\b'"), r"E'a\\b'''");
        assert_eq!(quote_literal(""), "''");
    }
}
