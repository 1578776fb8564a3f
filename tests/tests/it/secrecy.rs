//! The token is a password: never in Debug, Display or errors. (Never in logs: every test's TRACE
//! capture is searched; never without TLS: the plaintext scenario in `scenarios.rs`.)

use postgres_entra::{EntraConnector, SessionOptions, TlsRoots};
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_testkit::Endpoint;
use std::time::Duration;

use crate::pools::{Deadpool, PoolSpec};
use crate::{Suite, chain, connector, connector_builder, service_principal_source};

/// `value` as `{:?}` and as `{:#?}`.
fn both(value: &impl std::fmt::Debug) -> String {
    format!("{value:?}\n{value:#?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_public_type_or_error_shows_a_token_in_debug_or_display() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let good = connector(&emulator);
    let token = good.cache().get().await.unwrap();
    // A login that fails after a token was fetched (wrong role for this identity).
    let wrong_role = EntraConnector::builder(service_principal_source(&emulator))
        .role_name("orders-mi")
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let config = Deadpool::user_config(&PoolSpec::new(&emulator, wrong_role.clone()).size(2));
    let pool =
        postgres_entra_deadpool::create_pool(&config, &wrong_role, SessionOptions::new()).unwrap();
    let pool_error = pool.get().await.unwrap_err();
    let manager =
        EntraConnectionManager::new(emulator.server_config(), &wrong_role, SessionOptions::new())
            .unwrap();
    let bb8_pool = bb8::Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_secs(1))
        .build_unchecked(manager.clone());
    let bb8_error = bb8_pool.get().await.unwrap_err();
    let good_manager =
        EntraConnectionManager::new(emulator.server_config(), &good, SessionOptions::new())
            .unwrap();
    let bb8_client = bb8::ManageConnection::connect(&good_manager).await.unwrap();
    // sqlx: a pool (its connect options hold a token), and a refused login.
    let sqlx_options = || {
        sqlx::postgres::PgConnectOptions::new_without_pgpass()
            .host(emulator.host())
            .port(emulator.port())
            .database(emulator.database())
            .username("")
    };
    let sqlx_pool = postgres_entra_sqlx::connect_with(
        sqlx_options(),
        sqlx::postgres::PgPoolOptions::new().acquire_timeout(Duration::from_secs(2)),
        &good,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    let sqlx_wrong = postgres_entra_sqlx::connect_with(
        sqlx_options(),
        sqlx::postgres::PgPoolOptions::new(),
        &wrong_role,
        SessionOptions::new(),
    )
    .await
    .unwrap_err();
    // Every other public type, after logins: a checked-out connection of each pool, the
    // tokio-postgres connection, the diesel-async manager and its pools, builders and options.
    let good_pool = postgres_entra_deadpool::create_pool(
        &Deadpool::user_config(&PoolSpec::new(&emulator, good.clone()).size(2)),
        &good,
        SessionOptions::new(),
    )
    .unwrap();
    let deadpool_object = good_pool.get().await.unwrap();
    let (pg_client, pg_connection) =
        postgres_entra_tokio_postgres::connect(&good, &emulator.server_config())
            .await
            .unwrap();
    let entra_diesel = postgres_entra_diesel::EntraDiesel::new(
        emulator.server_config(),
        &good,
        SessionOptions::new(),
    )
    .unwrap();
    let diesel_pool = postgres_entra_diesel::DeadpoolPool::builder(entra_diesel.manager())
        .max_size(1)
        .build()
        .unwrap();
    let diesel_connection = diesel_pool.get().await.unwrap();
    let sqlx_connection = sqlx_pool.acquire().await.unwrap();
    let claims = token.claims().unwrap();
    let others = [
        both(&token),
        both(&claims),
        both(&good_pool),
        both(&deadpool_object),
        both(&*deadpool_object),
        both(&pg_client),
        both(&pg_connection),
        both(&entra_diesel),
        both(&diesel_pool.status()),
        both(&sqlx_connection),
        both(&connector_builder(&emulator)),
        both(&postgres_entra::TokenCache::builder(
            service_principal_source(&emulator),
        )),
        both(&postgres_entra::CacheOptions::default()),
        both(&SessionOptions::new()),
        both(&TlsRoots::CaPem(emulator.ca_pem().to_owned())),
        both(&good_manager),
        both(&bb8_pool),
        both(&sqlx_pool),
        both(&*sqlx_pool),
        both(&sqlx_pool.connect_options()),
        both(&sqlx_wrong),
        both(&pool_error),
        both(&manager.explain(&bb8_error)),
    ];
    drop((deadpool_object, diesel_connection, sqlx_connection));

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
        format!("{:?}", pool.manager().explain(&pool_error)),
        format!("{:?}", pool.manager()),
        format!(
            "{bb8_error:?} {bb8_error} {:?}",
            manager.explain(&bb8_error)
        ),
        format!("{manager:?}"),
        format!("{token_error:?} {token_error}"),
        format!("{:?}", service_principal_source(&emulator)),
        format!("{pool:?} {bb8_pool:?}"),
        format!("{bb8_client:?}"),
        // Neither our pool nor sqlx's own `Debug` of the pool shows the connect options.
        format!("{sqlx_pool:?} {:?}", &*sqlx_pool),
        format!("{sqlx_wrong:?} {sqlx_wrong}"),
        both(&token_error),
    ];
    let rendered: Vec<String> = rendered.into_iter().chain(others).collect();
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
        pool.manager().explain(&pool_error),
        Some(postgres_entra::Error::LoginRejected { .. })
    ));
    // sqlx's `PgConnectOptions` prints its password in `Debug`: they hold no token (sqlx logs in
    // through this process's relay).
    let options = format!(
        "{:?} {:#?}",
        sqlx_pool.connect_options(),
        sqlx_pool.connect_options()
    );
    assert!(
        !issued.iter().any(|token| options.contains(token.as_str())),
        "sqlx's connect options hold a token"
    );
    figure!(
        "{} renderings searched for {} tokens: 0 leaks",
        rendered.len(),
        issued.len()
    );
}
