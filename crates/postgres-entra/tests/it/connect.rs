//! Role names, rejected logins and the single retry, against the emulator.

use postgres_entra::{AccessToken, AzureTokenSource, Error, FnTokenSource, TokenSource};
use postgres_entra_testkit::{Emulator, Identity, Rejection, Signer, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crate::{connector, current_user};

/// A source minting tokens from the emulator: the `n`-th call gets `options(n)`.
fn minting(
    emulator: &Arc<Emulator>,
    identity: Identity,
    options: fn(usize) -> TokenOptions,
) -> (Arc<dyn TokenSource>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (emulator, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new(format!("minting-{}", identity.role_name), move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let token = emulator.issue_token(&identity, options(n)).unwrap();
        async move {
            Ok(AccessToken::new(
                token,
                SystemTime::now() + Duration::from_secs(3600),
            ))
        }
    });
    (source, calls)
}

#[tokio::test]
async fn a_managed_identity_logs_in_as_the_role_named_in_its_token() {
    let emulator = Emulator::start().unwrap();
    let credential = emulator.managed_identity_credential().unwrap();
    let connector = connector(&emulator, AzureTokenSource::new(credential), None);

    assert_eq!(
        current_user(&connector, &emulator.server_config())
            .await
            .unwrap(),
        "orders-mi"
    );
}

#[tokio::test]
async fn a_user_logs_in_as_their_user_principal_name() {
    let emulator = Arc::new(Emulator::start().unwrap());
    let (source, _) = minting(&emulator, emulator.user(), |_| TokenOptions::default());
    let connector = connector(&emulator, source, None);

    assert_eq!(
        current_user(&connector, &emulator.server_config())
            .await
            .unwrap(),
        "alice@contoso.onmicrosoft.com"
    );
}

#[tokio::test]
async fn the_configured_role_wins_over_the_connection_user_and_the_claims() {
    let emulator = Arc::new(Emulator::start().unwrap());
    let mi = emulator.managed_identity();
    let (source, _) = minting(&emulator, mi.clone(), |_| TokenOptions::default());
    let mut config = emulator.server_config();
    config.user("orders-mi");
    // The connection's user is used when no role is configured...
    let from_config = connector(&emulator, source.clone(), None);
    assert_eq!(
        current_user(&from_config, &config).await.unwrap(),
        "orders-mi"
    );
    // ...and the configured role overrides it.
    let configured = connector(&emulator, source, Some("orders-api"));
    let error = current_user(&configured, &config).await.unwrap_err();
    assert!(
        matches!(&error, Error::LoginRejected { role, .. } if role == "orders-api"),
        "{error}"
    );
}

#[tokio::test]
async fn an_app_only_token_without_a_configured_role_is_a_clear_error() {
    let emulator = Emulator::start().unwrap();
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let connector = connector(&emulator, AzureTokenSource::new(credential), None);

    let error = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();

    assert!(matches!(error, Error::Config { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("service principal's display name"),
        "{error}"
    );
    assert!(
        emulator.logins().is_empty(),
        "no login was attempted under a guessed name"
    );
}

#[tokio::test]
async fn a_rejected_token_is_replaced_and_the_login_retried_once() {
    let emulator = Arc::new(Emulator::start().unwrap());
    // The first token is a forgery the server refuses; the second is good.
    let (source, calls) = minting(&emulator, emulator.user(), |n| {
        TokenOptions::default().signer(if n == 1 {
            Signer::Rogue
        } else {
            Signer::Issuer
        })
    });
    let connector = connector(&emulator, source, None);

    let user = current_user(&connector, &emulator.server_config())
        .await
        .unwrap();

    assert_eq!(user, "alice@contoso.onmicrosoft.com");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let outcomes: Vec<_> = emulator.logins().into_iter().map(|l| l.outcome).collect();
    assert_eq!(outcomes, [Err(Rejection::BadSignature), Ok(())]);
    assert_eq!(connector.cache().stats().invalidations, 1);
}

#[tokio::test]
async fn a_token_for_another_identity_is_a_rejected_login_after_exactly_one_retry() {
    let emulator = Arc::new(Emulator::start().unwrap());
    let (source, calls) = minting(&emulator, emulator.managed_identity(), |_| {
        TokenOptions::default()
    });
    let connector = connector(&emulator, source, Some("orders-api"));

    let error = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();

    match &error {
        Error::LoginRejected {
            role,
            code,
            message,
        } => {
            assert_eq!(role, "orders-api");
            assert_eq!(code, "28000");
            assert!(message.contains("LDAP authentication failed"), "{message}");
        }
        other => panic!("expected LoginRejected, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("also with a freshly fetched token")
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one fresh token for the one retry"
    );
    let outcomes: Vec<_> = emulator.logins().into_iter().map(|l| l.outcome).collect();
    assert_eq!(
        outcomes,
        [Err(Rejection::WrongIdentity), Err(Rejection::WrongIdentity)]
    );
}

#[tokio::test]
async fn plaintext_and_unix_socket_configurations_are_refused_before_connecting() {
    let emulator = Arc::new(Emulator::start().unwrap());
    let (source, calls) = minting(&emulator, emulator.user(), |_| TokenOptions::default());
    let connector = connector(&emulator, source, None);

    let mut plaintext = emulator.server_config();
    plaintext.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let error = current_user(&connector, &plaintext).await.unwrap_err();
    assert!(
        matches!(error, Error::Config { .. }) && error.to_string().contains("sslmode=disable"),
        "{error}"
    );

    let mut socket = tokio_postgres::Config::new();
    socket.host_path("/tmp").dbname("postgres");
    let error = current_user(&connector, &socket).await.unwrap_err();
    assert!(error.to_string().contains("Unix-socket"), "{error}");

    let mut binding = emulator.server_config();
    binding.channel_binding(tokio_postgres::config::ChannelBinding::Require);
    assert!(matches!(
        current_user(&connector, &binding).await.unwrap_err(),
        Error::Config { .. }
    ));

    // A public-cloud token for a server plainly in US Government.
    let mut gov = tokio_postgres::Config::new();
    gov.host("db1.postgres.database.usgovcloudapi.net")
        .hostaddr([127, 0, 0, 1].into())
        .port(emulator.port())
        .dbname("postgres");
    let error = current_user(&connector, &gov).await.unwrap_err();
    assert!(error.to_string().contains("Cloud::UsGovernment"), "{error}");

    assert_eq!(calls.load(Ordering::SeqCst), 0, "no token was even fetched");
    assert!(emulator.logins().is_empty());
}

#[tokio::test]
async fn debug_of_connectors_and_errors_shows_no_token() {
    let emulator = Arc::new(Emulator::start().unwrap());
    let (source, _) = minting(&emulator, emulator.managed_identity(), |_| {
        TokenOptions::default()
    });
    let connector = connector(&emulator, source.clone(), Some("orders-api"));
    let error = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();
    let token = connector.cache().get().await.unwrap();

    let rendered = format!(
        "{connector:?} {error:?} {error} {token:?} {source:?} {:?}",
        connector.cache()
    );
    for issued in emulator.issued_tokens() {
        assert!(
            !rendered.contains(&issued),
            "a token leaked into: {rendered}"
        );
        assert!(
            !rendered.contains(&issued[issued.len() - 40..]),
            "a token's signature leaked"
        );
    }
}
