//! The `postgres-entra-emulator` binary: prints `export` lines an app can use, serves them until
//! SIGTERM, then cleans up. `postgres-entra-shared-cluster`: exits as its command does.

use azure_core::http::{Method, Request, Url};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unquote(value: &str) -> String {
    value.trim_matches('\'').replace(r"'\''", "'")
}

#[tokio::test]
async fn the_binary_prints_working_exports_and_cleans_up_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postgres-entra-emulator"))
        .args(["--token-lifetime", "120"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let exports = tokio::task::spawn_blocking(move || {
        let mut vars = HashMap::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some((name, value)) =
                line.strip_prefix("export ").and_then(|l| l.split_once('='))
            {
                vars.insert(name.to_owned(), unquote(value));
                if name == "POSTGRES_ENTRA_TOKEN_URL" {
                    break;
                }
            }
        }
        vars
    });
    let vars = tokio::time::timeout(Duration::from_secs(60), exports)
        .await
        .unwrap()
        .unwrap();
    for name in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGSSLROOTCERT",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "POSTGRES_ENTRA_TOKEN_URL",
    ] {
        assert!(
            vars.get(name).is_some_and(|v| !v.is_empty()),
            "{name} missing in {vars:?}"
        );
    }
    assert!(vars["IDENTITY_ENDPOINT"].starts_with("http://127.0.0.1:"));

    // A token from the managed-identity endpoint it printed logs in with psql and the printed PG*.
    let url = Url::parse(&format!(
        "{}?api-version=2019-08-01&resource=https://ossrdbms-aad.database.windows.net",
        vars["IDENTITY_ENDPOINT"]
    ))
    .unwrap();
    let mut request = Request::new(url, Method::Get);
    request.insert_header("x-identity-header", vars["IDENTITY_HEADER"].clone());
    let response = azure_core::http::new_http_client(None)
        .execute_request(&request)
        .await
        .unwrap();
    assert!(response.status().is_success());
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap()).unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    let mut psql = Command::new("psql");
    psql.args(["-X", "-A", "-t", "-c", "select current_user"]);
    for name in ["PGHOST", "PGPORT", "PGDATABASE", "PGSSLROOTCERT"] {
        psql.env(name, &vars[name]);
    }
    let output = psql
        .env("PGSSLMODE", "verify-full")
        .env("PGUSER", "orders-mi")
        .env("PGPASSWORD", &token)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "orders-mi");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the emulator did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let dir = Path::new(&vars["PGSSLROOTCERT"])
        .parent()
        .unwrap()
        .to_owned();
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn the_shared_cluster_wrapper_exits_as_its_command_does_and_says_how_to_use_it() {
    let wrapper = env!("CARGO_BIN_EXE_postgres-entra-shared-cluster");
    let failing = Command::new(wrapper)
        .args([
            "sh",
            "-c",
            r#"test -d "$POSTGRES_ENTRA_SHARED_CLUSTER" && echo "$POSTGRES_ENTRA_SHARED_CLUSTER" && exit 7"#,
        ])
        .output()
        .unwrap();
    assert_eq!(
        failing.status.code(),
        Some(7),
        "the command saw the cluster and its status came back"
    );
    let dir = String::from_utf8_lossy(&failing.stdout).trim().to_owned();
    assert!(
        !dir.is_empty() && !Path::new(&dir).exists(),
        "the cluster {dir} was removed after a failing command"
    );

    let usage = Command::new(wrapper).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&usage.stderr)
            .starts_with("usage: postgres-entra-shared-cluster COMMAND")
    );

    let missing = Command::new(wrapper)
        .arg("/nonexistent/command")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("could not run /nonexistent/command")
    );
}
