//! What the identity provider says reaches the caller, classified, with azure_identity's real
//! credentials against the mock Entra endpoints: the HTTP status, Entra's error code and
//! description, and a kind to act on.

use postgres_entra::{AzureTokenSource, CacheOptions, TokenCache, TokenErrorKind};
use postgres_entra_testkit::{Emulator, Endpoint, Fault, in_app_service_child, run_test_in_child};
use std::time::{Duration, Instant};

fn cache(source: AzureTokenSource, options: CacheOptions) -> TokenCache {
    TokenCache::builder(source)
        .options(options)
        .build()
        .unwrap()
}

fn client_secret_cache(emulator: &Emulator) -> TokenCache {
    let credential = emulator
        .client_secret_credential(&emulator.service_principal())
        .unwrap();
    cache(AzureTokenSource::new(credential), CacheOptions::default())
}

#[tokio::test]
async fn a_server_error_reaches_the_caller_typed_and_at_once() {
    let emulator = Emulator::start_async().await.unwrap();
    let cache = client_secret_cache(&emulator);
    emulator.set_fault(Endpoint::Token, Fault::ServerError);

    let started = Instant::now();
    let error = cache.get().await.unwrap_err();
    let took = started.elapsed();

    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(error.kind(), TokenErrorKind::ServerError);
    assert_eq!(error.http_status(), Some(500));
    assert_eq!(
        error.provider_code(),
        Some("temporarily_unavailable (AADSTS50001)")
    );
    let text = format!("{:#}", anyhow::Error::new(error.clone()));
    assert!(
        text.contains("HTTP 500 temporarily_unavailable; the identity provider is failing")
            && text.ends_with(
                ": AADSTS50001: The service is temporarily unavailable (injected fault)"
            ),
        "{text}"
    );
    assert_eq!(text.matches("AADSTS50001").count(), 1, "{text}");
    assert!(
        text.contains("ClientSecretCredential (client id "),
        "{text}"
    );
    assert_eq!(emulator.requests(Endpoint::Token), 1, "no retry underneath");
}

#[tokio::test]
async fn every_kind_of_provider_failure_is_classified() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let fast_retry =
        CacheOptions::default().backoff(Duration::from_millis(10), Duration::from_millis(10));

    // A wrong secret: the credential is rejected, and Entra's code and description say why.
    let mut wrong = sp.clone();
    wrong.client_secret = Some("not-the-secret".into());
    let rejected = cache(
        AzureTokenSource::new(emulator.client_secret_credential(&wrong).unwrap()),
        fast_retry.clone(),
    );
    let error = rejected.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::CredentialRejected, "{error}");
    assert_eq!(error.http_status(), Some(401));
    assert_eq!(
        error.provider_code(),
        Some("invalid_client (AADSTS7000215)")
    );
    let provider = error.provider_error().expect("the provider's error");
    assert!(provider.to_string().contains("AADSTS7000215"), "{error}");

    let credential = emulator.client_secret_credential(&sp).unwrap();
    let cases = [
        (
            Fault::TooManyRequests {
                retry_after: Duration::from_secs(7),
            },
            TokenErrorKind::Throttled,
            Some(429),
        ),
        (Fault::ServerError, TokenErrorKind::ServerError, Some(500)),
        (Fault::MalformedBody, TokenErrorKind::InvalidResponse, None),
        (Fault::DropConnection, TokenErrorKind::Unreachable, None),
    ];
    for (fault, kind, status) in cases {
        emulator.set_fault(Endpoint::Token, fault);
        let cache = cache(
            AzureTokenSource::new(credential.clone()),
            fast_retry.clone(),
        );
        let error = cache.get().await.unwrap_err();
        assert_eq!(error.kind(), kind, "{fault:?}: {error}");
        assert_eq!(error.http_status(), status, "{fault:?}: {error}");
        if let Fault::TooManyRequests { retry_after } = fault {
            assert_eq!(error.provider_retry_after(), Some(retry_after));
        }
    }

    // Nothing listening where the provider should be.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let transport = postgres_entra_testkit::LoopbackTransport::new(nowhere);
    let unreachable = azure_identity::ClientSecretCredential::new(
        emulator.tenant_id(),
        sp.client_id.clone(),
        sp.client_secret.clone().unwrap().into(),
        Some(azure_identity::ClientSecretCredentialOptions {
            client_options: transport.client_options(),
        }),
    )
    .unwrap();
    let error = cache(AzureTokenSource::new(unreachable), fast_retry)
        .get()
        .await
        .unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::Unreachable, "{error}");
    assert!(
        error.to_string().contains("check network access"),
        "{error}"
    );
}

#[tokio::test]
async fn with_azure_cores_default_retries_a_failing_provider_shows_up_as_a_timeout_that_says_so() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    // What `ClientSecretCredential::new(.., None)` does: azure_core retries 500s itself.
    let credential = azure_identity::ClientSecretCredential::new(
        emulator.tenant_id(),
        sp.client_id.clone(),
        sp.client_secret.clone().unwrap().into(),
        Some(azure_identity::ClientSecretCredentialOptions {
            client_options: emulator.transport().client_options_with_default_retries(),
        }),
    )
    .unwrap();
    let cache = cache(
        AzureTokenSource::new(credential),
        CacheOptions::default().fetch_timeout(Duration::from_secs(2)),
    );
    emulator.set_fault(Endpoint::Token, Fault::ServerError);

    let error = cache.get().await.unwrap_err();

    assert_eq!(error.kind(), TokenErrorKind::Timeout, "{error}");
    assert!(
        error
            .to_string()
            .contains("no answer from the identity provider within 2 s"),
        "{error}"
    );
    assert!(
        emulator.requests(Endpoint::Token) >= 3,
        "azure_core retried underneath: {} requests",
        emulator.requests(Endpoint::Token)
    );
}

#[tokio::test]
async fn credentials_are_named_by_kind_and_client_id() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let secret = AzureTokenSource::new(emulator.client_secret_credential(&sp).unwrap());
    let workload = emulator.workload_identity();
    let federated =
        AzureTokenSource::new(emulator.workload_identity_credential(&workload).unwrap());
    let managed = AzureTokenSource::new(emulator.managed_identity_credential().unwrap());

    use postgres_entra::TokenSource as _;
    assert_eq!(
        secret.identity(),
        format!("ClientSecretCredential (client id {})", sp.client_id)
    );
    assert!(
        federated
            .identity()
            .starts_with("WorkloadIdentityCredential"),
        "{}",
        federated.identity()
    );
    assert_eq!(managed.identity(), "ManagedIdentityCredential");
    assert_eq!(
        AzureTokenSource::new(emulator.managed_identity_credential().unwrap())
            .with_identity("orders-mi")
            .identity(),
        "orders-mi"
    );
}

/// `ManagedIdentityCredential` reads `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` from the process
/// environment, so the App Service path runs in a child process ([`app_service_child`]).
#[tokio::test]
async fn a_managed_identity_endpoint_answering_500_is_a_typed_error_at_once() {
    let emulator = Emulator::start_async().await.unwrap();
    emulator.set_fault(Endpoint::ManagedIdentity, Fault::ServerError);

    let output = run_test_in_child(
        "provider_errors::app_service_child",
        emulator.app_service_env(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();

    assert!(output.contains("child: ServerError HTTP 500"), "{output}");
    assert_eq!(emulator.requests(Endpoint::ManagedIdentity), 1);
}

#[tokio::test]
#[ignore = "run by a_managed_identity_endpoint_answering_500_is_a_typed_error_at_once"]
async fn app_service_child() {
    if !in_app_service_child() {
        return;
    }
    // As the README builds it: the library's own constructor.
    let source = AzureTokenSource::managed_identity(None).unwrap();
    let cache = cache(source, CacheOptions::default());

    let started = Instant::now();
    let error = cache.get().await.unwrap_err();

    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.kind(), TokenErrorKind::ServerError, "{error}");
    assert!(error.to_string().contains("HTTP 500"), "{error}");
    println!(
        "child: {:?} HTTP {}",
        error.kind(),
        error.http_status().unwrap()
    );
}

#[tokio::test]
async fn the_imds_credential_keeps_its_own_retries_so_a_failing_endpoint_is_a_timeout() {
    let emulator = Emulator::start_async().await.unwrap();
    if std::env::var_os("IDENTITY_ENDPOINT").is_some() {
        return; // This process has an App Service environment: the credential would not use IMDS.
    }
    // azure_identity's VM credential overrides the retry options with Microsoft's IMDS guidance
    // (6 retries, the first after about 2.7 s, up to 72 s); the transport only reaches loopback.
    let credential = emulator.managed_identity_credential().unwrap();
    let cache = cache(
        AzureTokenSource::new(credential),
        CacheOptions::default().fetch_timeout(Duration::from_secs(4)),
    );
    emulator.set_fault(Endpoint::ManagedIdentity, Fault::ServerError);

    let error = cache.get().await.unwrap_err();

    assert_eq!(error.kind(), TokenErrorKind::Timeout, "{error}");
    assert!(
        emulator.requests(Endpoint::ManagedIdentity) >= 2,
        "the credential retried underneath"
    );
}
