//! The token is a password: never sent without TLS, never in Debug, Display, errors or logs.

use deadpool_postgres::SslMode;
use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots};
use postgres_entra_bb8::{EntraConnectionManager, LastErrorSink};
use postgres_entra_deadpool::entra_error;
use postgres_entra_testkit::{Endpoint, PlaintextListener};
use std::time::Duration;

use crate::deadpool_pool::user_config;
use crate::{Suite, chain, connector};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_server_receives_no_token_byte_whatever_the_configuration() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let trap = PlaintextListener::start().await.unwrap();
    let connector = connector(&emulator);
    let token = connector.cache().get().await.unwrap();
    let mut attempts = 0;

    for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
        let mut config = user_config(&emulator, 2);
        config.port = Some(trap.port());
        config.ssl_mode = Some(mode);
        // deadpool's pool refuses sslmode=disable when it is made; the others fail at checkout.
        match postgres_entra_deadpool::create_pool(&config, connector.clone()) {
            Ok(pool) => {
                let error = pool.get().await.unwrap_err();
                let entra =
                    entra_error(&error).unwrap_or_else(|| panic!("{mode:?}: {}", chain(&error)));
                assert!(
                    matches!(entra, postgres_entra::Error::Tls { .. }),
                    "{entra}"
                );
            }
            Err(error) => assert!(
                matches!(mode, SslMode::Disable)
                    && matches!(error, postgres_entra::Error::Config { .. }),
                "{mode:?}: {error}"
            ),
        }

        let mut pg = tokio_postgres::Config::new();
        pg.host("localhost")
            .port(trap.port())
            .dbname("postgres")
            .ssl_mode(match mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        // bb8's manager refuses sslmode=disable when it is made; the others fail at connect.
        match EntraConnectionManager::new(pg, connector.clone()) {
            Ok(manager) => {
                let bb8 = bb8::Pool::builder().max_size(1).build_unchecked(manager);
                assert!(bb8.dedicated_connection().await.is_err());
            }
            Err(error) => assert!(
                matches!(mode, SslMode::Disable)
                    && matches!(error, postgres_entra::Error::Config { .. }),
                "{mode:?}: {error}"
            ),
        }
        attempts += 2;
    }

    assert_eq!(
        trap.connections(),
        4,
        "disable never connected; prefer and require did, twice each"
    );
    assert!(
        !trap.received_contains(token.secret().as_bytes()),
        "the token reached a plaintext server"
    );
    let signature = token.secret().rsplit('.').next().unwrap();
    assert!(!trap.received_contains(signature.as_bytes()));
    println!("{attempts} attempts against a plaintext server: 0 token bytes received");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_public_type_or_error_shows_a_token_in_debug_or_display() {
    let emulator = Suite::start(Duration::from_secs(3600));
    let good = connector(&emulator);
    let token = good.cache().get().await.unwrap();
    // A login that fails after a token was fetched (wrong role for this identity).
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let wrong_role = EntraConnector::builder(AzureTokenSource::new(credential.clone()))
        .role_name("orders-mi")
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let pool = postgres_entra_deadpool::create_pool(&user_config(&emulator, 2), wrong_role.clone())
        .unwrap();
    let pool_error = pool.get().await.unwrap_err();
    let sink = LastErrorSink::new();
    let pg = emulator.server_config();
    let manager = EntraConnectionManager::new(pg, wrong_role.clone()).unwrap();
    let bb8_pool = bb8::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(1))
        .error_sink(Box::new(sink.clone()))
        .build_unchecked(manager.clone());
    let _ = bb8_pool.get().await;
    let bb8_error = bb8_pool.dedicated_connection().await.unwrap_err();
    // A failing provider.
    emulator.set_fault(Endpoint::Token, postgres_entra_testkit::Fault::ServerError);
    let failing = crate::connector(&emulator);
    let token_error = failing.cache().get().await.unwrap_err();

    let rendered = [
        format!("{token:?}"),
        format!("{good:?}"),
        format!("{:?}", good.cache()),
        format!("{:?}", good.cache().stats()),
        format!("{pool_error:?} {pool_error} {}", chain(&pool_error)),
        format!("{:?}", entra_error(&pool_error)),
        format!("{bb8_error:?} {bb8_error}"),
        format!("{sink:?} {:?}", sink.last_error()),
        format!("{manager:?}"),
        format!("{token_error:?} {token_error}"),
        format!("{:?}", AzureTokenSource::new(credential)),
        format!("{pool:?} {bb8_pool:?}"),
    ];
    let issued = emulator.issued_tokens();
    assert!(issued.len() >= 2);
    for text in &rendered {
        assert!(!text.is_empty());
        for token in &issued {
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !text.contains(token.as_str()) && !text.contains(signature),
                "a token leaked into: {text}"
            );
        }
    }
    assert!(matches!(
        entra_error(&pool_error),
        Some(postgres_entra::Error::LoginRejected { .. })
    ));
    println!(
        "{} renderings searched for {} tokens: 0 leaks",
        rendered.len(),
        issued.len()
    );
}
