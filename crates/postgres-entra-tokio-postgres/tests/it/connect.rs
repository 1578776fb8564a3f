//! Role names, rejected logins and the single retry, against the emulator.

use postgres_entra::{AzureTokenSource, Error, LoginRetry, RoleSource};
use postgres_entra_testkit::{Emulator, Endpoint, Rejection, Signer, TokenOptions};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::{connector, current_user, minting};

#[tokio::test]
async fn a_managed_identity_logs_in_as_the_role_named_in_its_token() {
    let emulator = Emulator::start_async().await.unwrap();
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
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
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
async fn the_configured_role_wins_over_the_claims_and_a_different_user_is_refused() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
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
    // ...the same name in both is that role...
    let same = connector(&emulator, source.clone(), Some("orders-mi"));
    assert_eq!(current_user(&same, &config).await.unwrap(), "orders-mi");
    // ...and another one is refused before any login, naming both: neither overrides the other.
    let logins = emulator.logins().len();
    let configured = connector(&emulator, source.clone(), Some("orders-api"));
    let error = current_user(&configured, &config).await.unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("`orders-api`") && text.contains("`orders-mi`"),
        "{text}"
    );
    assert_eq!(emulator.logins().len(), logins, "no login was tried");
    // Without a user in the settings, the configured role wins over the token's name.
    let error = current_user(&configured, &emulator.server_config())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::LoginRejected(r) if r.role() == "orders-api" && *r.role_source() == RoleSource::Connector),
        "{error}"
    );
}

#[tokio::test]
async fn an_app_only_token_without_a_configured_role_is_a_clear_error() {
    let emulator = Emulator::start_async().await.unwrap();
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
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
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
async fn a_fresh_token_refused_too_is_a_rejection_that_says_what_to_fix() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    // A provider that mints a new token on every call, for the managed identity.
    let (source, calls) = minting(&emulator, emulator.managed_identity(), |_| {
        TokenOptions::default()
    });
    let connector = connector(&emulator, source, Some("orders-api"));

    let error = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();

    let Error::LoginRejected(rejected) = &error else {
        panic!("expected LoginRejected, got {error:?}");
    };
    assert_eq!(rejected.role(), "orders-api");
    assert_eq!(*rejected.role_source(), RoleSource::Connector);
    assert_eq!(rejected.code(), "28000");
    assert!(
        rejected
            .server_message()
            .contains("LDAP authentication failed")
    );
    assert!(matches!(rejected.retry(), LoginRetry::FreshTokenRefused));
    let claims = rejected.token_claims().unwrap();
    assert_eq!(claims.managed_identity_name(), Some("orders-mi"));
    assert_eq!(
        claims.object_id(),
        Some(emulator.managed_identity().object_id.as_str())
    );
    let text = error.to_string();
    for expected in [
        "role `orders-api` (set with the connector's role_name)",
        "28000",
        "a freshly fetched token",
        "so the token is not the problem",
        "managed identity `orders-mi`",
        "names the principal `orders-mi` (xms_mirid)",
        "pgaadauth_create_principal",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in {text}");
    }
    for token in emulator.issued_tokens() {
        assert!(!text.contains(&token) && !format!("{error:?}").contains(&token));
    }
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

    // The next connect with the same misconfiguration costs one login and no token request.
    let again = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();
    assert!(
        matches!(&again, Error::LoginRejected(r) if matches!(r.retry(), LoginRetry::AlreadyReplaced)),
        "{again}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(emulator.logins().len(), 3);
    assert_eq!(connector.cache().stats().invalidations, 1);
}

#[tokio::test]
async fn a_real_credential_returning_its_cached_token_gets_no_pointless_retry() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    // azure_identity's ClientSecretCredential keeps its token until 5 minutes before expiry.
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let connector = connector(
        &emulator,
        AzureTokenSource::new(credential),
        Some("orders-mi"),
    );

    for attempt in 1..=3 {
        let error = current_user(&connector, &emulator.server_config())
            .await
            .unwrap_err();
        let Error::LoginRejected(rejected) = &error else {
            panic!("expected LoginRejected, got {error:?}");
        };
        assert!(
            matches!(rejected.retry(), LoginRetry::SameTokenReturned),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("returns the same one, so a new token would not help"),
            "{error}"
        );
        assert_eq!(
            rejected.token_claims().unwrap().app_id(),
            Some(sp.client_id.as_str())
        );
        assert_eq!(
            emulator.logins().len(),
            attempt,
            "one login per connect, no retry"
        );
    }
    assert_eq!(
        emulator.requests(Endpoint::Token),
        1,
        "one token request in all"
    );
    assert_eq!(connector.cache().stats().invalidations, 1);
}

#[tokio::test]
async fn an_empty_connection_user_leaves_the_role_to_the_token() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, _) = minting(&emulator, emulator.user(), |_| TokenOptions::default());
    let connector = connector(&emulator, source, None);
    let mut config = emulator.server_config();
    config.user("");

    assert_eq!(
        current_user(&connector, &config).await.unwrap(),
        "alice@contoso.onmicrosoft.com"
    );
}

#[tokio::test]
async fn a_closed_port_is_a_network_error_naming_the_target() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, _) = minting(&emulator, emulator.user(), |_| TokenOptions::default());
    let connector = connector(&emulator, source, None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut config = tokio_postgres::Config::new();
    config.host("localhost").port(port).dbname("postgres");

    let error = current_user(&connector, &config).await.unwrap_err();

    match &error {
        Error::Connect { target, source, .. } => {
            assert_eq!(target, &format!("localhost:{port}"));
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{source}"
            );
        }
        other => panic!("expected a network error, got {other:?}"),
    }
    assert!(error.is_transient());
    assert!(
        error.to_string().contains("check the host name, the port"),
        "{error}"
    );
}

#[tokio::test]
async fn plaintext_and_unix_socket_configurations_are_refused_before_connecting() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let (source, calls) = minting(&emulator, emulator.user(), |_| TokenOptions::default());
    let connector = connector(&emulator, source.clone(), None);

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

    // A connector told the public cloud, and a server plainly in US Government.
    let connector = postgres_entra::EntraConnector::builder(source)
        .cloud(postgres_entra::Cloud::Public)
        .tls_roots(postgres_entra::TlsRoots::CaPem(
            emulator.ca_pem().to_owned(),
        ))
        .build()
        .unwrap();
    let mut gov = tokio_postgres::Config::new();
    gov.host("db1.postgres.database.usgovcloudapi.net")
        .hostaddr([127, 0, 0, 1].into())
        .port(emulator.port())
        .dbname("postgres");
    let error = current_user(&connector, &gov).await.unwrap_err();
    assert!(error.to_string().contains("Cloud::UsGovernment"), "{error}");
    assert!(
        error.to_string().contains("each pool's host decides"),
        "the fix names the way out: {error}"
    );

    assert_eq!(calls.load(Ordering::SeqCst), 0, "no token was even fetched");
    assert!(emulator.logins().is_empty());
}

#[tokio::test]
async fn debug_of_connectors_and_errors_shows_no_token() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
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

#[tokio::test]
async fn a_group_member_logs_in_as_the_group_with_its_own_token_until_removed() {
    let emulator = Arc::new(Emulator::start_async().await.unwrap());
    let alice = emulator.user();
    let readers = emulator
        .add_group("db-readers", std::slice::from_ref(&alice))
        .await
        .unwrap();
    let (source, _) = minting(&emulator, alice.clone(), |_| TokenOptions::default());
    let connector = connector(&emulator, source, None);
    // The group's name as the user: the token (alice's) must not override it.
    let mut as_group = emulator.server_config();
    as_group.user("db-readers");

    assert_eq!(
        current_user(&connector, &as_group).await.unwrap(),
        "db-readers"
    );
    assert_eq!(
        current_user(&connector, &emulator.server_config())
            .await
            .unwrap(),
        "alice@contoso.onmicrosoft.com",
        "without a user, the token names her own role"
    );

    emulator.remove_group_member(&readers, &alice).unwrap();
    let error = current_user(&connector, &as_group).await.unwrap_err();
    let Error::LoginRejected(rejected) = &error else {
        panic!("expected LoginRejected, got {error:?}");
    };
    assert_eq!(*rejected.role_source(), RoleSource::ConnectionConfig);
    assert!(
        error.to_string().contains("must be a member of the group"),
        "{error}"
    );
    let outcomes: Vec<_> = emulator.logins().into_iter().map(|l| l.outcome).collect();
    assert_eq!(outcomes.last(), Some(&Err(Rejection::NotAMember)));
}
