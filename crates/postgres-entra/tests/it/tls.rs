//! The token never travels without verified TLS.

use postgres_entra::{AccessToken, EntraConnector, Error, FnTokenSource, TlsRoots};
use postgres_entra_testkit::Emulator;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{config, current_user};

const TOKEN: &str =
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.plaintext-must-never-see-this-token.c2lnbmF0dXJl";

fn fixed_source() -> Arc<FnTokenSource> {
    FnTokenSource::fixed(
        "tls-test",
        AccessToken::new(TOKEN, SystemTime::now() + Duration::from_secs(3600)),
    )
}

/// A plaintext "server" that declines TLS, then plays along asking for a cleartext password, and
/// records every byte it receives.
async fn plaintext_listener() -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(Mutex::new(Vec::new()));
    let record = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                let mut answered_ssl = false;
                while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    let reply: &[u8] = if !answered_ssl {
                        answered_ssl = true;
                        b"N"
                    } else {
                        // AuthenticationCleartextPassword
                        &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]
                    };
                    if stream.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, received)
}

#[tokio::test]
async fn a_server_that_declines_tls_never_receives_the_token() {
    let (port, received) = plaintext_listener().await;
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::Azure)
        .private_cache()
        .build()
        .unwrap();

    for mode in [
        tokio_postgres::config::SslMode::Prefer,
        tokio_postgres::config::SslMode::Require,
    ] {
        let mut config = tokio_postgres::Config::new();
        config
            .host("localhost")
            .port(port)
            .dbname("postgres")
            .ssl_mode(mode);
        let error = current_user(&connector, &config).await.unwrap_err();
        assert!(matches!(error, Error::Tls { .. }), "{mode:?}: {error:?}");
        assert!(error.to_string().contains("declined TLS"), "{error}");
    }

    let received = received.lock().unwrap().clone();
    assert!(!received.is_empty(), "the client did reach the listener");
    let needle = &TOKEN.as_bytes()[..24];
    assert!(
        !received.windows(needle.len()).any(|w| w == needle),
        "token bytes reached a plaintext server"
    );
    // Only SSL requests were sent: 8 bytes each, nothing after the refusal.
    assert_eq!(received.len(), 16, "received {received:?}");
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_a_tls_error() {
    let emulator = Emulator::start().unwrap();
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::Azure)
        .private_cache()
        .build()
        .unwrap();

    let error = current_user(&connector, &config(&emulator))
        .await
        .unwrap_err();

    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert!(error.to_string().contains("certificate"), "{error}");
    assert!(emulator.logins().is_empty(), "no token reached the server");
}

#[tokio::test]
async fn a_host_name_the_certificate_does_not_name_is_a_tls_error() {
    let emulator = Emulator::start().unwrap();
    let connector = EntraConnector::builder(fixed_source())
        .role_name("orders-api")
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .private_cache()
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
