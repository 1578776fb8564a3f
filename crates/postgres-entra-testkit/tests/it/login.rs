//! A real client logs in with a valid token; every kind of bad token, and a client without TLS, is
//! refused, each for its own reason.

use postgres_entra_testkit::{Emulator, Rejection, Signer, TokenOptions};

use crate::{assert_refused, login};

fn last_outcome(emulator: &Emulator) -> Result<(), Rejection> {
    emulator
        .logins()
        .last()
        .expect("a login was checked")
        .outcome
        .clone()
}

#[tokio::test]
async fn tokio_postgres_over_rustls_logs_in_with_a_fresh_token() {
    let emulator = Emulator::start_async().await.unwrap();
    let user = emulator.user();
    let token = emulator
        .issue_token(&user, TokenOptions::default())
        .unwrap();
    assert!(token.len() >= 1200, "token is {} bytes", token.len());

    let current_user = login(&emulator, &user.role_name, &token).await.unwrap();

    assert_eq!(current_user, "alice@contoso.onmicrosoft.com");
    assert_eq!(emulator.logins().len(), 1);
    assert_eq!(last_outcome(&emulator), Ok(()));
}

#[tokio::test]
async fn psql_logs_in_with_pgpassword_and_verify_full() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    let token = emulator.issue_token(&sp, TokenOptions::default()).unwrap();

    let output = tokio::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-c", "select current_user"])
        .env("PGHOST", emulator.host())
        .env("PGPORT", emulator.port().to_string())
        .env("PGDATABASE", emulator.database())
        .env("PGUSER", &sp.role_name)
        .env("PGPASSWORD", &token)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", emulator.ca_cert_path())
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .await
        .expect("psql runs (the PostgreSQL client is installed by `make test`)");

    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "orders-api");
}

/// Each kind of bad token is refused, for its own reason; an expired one with the message a client
/// sees.
#[tokio::test]
async fn each_kind_of_bad_token_is_refused_for_its_own_reason() {
    let emulator = Emulator::start_async().await.unwrap();
    let user = emulator.user();
    for (options, reason) in [
        (TokenOptions::default().expires_in(-1), Rejection::Expired),
        (
            TokenOptions::default().not_before_in(120),
            Rejection::NotYetValid,
        ),
        (
            TokenOptions::default().audience("https://management.azure.com"),
            Rejection::WrongAudience,
        ),
        (
            TokenOptions::default().signer(Signer::Rogue),
            Rejection::BadSignature,
        ),
    ] {
        let token = emulator.issue_token(&user, options).unwrap();

        let message = assert_refused(login(&emulator, &user.role_name, &token).await);
        assert!(message.contains("LDAP authentication failed"), "{message}");
        assert_eq!(last_outcome(&emulator), Err(reason));
    }
}

#[tokio::test]
async fn a_token_for_another_identity_is_refused() {
    let emulator = Emulator::start_async().await.unwrap();
    let mi = emulator.managed_identity();
    let sp = emulator.service_principal();
    let mi_token = emulator.issue_token(&mi, TokenOptions::default()).unwrap();

    assert_refused(login(&emulator, &sp.role_name, &mi_token).await);
    assert_eq!(last_outcome(&emulator), Err(Rejection::WrongIdentity));
    // The same token is good for its own role.
    assert_eq!(
        login(&emulator, &mi.role_name, &mi_token).await.unwrap(),
        "orders-mi"
    );
}

#[tokio::test]
async fn a_role_that_is_no_entra_principal_is_refused() {
    let emulator = Emulator::start_async().await.unwrap();
    let token = emulator
        .issue_token(&emulator.user(), TokenOptions::default())
        .unwrap();

    assert_refused(login(&emulator, "postgres", &token).await);
    assert_eq!(last_outcome(&emulator), Err(Rejection::UnknownRole));
}

#[tokio::test]
async fn a_client_without_tls_is_refused_before_any_password_is_asked() {
    let emulator = Emulator::start_async().await.unwrap();
    let user = emulator.user();
    let token = emulator
        .issue_token(&user, TokenOptions::default())
        .unwrap();
    let mut config = emulator.pg_config(&user.role_name);
    config
        .password(token.as_str())
        .ssl_mode(tokio_postgres::config::SslMode::Disable);

    let Err(error) = config.connect(tokio_postgres::NoTls).await else {
        panic!("a plaintext login must be refused");
    };

    let message = error
        .as_db_error()
        .expect("server error")
        .message()
        .to_owned();
    assert!(
        message.contains("pg_hba.conf rejects connection"),
        "{message}"
    );
    assert!(message.contains("no encryption"), "{message}");
    assert!(
        emulator.logins().is_empty(),
        "no token reached the verifier"
    );
}

/// Tokens of users in many groups are long; Azure's PgBouncer refused those over 4 KB until its
/// April 2026 maintenance release. PostgreSQL itself takes them.
#[tokio::test]
async fn tokens_over_two_and_over_four_kilobytes_are_accepted() {
    let emulator = Emulator::start_async().await.unwrap();
    let user = emulator.user();
    for min_len in [2600, 8192] {
        let token = emulator
            .issue_token(&user, TokenOptions::default().min_len(min_len))
            .unwrap();
        assert!(token.len() >= min_len, "token is {} bytes", token.len());

        assert_eq!(
            login(&emulator, &user.role_name, &token).await.unwrap(),
            user.role_name
        );
    }
}

#[tokio::test]
async fn a_password_role_logs_in_with_its_password_only() {
    let emulator = Emulator::start_async().await.unwrap();
    emulator
        .add_password_role("baseline", "correct horse")
        .await
        .unwrap();

    assert_eq!(
        login(&emulator, "baseline", "correct horse").await.unwrap(),
        "baseline"
    );
    assert_refused(login(&emulator, "baseline", "wrong").await);
    assert_eq!(last_outcome(&emulator), Err(Rejection::WrongPassword));
}
