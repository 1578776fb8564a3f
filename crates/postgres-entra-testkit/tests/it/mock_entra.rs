//! The mock Entra endpoints: realistic tokens, configurable lifetime, counters, and faults.

use azure_core::credentials::TokenCredential;
use azure_core::http::{Method, Request, StatusCode, Url};
use postgres_entra_testkit::{Emulator, Endpoint, Fault, Rejection, TOKEN_AUDIENCE, TokenOptions};
use std::time::{Duration, Instant};

use crate::{SCOPE, assert_refused, jwt_parts, login};

async fn get(
    emulator: &Emulator,
    path: &str,
) -> azure_core::Result<(StatusCode, Option<String>, Vec<u8>)> {
    let client = azure_core::http::new_http_client(None);
    let url = Url::parse(&format!("{}{path}", emulator.entra_url())).unwrap();
    let mut request = Request::new(url, Method::Get);
    request.insert_header("metadata", "true");
    let response = client.execute_request(&request).await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get_optional_str(&azure_core::http::headers::RETRY_AFTER)
        .map(str::to_owned);
    let body = response.into_body().collect().await?;
    Ok((status, retry_after, body.to_vec()))
}

const IMDS: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ossrdbms-aad.database.windows.net";

#[tokio::test]
async fn tokens_look_like_entra_tokens() {
    let emulator = Emulator::start_async().await.unwrap();
    let credential = emulator.managed_identity_credential().unwrap();
    let mi_token = credential.get_token(&[SCOPE], None).await.unwrap();
    let user_token = emulator
        .issue_token(&emulator.user(), TokenOptions::default())
        .unwrap();

    for token in [mi_token.token.secret(), user_token.as_str()] {
        assert!(token.len() >= 1200, "token is {} bytes", token.len());
        let (header, claims) = jwt_parts(token);
        assert_eq!(header["alg"], "RS256");
        assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
        for claim in [
            "aud", "iss", "iat", "nbf", "exp", "tid", "oid", "appid", "sub", "ver",
        ] {
            assert!(
                !claims[claim].is_null(),
                "claim {claim} missing in {claims}"
            );
        }
        assert_eq!(claims["aud"], TOKEN_AUDIENCE);
        assert_eq!(claims["tid"], emulator.tenant_id());
    }
    let (_, mi_claims) = jwt_parts(mi_token.token.secret());
    assert!(
        mi_claims["xms_mirid"]
            .as_str()
            .unwrap()
            .contains("Microsoft.ManagedIdentity")
    );
    let (_, user_claims) = jwt_parts(&user_token);
    assert_eq!(user_claims["upn"], "alice@contoso.onmicrosoft.com");

    // The signing key is published: the token's kid is in the JWKS.
    let (status, _, body) = get(
        &emulator,
        &format!("/{}/discovery/v2.0/keys", emulator.tenant_id()),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::Ok);
    let jwks: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let (header, _) = jwt_parts(&user_token);
    assert_eq!(jwks["keys"][0]["kid"], header["kid"]);
    assert_eq!(emulator.requests(Endpoint::Keys), 1);
}

#[tokio::test]
async fn token_lifetime_can_be_a_few_seconds_and_the_server_enforces_it() {
    let emulator = Emulator::builder()
        .token_lifetime(Duration::from_secs(2))
        .start_async()
        .await
        .unwrap();
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let token = credential.get_token(&[SCOPE], None).await.unwrap();
    let (_, claims) = jwt_parts(token.token.secret());
    // Like Entra, nbf and iat are backdated five minutes; exp is the lifetime from now.
    let lifetime = claims["exp"].as_i64().unwrap() - (claims["nbf"].as_i64().unwrap() + 300);
    assert_eq!(lifetime, 2);

    assert_eq!(
        login(&emulator, &sp.role_name, token.token.secret())
            .await
            .unwrap(),
        "orders-api"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_refused(login(&emulator, &sp.role_name, token.token.secret()).await);
    assert_eq!(
        emulator.logins().last().unwrap().outcome,
        Err(Rejection::Expired)
    );
}

#[tokio::test]
async fn server_errors_and_throttling_are_served_and_counted() {
    let emulator = Emulator::start_async().await.unwrap();

    emulator.set_fault(Endpoint::ManagedIdentity, Fault::ServerError);
    let (status, _, body) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::InternalServerError);
    assert!(String::from_utf8_lossy(&body).contains("AADSTS50001"));

    emulator.set_fault(
        Endpoint::ManagedIdentity,
        Fault::TooManyRequests {
            retry_after: Duration::from_secs(7),
        },
    );
    let (status, retry_after, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::TooManyRequests);
    assert_eq!(retry_after.as_deref(), Some("7"));

    emulator.clear_fault(Endpoint::ManagedIdentity);
    let (status, _, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::Ok);

    assert_eq!(emulator.requests(Endpoint::ManagedIdentity), 3);
    assert_eq!(emulator.faulted_requests(Endpoint::ManagedIdentity), 2);
    assert_eq!(emulator.tokens_issued(Endpoint::ManagedIdentity), 1);
}

#[tokio::test]
async fn malformed_bodies_and_dropped_connections_fail_the_credential() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    // The emulator's credentials do not retry (azure_core's default policy would retry a dropped
    // connection for up to 60 s).
    let credential = emulator.client_secret_credential(&sp).unwrap();

    emulator.set_fault(Endpoint::Token, Fault::MalformedBody);
    assert!(credential.get_token(&[SCOPE], None).await.is_err());
    emulator.set_fault(Endpoint::Token, Fault::DropConnection);
    assert!(credential.get_token(&[SCOPE], None).await.is_err());
    let (status, _, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::Ok, "other endpoints are unaffected");
    emulator.clear_fault(Endpoint::Token);
    assert!(credential.get_token(&[SCOPE], None).await.is_ok());

    assert_eq!(emulator.requests(Endpoint::Token), 3);
    assert_eq!(emulator.faulted_requests(Endpoint::Token), 2);
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);
}

#[tokio::test]
async fn a_dropped_connection_ends_without_a_response() {
    let emulator = Emulator::start_async().await.unwrap();
    emulator.set_fault(Endpoint::ManagedIdentity, Fault::DropConnection);

    let result = get(&emulator, IMDS).await;

    assert!(
        result.is_err(),
        "expected a transport error, got {:?}",
        result.map(|r| r.0)
    );
}

#[tokio::test]
async fn an_outage_window_ends_by_itself_and_latency_delays_answers() {
    let emulator = Emulator::start_async().await.unwrap();
    emulator.set_fault_for(
        Endpoint::ManagedIdentity,
        Fault::ServerError,
        Duration::from_millis(500),
    );
    let (status, _, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::InternalServerError);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::Ok);

    emulator.set_latency(Endpoint::ManagedIdentity, Duration::from_millis(300));
    let started = Instant::now();
    let (status, _, _) = get(&emulator, IMDS).await.unwrap();
    assert_eq!(status, StatusCode::Ok);
    assert!(started.elapsed() >= Duration::from_millis(300));
}
