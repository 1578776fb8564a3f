//! What users read: an error report that prints the whole chain (anyhow's and eyre's `{:#}`)
//! shows each fact once, through every adapter; a pool's own error names the cause.

use postgres_entra::{EntraConnector, Error, SessionOptions};
use postgres_entra_testkit::{Endpoint, Fault};
use std::time::Duration;

use crate::pools::{PoolSpec, PoolUnderTest};
use crate::{Suite, connector, service_principal_cache};

for_pools!([deadpool, bb8, sqlx, diesel_deadpool, diesel_bb8] {
    a_failing_provider_is_reported_with_each_fact_once,
    each_cause_underneath_is_typed_and_said_once,
});

/// How often `needle` appears in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// `error` as anyhow prints it with `{:#}`: the error and every source, joined by `: `.
fn report(error: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(error))
}

/// [`report`] of our error, checked to be what eyre prints too.
fn reports(error: &Error) -> String {
    let text = report(error.clone());
    assert_eq!(text, format!("{:#}", eyre::Report::new(error.clone())));
    text
}

/// Our error when a pool of `spec` is built or first used.
async fn first_error<P: PoolUnderTest>(spec: PoolSpec) -> Error {
    match P::build(spec).await {
        Err(error) => error,
        Ok(pool) => {
            let failure = pool.query("select 1").await.unwrap_err();
            failure.reason.expect("the adapter gives our error").error
        }
    }
}

/// The first source of `error`, as a `T`.
fn cause<T: std::error::Error + 'static>(error: &Error) -> &T {
    let source = std::error::Error::source(error).expect("a source");
    source
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("{source:?} is not a {}", std::any::type_name::<T>()))
}

async fn each_cause_underneath_is_typed_and_said_once<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let spec = || {
        PoolSpec::new(&emulator, connector(&emulator))
            .size(1)
            .timeout(Duration::from_secs(5))
    };

    // The provider's error: azure_core's, with the HTTP status.
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    let error = first_error::<P>(spec()).await;
    emulator.clear_fault(Endpoint::Token);
    let Error::Token(token) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(token.http_status(), Some(500));
    let provider = token.provider_error().expect("the provider's error");
    assert!(provider.is::<azure_core::Error>(), "{provider:?}");
    let text = reports(&error);
    assert_eq!(
        count(&text, "The service is temporarily unavailable"),
        1,
        "{text}"
    );

    // The network's: an io::Error, its kind kept.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut unreachable = spec();
    unreachable.port = closed.local_addr().unwrap().port();
    drop(closed);
    let error = first_error::<P>(unreachable).await;
    assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    let io = cause::<std::io::Error>(&error);
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused, "{io}");
    let text = reports(&error);
    assert_eq!(count(&text, &io.to_string()), 1, "{text}");

    // The server's: the SQLSTATE, and tokio-postgres's DbError where the driver made one (sqlx's
    // logins are read by the relay, which keeps the code and the message). The database takes no
    // connections (the emulator resets its limit when it stops).
    let admin = emulator.admin_client().await.unwrap();
    let limit = |n: i32| {
        format!(
            "alter database \"{}\" connection limit {n}",
            emulator.database()
        )
    };
    admin.batch_execute(&limit(0)).await.unwrap();
    let error = first_error::<P>(spec()).await;
    admin.batch_execute(&limit(-1)).await.unwrap();
    assert_eq!(error.sqlstate(), Some("53300"), "{error:?}");
    if !std::any::type_name::<P>().ends_with("Sqlx") {
        let db = cause::<tokio_postgres::error::DbError>(&error);
        assert_eq!(
            db.code(),
            &tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS
        );
    }
    let text = reports(&error);
    assert_eq!(
        count(&text, "too many connections for database"),
        1,
        "{text}"
    );
    assert_eq!(count(&text, "53300"), 1, "{text}");

    // The certificate's: rustls' error.
    let untrusting = EntraConnector::builder(crate::service_principal_source(&emulator))
        .role_name(emulator.service_principal().role_name)
        .tls_roots(postgres_entra::TlsRoots::Azure)
        .build()
        .unwrap();
    let error = first_error::<P>(PoolSpec {
        connector: untrusting,
        ..spec()
    })
    .await;
    assert!(matches!(error, Error::Tls { .. }), "{error:?}");
    assert_eq!(
        cause::<rustls::Error>(&error).to_string(),
        "invalid peer certificate: UnknownIssuer"
    );
    let text = reports(&error);
    assert_eq!(count(&text, "UnknownIssuer"), 1, "{text}");
}

async fn a_failing_provider_is_reported_with_each_fact_once<P: PoolUnderTest>() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    let spec = PoolSpec::new(&emulator, connector(&emulator))
        .size(1)
        .timeout(Duration::from_secs(2));
    let pool: P = P::build(spec).await.unwrap();

    let failure = pool.query("select 1").await.unwrap_err();
    let reason = failure.reason.expect("the adapter gives our error");

    let text = report(reason.error);
    println!("{text}");
    for fact in [
        "HTTP 500",
        "AADSTS50001",
        "The service is temporarily unavailable",
        "ClientSecretCredential (client id",
        "check Azure status",
    ] {
        assert_eq!(count(&text, fact), 1, "{fact:?} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_configuration_and_login_errors_say_each_fact_once() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;

    // The cache's own error.
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    let cache = service_principal_cache(&emulator, Default::default());
    let text = report(cache.get().await.unwrap_err());
    assert_eq!(count(&text, "AADSTS50001"), 1, "{text}");
    assert_eq!(count(&text, "temporarily unavailable"), 1, "{text}");
    emulator.clear_fault(Endpoint::Token);

    // A configuration error says "invalid configuration" once.
    let error = EntraConnector::builder(crate::service_principal_source(&emulator))
        .role_name(" ")
        .build()
        .unwrap_err();
    let text = reports(&error);
    assert_eq!(count(&text, "invalid configuration"), 1, "{text}");

    // deadpool: its own `{e}` names our cause; its report repeats it only because deadpool's
    // `PoolError` prints its backend error and also returns it as the source.
    let no_role = EntraConnector::builder(crate::service_principal_source(&emulator))
        .tls_roots(postgres_entra::TlsRoots::CaPem(
            emulator.ca_pem().to_owned(),
        ))
        .build()
        .unwrap();
    let mut config =
        crate::pools::Deadpool::user_config(&PoolSpec::new(&emulator, no_role.clone()));
    config.user = Some("nobody-mi".into());
    let pool =
        postgres_entra_deadpool::create_pool(&config, &no_role, SessionOptions::new()).unwrap();
    let error = pool.get().await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("PostgreSQL refused the Entra ID login as role `nobody-mi`"),
        "{error}"
    );
    assert!(
        !error
            .to_string()
            .contains("error communicating with the server")
    );
    let typed = pool.manager().explain(&error).unwrap();
    assert!(matches!(typed, Error::LoginRejected(_)));
    let text = report(typed);
    assert_eq!(count(&text, "28000"), 1, "{text}");
    assert_eq!(count(&text, "pgaadauth_create_principal("), 1, "{text}");
    let text = report(error);
    assert_eq!(
        count(&text, "refused the Entra ID login"),
        2,
        "deadpool's own repeat: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_deadpool_users_log_is_what_the_readme_shows() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let readme = include_str!("../../../README.md");
    let get_error = |connector: EntraConnector, user: &str| {
        let mut config =
            crate::pools::Deadpool::user_config(&PoolSpec::new(&emulator, connector.clone()));
        config.user = Some(user.into());
        async move {
            let pool =
                postgres_entra_deadpool::create_pool(&config, &connector, SessionOptions::new())
                    .unwrap();
            pool.get().await.unwrap_err().to_string()
        }
    };
    let managed_identity = || {
        EntraConnector::builder(postgres_entra::AzureTokenSource::new(
            emulator.managed_identity_credential().unwrap(),
        ))
        .tls_roots(postgres_entra::TlsRoots::CaPem(
            emulator.ca_pem().to_owned(),
        ))
    };

    // A managed identity logging in as a role mapped to another principal.
    let wrong_role = get_error(managed_identity().build().unwrap(), "orders-api").await;
    // The identity provider failing.
    emulator.set_fault(Endpoint::Token, Fault::ServerError);
    let outage = get_error(connector(&emulator).into(), "orders-api").await;
    emulator.clear_fault(Endpoint::Token);
    // A server certificate from a CA the connector does not trust.
    let wrong_ca = get_error(
        managed_identity()
            .tls_roots(postgres_entra::TlsRoots::Azure)
            .build()
            .unwrap(),
        "orders-mi",
    )
    .await;

    for (logged, shown) in [
        (
            &wrong_role,
            "Error occurred while creating a new object: PostgreSQL refused the Entra ID login as role `orders-api` (the user in the connection settings) with 28000: ",
        ),
        (
            &outage,
            "Error occurred while creating a new object: could not get an Entra ID access token for ",
        ),
        (
            &wrong_ca,
            "Error occurred while creating a new object: TLS to the PostgreSQL server failed, so no token was sent: the server's certificate did not verify (",
        ),
    ] {
        assert!(logged.starts_with(shown), "{logged}");
        assert!(readme.contains(shown), "the README shows {shown:?}");
    }
    assert!(outage.contains(": HTTP 500"), "{outage}");
    assert!(
        readme.contains("(scope https://ossrdbms-aad.database.windows.net/.default): HTTP 500 …")
    );
}
