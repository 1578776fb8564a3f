//! The emulator plays every Azure server name at once, each accepting only its own audience, and
//! Entra groups and disabled principals behave as on Azure.

use postgres_entra_testkit::{AzureServer, Emulator, Endpoint, Rejection, TokenOptions};

use crate::{SCOPE, assert_refused};

/// Logs in to `server` as `role` with `token`; returns `current_user`.
async fn login_to(
    emulator: &Emulator,
    server: AzureServer,
    role: &str,
    token: &str,
) -> Result<String, tokio_postgres::Error> {
    let mut config = emulator.server_config_for(server);
    config.user(role).password(token);
    let (client, connection) = config.connect(emulator.tls().unwrap()).await?;
    tokio::spawn(connection);
    Ok(client.query_one("select current_user", &[]).await?.get(0))
}

#[tokio::test]
async fn each_azure_name_is_verified_over_tls_and_accepts_only_its_own_audience() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();

    for server in AzureServer::ALL {
        for token_for in AzureServer::ALL {
            let token = emulator
                .issue_token(&sp, TokenOptions::default().audience(token_for.audience()))
                .unwrap();
            let result = login_to(&emulator, server, &sp.role_name, &token).await;
            if server == token_for {
                assert_eq!(result.unwrap(), sp.role_name, "{server:?}");
            } else {
                assert_refused(result);
                let last = emulator.logins().pop().unwrap();
                assert_eq!(
                    last.outcome,
                    Err(Rejection::WrongAudience),
                    "{server:?} took a token for {token_for:?}"
                );
            }
        }
    }
    assert_eq!(emulator.logins().len(), 16);
}

#[tokio::test]
async fn a_name_the_certificate_does_not_carry_fails_verification() {
    let emulator = Emulator::start_async().await.unwrap();
    let port = emulator
        .server_config_for(AzureServer::UsGovernment)
        .get_ports()[0];
    let mut config = tokio_postgres::Config::new();
    config
        .host("other.postgres.database.usgovcloudapi.net")
        .hostaddr(AzureServer::UsGovernment.address())
        .port(port)
        .dbname("postgres")
        .user("orders-api")
        .password("not-sent");
    let error = config
        .connect(emulator.tls().unwrap())
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{error:?}").contains("NotValidForName"),
        "{error:?}"
    );
    assert!(emulator.logins().is_empty(), "no password was sent");
}

#[tokio::test]
async fn a_group_member_logs_in_as_the_group_until_removed() {
    let emulator = Emulator::start_async().await.unwrap();
    let alice = emulator.user();
    let sp = emulator.service_principal();
    let readers = emulator
        .add_group("db-readers", &[alice.clone(), sp.clone()])
        .await
        .unwrap();
    let alices = emulator
        .issue_token(&alice, TokenOptions::default())
        .unwrap();
    let sps = emulator.issue_token(&sp, TokenOptions::default()).unwrap();
    let mi = emulator
        .issue_token(&emulator.managed_identity(), TokenOptions::default())
        .unwrap();
    let public = AzureServer::Public;

    // Each member with its own token, as the group; a non-member is refused.
    assert_eq!(
        login_to(&emulator, public, "db-readers", &alices)
            .await
            .unwrap(),
        "db-readers"
    );
    assert_eq!(
        login_to(&emulator, public, "db-readers", &sps)
            .await
            .unwrap(),
        "db-readers"
    );
    assert_refused(login_to(&emulator, public, "db-readers", &mi).await);
    assert_eq!(
        emulator.logins().pop().unwrap().outcome,
        Err(Rejection::NotAMember)
    );
    assert!(
        emulator
            .issue_token(&readers, TokenOptions::default())
            .is_err()
    );

    // Removed from the group: the next login is refused, the same token still logs in as herself.
    emulator.remove_group_member(&readers, &alice).unwrap();
    assert_refused(login_to(&emulator, public, "db-readers", &alices).await);
    assert_eq!(
        emulator.logins().pop().unwrap().outcome,
        Err(Rejection::NotAMember)
    );
    assert_eq!(
        login_to(&emulator, public, &alice.role_name, &alices)
            .await
            .unwrap(),
        alice.role_name
    );
    assert_eq!(
        login_to(&emulator, public, "db-readers", &sps)
            .await
            .unwrap(),
        "db-readers"
    );
}

#[tokio::test]
async fn a_disabled_principal_gets_no_new_token_but_its_unexpired_one_still_logs_in() {
    use azure_core::credentials::TokenCredential as _;
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let token = credential.get_token(&[SCOPE], None).await.unwrap();

    emulator.disable(&sp).unwrap();

    let fresh = emulator.client_secret_credential(&sp).unwrap();
    let error = fresh.get_token(&[SCOPE], None).await.unwrap_err();
    assert!(error.to_string().contains("7000112"), "{error}");
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);
    assert_eq!(
        login_to(
            &emulator,
            AzureServer::Public,
            &sp.role_name,
            token.token.secret()
        )
        .await
        .unwrap(),
        sp.role_name
    );
}
