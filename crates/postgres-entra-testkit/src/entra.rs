//! Mock Microsoft Entra ID endpoints on loopback: the v2.0 token endpoint (client secret and client
//! assertion), the managed-identity endpoints (App Service and IMDS shapes), and the signing keys.

use axum::Router;
use axum::body::Body;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

use crate::faults::{Endpoint, Fault};
use crate::identity::{Identity, IdentityKind};
use crate::issuer::{TokenOptions, now_secs};
use crate::shared::Shared;

/// Path of the App Service managed-identity endpoint (`IDENTITY_ENDPOINT`).
pub(crate) const APP_SERVICE_PATH: &str = "/msi/token";
/// Path of the IMDS managed-identity endpoint, served for credentials whose transport is redirected.
pub(crate) const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route(APP_SERVICE_PATH, get(app_service_token))
        .route(IMDS_PATH, get(imds_token))
        .route("/{tenant}/discovery/v2.0/keys", get(keys))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .with_state(shared)
}

/// An Entra-style error body (`error`, `error_description`, `error_codes`, ...).
fn entra_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description}"),
        "error_codes": [code],
        "timestamp": "2026-01-01 00:00:00Z",
        "trace_id": uuid::Uuid::new_v4().to_string(),
        "correlation_id": uuid::Uuid::new_v4().to_string(),
    });
    (status, axum::Json(body)).into_response()
}

/// Counts the request, applies the configured latency, and answers with the configured fault if any.
async fn gate(shared: &Shared, endpoint: Endpoint) -> Option<Response> {
    let verdict = shared.faults.on_request(endpoint);
    if !verdict.latency.is_zero() {
        tokio::time::sleep(verdict.latency).await;
    }
    Some(match verdict.fault? {
        Fault::ServerError => entra_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "temporarily_unavailable",
            50001,
            "The service is temporarily unavailable (injected fault)",
        ),
        Fault::TooManyRequests { retry_after } => {
            let mut response = entra_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                50196,
                "Too many requests (injected fault)",
            );
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
            response
        }
        Fault::MalformedBody => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            "{\"token_type\":\"Bearer\",\"access_tok",
        )
            .into_response(),
        Fault::DropConnection => {
            // A body that fails on first poll makes hyper abort the connection mid-response.
            let failing = futures_util::stream::once(async {
                Err::<bytes::Bytes, std::io::Error>(std::io::Error::other("injected drop"))
            });
            Response::new(Body::from_stream(failing))
        }
    })
}

/// Mints a token for `resource`, records it, and returns it with its lifetime in seconds.
fn issue(
    shared: &Shared,
    endpoint: Endpoint,
    identity: &Identity,
    resource: &str,
) -> Result<(String, u64), crate::Error> {
    let lifetime = shared.token_lifetime();
    let skewed_exp = lifetime.as_secs() as i64 - shared.idp_clock_behind().as_secs() as i64;
    let options = TokenOptions::default()
        .audience(resource)
        .expires_in(skewed_exp);
    let token = shared.issuer.mint(identity, &options, lifetime)?;
    shared.record_issued(&token);
    shared.faults.on_token_issued(endpoint);
    Ok((token, lifetime.as_secs()))
}

fn internal_error(error: crate::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
}

/// `scope` of a client-credentials request → the resource (token audience).
fn resource_of(scope: Option<&String>) -> Option<&str> {
    let scope = scope.map(String::as_str).unwrap_or_default();
    let mut scopes = scope.split_whitespace();
    match (scopes.next(), scopes.next()) {
        (Some(s), None) => s.strip_suffix("/.default").filter(|r| !r.is_empty()),
        _ => None,
    }
}

async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Some(response) = gate(&shared, Endpoint::Token).await {
        return response;
    }
    if tenant != shared.issuer.tenant_id {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            "Tenant not found",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type",
        );
    }
    let Some(resource) = resource_of(form.get("scope")) else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier",
        );
    };
    let client_id = form
        .get("client_id")
        .map(String::as_str)
        .unwrap_or_default();
    let Some(identity) = shared.identity_by_client_id(client_id, IdentityKind::ServicePrincipal)
    else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application was not found in the directory",
        );
    };
    if identity.disabled {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            7000112,
            "Application is disabled",
        );
    }
    let authenticated = match (form.get("client_secret"), form.get("client_assertion")) {
        (Some(secret), None) => identity.client_secret.as_ref() == Some(secret),
        (None, Some(assertion)) => {
            form.get("client_assertion_type").map(String::as_str) == Some(ASSERTION_TYPE)
                && identity.federated_subject.is_some()
                && shared.issuer.verify_assertion(assertion).ok() == identity.federated_subject
        }
        _ => false,
    };
    if !authenticated {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret or client assertion provided",
        );
    }
    match issue(&shared, Endpoint::Token, &identity, resource) {
        Ok((access_token, expires_in)) => axum::Json(json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": access_token,
        }))
        .into_response(),
        Err(e) => internal_error(e),
    }
}

/// Shared by both managed-identity shapes: pick the identity, mint, answer with `expires_on` as a
/// string of unix seconds (what App Service and IMDS send).
fn managed_identity_token(shared: &Shared, query: &HashMap<String, String>) -> Response {
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "resource is required").into_response();
    };
    let identity = match query.get("client_id").or(query.get("object_id")) {
        Some(id) => shared.identities().into_iter().find(|i| {
            i.kind == IdentityKind::ManagedIdentity && (&i.client_id == id || &i.object_id == id)
        }),
        None => shared
            .identities()
            .into_iter()
            .find(|i| i.kind == IdentityKind::ManagedIdentity),
    };
    let Some(identity) = identity.filter(|i| !i.disabled) else {
        // What both real endpoints answer when the identity is not assigned to the resource (or
        // was deleted).
        return (StatusCode::BAD_REQUEST, "Identity not found").into_response();
    };
    let now = now_secs();
    let (access_token, expires_on) =
        match shared.platform_cached(&identity.client_id, resource, now) {
            Some(cached) => cached,
            None => match issue(shared, Endpoint::ManagedIdentity, &identity, resource) {
                Ok((access_token, expires_in)) => {
                    let expires_on =
                        now + expires_in as i64 - shared.idp_clock_behind().as_secs() as i64;
                    shared.platform_keep(&identity.client_id, resource, &access_token, expires_on);
                    (access_token, expires_on)
                }
                Err(e) => return internal_error(e),
            },
        };
    axum::Json(json!({
        "access_token": access_token,
        "expires_on": expires_on.to_string(),
        "expires_in": (expires_on - now).max(0).to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": identity.client_id,
    }))
    .into_response()
}

/// The managed-identity request a shape of endpoint accepts: the header it requires, and what it
/// answers when the header is missing or wrong.
struct Requires {
    header: &'static str,
    value: fn(&Shared) -> &str,
    refusal: (StatusCode, &'static str),
}

async fn managed_identity(
    shared: &Shared,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    requires: Requires,
) -> Response {
    if let Some(response) = gate(shared, Endpoint::ManagedIdentity).await {
        return response;
    }
    let presented = headers.get(requires.header).and_then(|v| v.to_str().ok());
    if presented != Some((requires.value)(shared)) {
        return requires.refusal.into_response();
    }
    managed_identity_token(shared, query)
}

/// App Service: the secret from `IDENTITY_HEADER` in `X-IDENTITY-HEADER`.
async fn app_service_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let requires = Requires {
        header: "x-identity-header",
        value: |shared| &shared.identity_header,
        refusal: (
            StatusCode::UNAUTHORIZED,
            "X-IDENTITY-HEADER is missing or wrong",
        ),
    };
    managed_identity(&shared, &headers, &query, requires).await
}

/// IMDS: `Metadata: true`.
async fn imds_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let requires = Requires {
        header: "metadata",
        value: |_| "true",
        refusal: (
            StatusCode::BAD_REQUEST,
            "Required metadata header not specified",
        ),
    };
    managed_identity(&shared, &headers, &query, requires).await
}

async fn keys(State(shared): State<Arc<Shared>>) -> Response {
    if let Some(response) = gate(&shared, Endpoint::Keys).await {
        return response;
    }
    axum::Json(shared.issuer.jwks()).into_response()
}

async fn openid_configuration(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
) -> Response {
    if let Some(response) = gate(&shared, Endpoint::Keys).await {
        return response;
    }
    let base = "https://login.microsoftonline.com";
    let body: Value = json!({
        "issuer": format!("{base}/{tenant}/v2.0"),
        "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
        "jwks_uri": format!("{base}/{tenant}/discovery/v2.0/keys"),
        "id_token_signing_alg_values_supported": ["RS256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
    });
    axum::Json(body).into_response()
}
