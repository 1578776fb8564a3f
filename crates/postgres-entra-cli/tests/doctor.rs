//! The doctor against the local emulator: a healthy login, and each failure it must explain,
//! with the step that fails and its hint; no token or secret in any output. Then the binary, as a
//! user runs it, with a managed identity from the environment.

mod common;

use postgres_entra::azure_core::credentials::TokenCredential;
use postgres_entra::{AzureTokenSource, Cloud};
use postgres_entra_cli::doctor::{Report, Status, run};
use postgres_entra_cli::settings::{ChosenCredential, CredentialKind, Server};
use postgres_entra_testkit::{AzureServer, Emulator, Endpoint, Fault, PlaintextListener};
use std::sync::Arc;
use std::time::Duration;

fn given(credential: Arc<dyn TokenCredential>, kind: CredentialKind) -> ChosenCredential {
    ChosenCredential {
        source: Arc::new(AzureTokenSource::new(credential)),
        kind,
        reason: "given by the test".to_owned(),
        seen: Vec::new(),
    }
}

/// The emulator's server, trusting its CA, as the service principal's role.
fn server(emulator: &Emulator) -> Server {
    Server {
        host: Some(emulator.host().to_owned()),
        port: emulator.port(),
        dbname: emulator.database().to_owned(),
        user: Some(emulator.service_principal().role_name),
        sslrootcert: Some(emulator.ca_cert_path()),
        timeout: Duration::from_secs(5),
        ..Server::default()
    }
}

fn service_principal(emulator: &Emulator) -> ChosenCredential {
    given(
        emulator
            .client_secret_credential(&emulator.service_principal())
            .unwrap(),
        CredentialKind::ClientSecret,
    )
}

/// The report's text and JSON hold no token, token segment or client secret.
fn assert_no_secret(emulator: &Emulator, report: &Report) {
    let text = report.to_text() + &serde_json::to_string(report).unwrap();
    for token in emulator.issued_tokens() {
        assert!(!text.contains(&token), "a token leaked: {text}");
        for segment in token.split('.') {
            assert!(!text.contains(segment), "a token segment leaked: {text}");
        }
    }
    for identity in emulator.identities() {
        if let Some(secret) = identity.client_secret {
            assert!(!text.contains(&secret), "a client secret leaked: {text}");
        }
    }
}

/// Asserts that `report` fails first at step `number` and that its fix mentions each of `hints`.
fn assert_fails_at(report: &Report, number: u8, hints: &[&str]) {
    println!("{}", report.to_text());
    let failed = report
        .first_failure()
        .unwrap_or_else(|| panic!("expected a failure at step {number}:\n{}", report.to_text()));
    assert_eq!(failed.number, number, "{}", report.to_text());
    let said = format!(
        "{} {}",
        failed.cause.as_deref().unwrap_or(""),
        failed.fix.as_deref().unwrap_or("")
    );
    for hint in hints {
        assert!(
            said.contains(hint),
            "missing {hint:?} in:\n{}",
            report.to_text()
        );
    }
    assert!(!report.ok());
    assert!(
        report
            .summary
            .starts_with(&format!("FAIL at step {number}"))
    );
}

#[tokio::test]
async fn a_healthy_login_passes_every_step() {
    let emulator = Emulator::start_async().await.unwrap();
    let report = run(&server(&emulator), Ok(service_principal(&emulator))).await;

    println!("{}", report.to_text());
    assert!(report.ok(), "{}", report.to_text());
    assert_eq!(report.steps.len(), 8);
    assert!(report.steps.iter().all(|s| s.status != Status::Skipped));
    let text = report.to_text();
    for expected in [
        "ClientSecretCredential (client id",
        "audience https://ossrdbms-aad.database.windows.net",
        "orders-api (from PGUSER / --user)",
        "trusted root: CN=postgres-entra emulator CA",
        "current_user = orders-api",
        "OK: logged in to localhost as orders-api (PostgreSQL",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // The service principal's token is app-only: a warning to check the name, not a failure.
    assert_eq!(report.steps[3].status, Status::Warn, "{text}");
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn a_role_the_server_does_not_know_gets_the_create_principal_call() {
    let emulator = Emulator::start_async().await.unwrap();
    let mut server = server(&emulator);
    server.user = Some("orders-ap".to_owned());

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(
        &report,
        7,
        &[
            "orders-ap",
            "28000",
            "select * from pgaadauth_create_principal('orders-ap', false, false);",
            "pgaadauth_create_principal_with_oid",
        ],
    );
    assert_eq!(report.steps[7].status, Status::Skipped);
    assert_no_secret(&emulator, &report);
}

/// The SQL the doctor tells an administrator to paste names the role exactly, whatever its name:
/// each literal, run on the real server, reads back as the name.
#[tokio::test]
async fn the_suggested_sql_quotes_any_role_name_exactly() {
    use postgres_entra_cli::doctor::quote_literal;
    let emulator = Emulator::start_async().await.unwrap();
    let admin = emulator.admin_client().await.unwrap();
    for name in [
        "o'brien",
        "two words",
        "ünïcødé-名前-😀",
        r"back\slash",
        "x'); drop table pg_class; --",
        "''",
        r"\'",
        "\"quoted\"",
    ] {
        let literal = quote_literal(name);
        let row = admin
            .query_one(&format!("select {literal}::text"), &[])
            .await
            .unwrap_or_else(|e| panic!("{literal}: {e}"));
        assert_eq!(row.get::<_, String>(0), name, "{literal}");
    }

    // In the doctor's own fix for a role with a quote in its name.
    let mut server = server(&emulator);
    server.user = Some("o'brien".to_owned());
    let report = run(&server, Ok(service_principal(&emulator))).await;
    assert_fails_at(
        &report,
        7,
        &["select * from pgaadauth_create_principal('o''brien', false, false);"],
    );
}

/// A host that is none of the token's cloud's servers, nor loopback, nor allowed, gets no token:
/// the doctor stops before asking for one.
#[tokio::test]
async fn a_host_a_token_may_not_go_to_gets_none() {
    let emulator = Emulator::start_async().await.unwrap();
    let server = Server {
        host: Some("db.example.com".to_owned()),
        hostaddr: Some("127.0.0.1".parse().unwrap()),
        ..server(&emulator)
    };
    let requests = emulator.requests(postgres_entra_testkit::Endpoint::Token);

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(
        &report,
        2,
        &[
            "db.example.com",
            "not a server of Azure public cloud",
            "POSTGRES_ENTRA_ALLOWED_HOSTS=db.example.com",
        ],
    );
    assert_eq!(
        emulator.requests(postgres_entra_testkit::Endpoint::Token),
        requests,
        "no token was requested"
    );
}

#[tokio::test]
async fn a_scope_for_another_cloud_fails_before_any_token_is_asked_for() {
    let emulator = Emulator::start_async().await.unwrap();
    let gov = AzureServer::UsGovernment;
    let config = emulator.server_config_for(gov);
    let server = Server {
        host: Some(gov.host_name().to_owned()),
        hostaddr: Some(gov.address()),
        port: config.get_ports()[0],
        scope: Some(Cloud::Public.scope().to_owned()),
        ..server(&emulator)
    };

    let requests = emulator.requests(postgres_entra_testkit::Endpoint::Token);

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(
        &report,
        2,
        &[
            "is a server of Azure US Government",
            "requests tokens for Azure public cloud",
            "drop --scope",
        ],
    );
    assert_eq!(
        emulator.requests(postgres_entra_testkit::Endpoint::Token),
        requests,
        "no token was asked for"
    );
    let status = |n: usize| report.steps[n - 1].status;
    assert_eq!(status(3), Status::Skipped);
    assert_eq!(status(5), Status::Pass, "the network is checked anyway");
    assert_eq!(status(6), Status::Pass);
    assert_eq!(status(7), Status::Skipped);
}

#[tokio::test]
async fn an_untrusted_ca_is_named_with_how_to_trust_it() {
    let emulator = Emulator::start_async().await.unwrap();
    let server = Server {
        sslrootcert: None,
        ..server(&emulator)
    };

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(
        &report,
        6,
        &[
            "UnknownIssuer",
            "issued by `CN=postgres-entra emulator CA`",
            "none of the Azure roots",
            "PGSSLROOTCERT",
        ],
    );
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn an_identity_provider_that_fails_is_reported_with_its_status() {
    let emulator = Emulator::start_async().await.unwrap();
    emulator.set_fault(Endpoint::Token, Fault::ServerError);

    let report = run(&server(&emulator), Ok(service_principal(&emulator))).await;

    assert_fails_at(&report, 2, &["HTTP 500", "check Azure status"]);
    let fix = report.steps[1].fix.as_deref().unwrap();
    assert!(
        !fix.contains("backoff"),
        "a fix is an action for a person: {fix}"
    );
    assert_eq!(
        report.steps[5].status,
        Status::Pass,
        "TLS is checked anyway"
    );
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn an_unreachable_or_slow_provider_shows_the_cause_underneath_and_what_to_change() {
    let emulator = Emulator::start_async().await.unwrap();
    let sp = emulator.service_principal();
    // Nothing listening where the identity provider should be.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let transport = postgres_entra_testkit::LoopbackTransport::new(nowhere);
    let unreachable = postgres_entra::azure_identity::ClientSecretCredential::new(
        emulator.tenant_id(),
        sp.client_id.clone(),
        sp.client_secret.clone().unwrap().into(),
        Some(
            postgres_entra::azure_identity::ClientSecretCredentialOptions {
                client_options: transport.client_options(),
            },
        ),
    )
    .unwrap();
    let report = run(
        &server(&emulator),
        Ok(given(unreachable, CredentialKind::ClientSecret)),
    )
    .await;
    // Not only azure_core's "failed to execute `reqwest` request": what lies underneath.
    assert_fails_at(&report, 2, &["Connection refused", "check network access"]);

    emulator.set_latency(Endpoint::Token, Duration::from_secs(30));
    let mut server = server(&emulator);
    server.timeout = Duration::from_secs(1);
    let report = run(&server, Ok(service_principal(&emulator))).await;
    assert_fails_at(&report, 2, &["within 1 s", "--timeout"]);
    let fix = report.steps[1].fix.as_deref().unwrap();
    assert!(!fix.contains("RetryOptions"), "{fix}");
}

#[tokio::test]
async fn a_wrong_client_secret_is_named_by_its_entra_code() {
    let emulator = Emulator::start_async().await.unwrap();
    let mut sp = emulator.service_principal();
    sp.client_secret = Some("not-the-secret".to_owned());
    let credential = given(
        emulator.client_secret_credential(&sp).unwrap(),
        CredentialKind::ClientSecret,
    );

    let report = run(&server(&emulator), Ok(credential)).await;

    assert_fails_at(
        &report,
        2,
        &[
            "HTTP 401",
            "AADSTS7000215",
            "the client secret is wrong or expired",
        ],
    );
    assert!(!report.to_text().contains("not-the-secret"));
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn a_plaintext_only_server_never_gets_a_token() {
    let emulator = Emulator::start_async().await.unwrap();
    let trap = PlaintextListener::start().await.unwrap();
    let server = Server {
        port: trap.port(),
        ..server(&emulator)
    };

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(&report, 6, &["declined TLS", "never sent in clear text"]);
    assert_eq!(report.steps[6].status, Status::Skipped);
    let received = trap.received();
    assert_eq!(
        received,
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
        "only the SSLRequest"
    );
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn a_closed_port_fails_at_the_network_with_what_to_check() {
    let emulator = Emulator::start_async().await.unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let server = Server {
        host: Some("localhost".to_owned()),
        hostaddr: Some("127.0.0.1".parse().unwrap()),
        port: closed,
        ..server(&emulator)
    };

    let report = run(&server, Ok(service_principal(&emulator))).await;

    assert_fails_at(
        &report,
        5,
        &[
            "no TCP connection",
            "refused",
            "firewall",
            &closed.to_string(),
        ],
    );
    assert_eq!(
        report.steps[1].status,
        Status::Pass,
        "the token is checked anyway"
    );
    assert_no_secret(&emulator, &report);
}

#[tokio::test]
async fn no_credential_and_no_host_are_failures_that_say_what_to_set() {
    let emulator = Emulator::start_async().await.unwrap();
    let report = run(
        &server(&emulator),
        Err("AZURE_TENANT_ID is not set, and a client secret credential needs it".to_owned()),
    )
    .await;
    assert_fails_at(&report, 1, &["AZURE_TENANT_ID", "az login"]);
    assert_eq!(report.steps[1].status, Status::Skipped);

    let nowhere = Server {
        host: None,
        ..server(&emulator)
    };
    let report = run(&nowhere, Ok(service_principal(&emulator))).await;
    assert_fails_at(&report, 1, &["PGHOST"]);
}

/// The binary with `args`, as a user runs it ([`common::user_command`]).
fn doctor_command(emulator: &Emulator, args: &[&str]) -> std::process::Output {
    common::user_command(emulator).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reads_the_environment_and_exits_with_the_verdict() {
    let emulator = Emulator::start_async().await.unwrap();
    let mi = emulator.managed_identity();
    let run_binary = |args: &'static [&'static str]| {
        let emulator = &emulator;
        tokio::task::block_in_place(move || doctor_command(emulator, args))
    };

    let healthy = run_binary(&["doctor"]);
    let text = String::from_utf8_lossy(&healthy.stdout).into_owned();
    assert_eq!(healthy.status.code(), Some(0), "{text}");
    for expected in [
        "ManagedIdentityCredential (ManagedIdentity)",
        "why: IDENTITY_ENDPOINT and IDENTITY_HEADER are set (App Service, Functions, Container Apps)",
        "credential variables set: IDENTITY_ENDPOINT, IDENTITY_HEADER (values not shown)",
        &format!("{} (from the token's xms_mirid claim)", mi.role_name),
        &format!("OK: logged in to localhost as {}", mi.role_name),
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    let json = run_binary(&["doctor", "--json", "--user", "nobody"]);
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8);
    assert_eq!(steps[6]["status"], "fail");
    assert!(
        steps[6]["fix"]
            .as_str()
            .unwrap()
            .contains("pgaadauth_create_principal('nobody'")
    );

    let token = run_binary(&["token", "--json"]);
    assert_eq!(
        token.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let claims: serde_json::Value = serde_json::from_slice(&token.stdout).unwrap();
    assert_eq!(claims["managed_identity_name"], mi.role_name.as_str());
    assert_eq!(claims["role"][1], "xms_mirid");
    assert_eq!(
        claims["audience"][0],
        "https://ossrdbms-aad.database.windows.net"
    );

    // A token that cannot be had: still JSON with --json, and the cause, whole.
    emulator.set_fault(Endpoint::ManagedIdentity, Fault::ServerError);
    let failed = run_binary(&["token", "--json"]);
    emulator.clear_fault(Endpoint::ManagedIdentity);
    assert_eq!(failed.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&failed.stdout)
        )
    });
    assert!(
        error["error"].as_str().unwrap().contains("HTTP 500"),
        "{error}"
    );

    let all_output: Vec<u8> = [healthy, json, token, failed]
        .iter()
        .flat_map(|o| {
            o.stdout
                .iter()
                .chain(o.stderr.iter())
                .copied()
                .collect::<Vec<u8>>()
        })
        .collect();
    let all_output = String::from_utf8_lossy(&all_output);
    let tokens = emulator.issued_tokens();
    assert!(tokens.len() >= 3, "each run fetched a token");
    for token in tokens {
        for segment in token.split('.') {
            assert!(!all_output.contains(segment), "a token segment leaked");
        }
    }
}

#[tokio::test]
async fn a_missing_database_and_a_lost_group_membership_get_their_own_fixes() {
    // A cluster of its own: a shared one lets each emulator's logins into its own database only,
    // where Azure (and a private cluster) lets them reach every database and says which is missing.
    let emulator = Emulator::builder()
        .private_cluster()
        .start_async()
        .await
        .unwrap();
    let wrong_db = Server {
        dbname: "ordres".to_owned(),
        ..server(&emulator)
    };
    let report = run(&wrong_db, Ok(service_principal(&emulator))).await;
    assert_fails_at(
        &report,
        7,
        &[
            "3D000",
            "the database `ordres` does not exist",
            "PGDATABASE",
        ],
    );

    let sp = emulator.service_principal();
    let readers = emulator
        .add_group("db-readers", std::slice::from_ref(&sp))
        .await
        .unwrap();
    let as_group = Server {
        user: Some("db-readers".to_owned()),
        ..server(&emulator)
    };
    assert!(run(&as_group, Ok(service_principal(&emulator))).await.ok());
    emulator.remove_group_member(&readers, &sp).unwrap();
    let report = run(&as_group, Ok(service_principal(&emulator))).await;
    assert_fails_at(
        &report,
        7,
        &[
            "`db-readers` (the user in the connection settings)",
            "If `db-readers` is an Entra group's role, this principal must be a member of that group",
        ],
    );
    assert_no_secret(&emulator, &report);
}

/// Empty libpq variables are unset, as libpq takes them; a malformed one is a JSON error with
/// `--json`, not a usage error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_variables_are_unset_and_bad_ones_answer_in_json() {
    let emulator = Emulator::start_async().await.unwrap();
    let run_binary = |env: &[(&str, &str)]| {
        let mut command = common::user_command(&emulator);
        command.args(["doctor", "--json"]);
        for (name, value) in env {
            command.env(name, value);
        }
        tokio::task::block_in_place(move || command.output().unwrap())
    };

    let empty = run_binary(&[("PGHOSTADDR", ""), ("PGUSER", "")]);
    assert_eq!(
        empty.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&empty.stdout)
    );

    for (name, value, says) in [
        ("PGPORT", "5432,5433", "one port number"),
        ("PGHOSTADDR", "not-an-address", "one IP address"),
    ] {
        let bad = run_binary(&[(name, value)]);
        assert_eq!(bad.status.code(), Some(1), "{name}={value}");
        let answer: serde_json::Value = serde_json::from_slice(&bad.stdout)
            .unwrap_or_else(|e| panic!("{name}={value}: not JSON ({e})"));
        assert!(answer["error"].as_str().unwrap().contains(says), "{answer}");
    }
}
