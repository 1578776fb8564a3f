//! The token never travels without verified TLS.

use postgres_entra::{AccessToken, EntraConnector, Error, TlsRoots};
use postgres_entra_testkit::PlaintextListener;
use postgres_entra_testkit::{Emulator, FnTokenSource};
use std::time::{Duration, SystemTime};

use crate::current_user;

const TOKEN: &str =
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.plaintext-must-never-see-this-token.c2lnbmF0dXJl";

fn fixed_source() -> FnTokenSource {
    FnTokenSource::fixed(
        "tls-test",
        AccessToken::new(TOKEN, SystemTime::now() + Duration::from_secs(3600)),
    )
}

#[tokio::test]
async fn a_server_that_declines_tls_never_receives_the_token() {
    let trap = PlaintextListener::start().await.unwrap();
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::Azure)
        .build()
        .unwrap();

    for mode in [
        tokio_postgres::config::SslMode::Prefer,
        tokio_postgres::config::SslMode::Require,
    ] {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .port(trap.port())
            .dbname("postgres")
            .ssl_mode(mode);
        let error = current_user(&connector, &config).await.unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{mode:?}: {error:?}");
        assert!(error.to_string().contains("declined TLS"), "{error}");
    }

    assert_eq!(trap.connections(), 2, "the client did reach the listener");
    assert!(
        !trap.received_contains(&TOKEN.as_bytes()[..24]),
        "token bytes reached a plaintext server"
    );
    // Only SSL requests were sent: 8 bytes each, nothing after the refusal.
    assert_eq!(trap.received().len(), 16, "received {:?}", trap.received());
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_a_tls_error() {
    let emulator = Emulator::start_async().await.unwrap();
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::Azure)
        .build()
        .unwrap();

    let error = current_user(&connector, &emulator.server_config())
        .await
        .unwrap_err();

    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert!(error.to_string().contains("certificate"), "{error}");
    assert!(emulator.logins().is_empty(), "no token reached the server");
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_name_is_a_tls_error() {
    let emulator = Emulator::start_async().await.unwrap();
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .allow_host("db.example.invalid")
        .build()
        .unwrap();
    // Connect to the right address under a name the certificate does not carry.
    let mut config = tokio_postgres::Config::new();
    config
        .host("db.example.invalid")
        .hostaddr([127, 0, 0, 1].into())
        .port(emulator.port())
        .dbname(emulator.database());

    let error = current_user(&connector, &config).await.unwrap_err();

    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert!(emulator.logins().is_empty(), "no token reached the server");
}
