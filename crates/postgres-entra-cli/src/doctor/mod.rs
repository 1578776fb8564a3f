//! `postgres-entra doctor`: the login path taken apart, one step at a time, each with its time,
//! and on failure its cause and fix. A step that needs a failed one is skipped; the others run.

use postgres_entra::__private::flatten;
use postgres_entra::{
    AccessToken, Cloud, EntraConnector, Error, TokenClaims, TokenErrorKind, TokenSource,
};
use std::sync::Arc;
use std::time::SystemTime;

use crate::settings::{ChosenCredential, Server};

mod server;
mod step;

pub use server::quote_literal;
use server::*;
use step::{Found, Timed, skipped};
pub use step::{Report, Status, Step};

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
