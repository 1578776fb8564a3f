//! azure_identity's own credential types obtain tokens from the mock, and the tokens log in.

use azure_core::credentials::TokenCredential;
use postgres_entra_testkit::{Emulator, Endpoint};
use std::time::{Duration, SystemTime};

use crate::{SCOPE, jwt_parts, login};

#[tokio::test]
async fn client_secret_credential_gets_a_token_that_logs_in() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();

    let token = credential.get_token(&[SCOPE], None).await.unwrap();

    assert_eq!(emulator.requests(Endpoint::Token), 1);
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);
    assert_eq!(
        emulator.transport().original_hosts(),
        ["login.microsoftonline.com"],
        "the credential addressed Entra and the transport took it to loopback"
    );
    let (_, claims) = jwt_parts(token.token.secret());
    assert_eq!(claims["appid"], sp.client_id.as_str());
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(
        login(&emulator, &sp.role_name, token.token.secret())
            .await
            .unwrap(),
        "orders-api"
    );
}

#[tokio::test]
async fn client_secret_credential_with_a_wrong_secret_gets_no_token() {
    let emulator = Emulator::start_async().await.unwrap();
    let mut sp = emulator.service_principal();
    sp.client_secret = Some("not-the-secret".into());
    let credential = emulator.client_secret_credential(&sp).unwrap();

    let error = credential.get_token(&[SCOPE], None).await.unwrap_err();

    assert!(error.to_string().contains("7000215"), "{error}");
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 0);
}

#[tokio::test]
async fn workload_identity_credential_gets_a_token_with_a_client_assertion() {
    let emulator = Emulator::start_async().await.unwrap();
    let workload = emulator.workload_identity();
    let credential = emulator.workload_identity_credential(&workload).unwrap();

    let token = credential.get_token(&[SCOPE], None).await.unwrap();

    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);
    assert_eq!(
        login(&emulator, &workload.role_name, token.token.secret())
            .await
            .unwrap(),
        "orders-worker"
    );
}

#[tokio::test]
async fn a_client_assertion_for_another_subject_is_refused() {
    let emulator = Emulator::start_async().await.unwrap();
    // The secret-only principal has no federated credential: an assertion cannot authenticate it.
    let sp = emulator.service_principal();
    let mut impostor = emulator.workload_identity();
    impostor.client_id = sp.client_id.clone();
    let credential = emulator.workload_identity_credential(&impostor).unwrap();

    let error = credential.get_token(&[SCOPE], None).await.unwrap_err();

    assert!(error.to_string().contains("7000215"), "{error}");
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 0);
}

#[tokio::test]
async fn managed_identity_credential_on_the_imds_path_is_redirected_to_the_mock() {
    let emulator = Emulator::start_async().await.unwrap();
    let mi = emulator.managed_identity();
    if std::env::var_os("IDENTITY_ENDPOINT").is_some() {
        // This process runs with an App Service environment; the child test below covers that.
        return;
    }
    let credential = emulator.managed_identity_credential().unwrap();

    let token = credential.get_token(&[SCOPE], None).await.unwrap();

    assert_eq!(emulator.tokens_issued(Endpoint::ManagedIdentity), 1);
    let (_, claims) = jwt_parts(token.token.secret());
    assert!(
        claims["xms_mirid"]
            .as_str()
            .unwrap()
            .ends_with("/orders-mi")
    );
    assert_eq!(
        login(&emulator, &mi.role_name, token.token.secret())
            .await
            .unwrap(),
        "orders-mi"
    );
}

/// `ManagedIdentityCredential` reads `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` from the process
/// environment, which a test must not change under other threads. So this test runs the credential
/// in a child process (this same test binary, running only [`app_service_child`]) with that
/// environment set, and checks the token the child obtained.
#[tokio::test]
async fn managed_identity_credential_gets_a_token_from_the_app_service_endpoint() {
    let emulator = Emulator::start_async().await.unwrap();
    let mi = emulator.managed_identity();
    let out = emulator.directory().join("mi-token");

    let status = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "credentials::app_service_child",
            "--ignored",
            "--nocapture",
        ])
        .envs(emulator.app_service_env())
        .env("TESTKIT_MI_TOKEN_OUT", &out)
        .env_remove("NEXTEST_TEST_FILTER")
        .status()
        .await
        .unwrap();

    assert!(status.success(), "child test failed: {status}");
    let token = std::fs::read_to_string(&out).unwrap();
    assert_eq!(emulator.requests(Endpoint::ManagedIdentity), 1);
    assert_eq!(emulator.tokens_issued(Endpoint::ManagedIdentity), 1);
    assert_eq!(
        login(&emulator, &mi.role_name, &token).await.unwrap(),
        "orders-mi"
    );
}

#[tokio::test]
#[ignore = "run by managed_identity_credential_gets_a_token_from_the_app_service_endpoint"]
async fn app_service_child() {
    let Some(out) = std::env::var_os("TESTKIT_MI_TOKEN_OUT") else {
        return;
    };
    // Never build a managed-identity credential that could fall through to IMDS.
    let endpoint = std::env::var("IDENTITY_ENDPOINT").expect("IDENTITY_ENDPOINT is set");
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    let credential = azure_identity::ManagedIdentityCredential::new(None).unwrap();

    let token = credential.get_token(&[SCOPE], None).await.unwrap();

    let remaining = SystemTime::from(token.expires_on)
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        remaining > Duration::from_secs(3000),
        "expires_on parsed: {remaining:?}"
    );
    std::fs::write(out, token.token.secret()).unwrap();
}
