//! The `postgres-entra-emulator` binary: prints the lines that point an app (and the
//! `postgres-entra` tool) at its managed identity and server, whatever the shell held before,
//! serves them until SIGTERM, then cleans up. `postgres-entra-shared-cluster`: exits as its
//! command does.

use azure_core::http::{Method, Request, Url};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unquote(value: &str) -> String {
    value.trim_matches('\'').replace(r"'\''", "'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_working_exports_and_cleans_up_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postgres-entra-emulator"))
        .args(["--token-lifetime", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let last = line.starts_with("export IDENTITY_HEADER=");
            lines.push(line);
            if last {
                break;
            }
        }
        lines
    });
    let lines = tokio::time::timeout(Duration::from_secs(60), printed)
        .await
        .unwrap()
        .unwrap();
    let vars: HashMap<String, String> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .map(|(name, value)| (name.to_owned(), unquote(value)))
        .collect();
    for name in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGSSLROOTCERT",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
    ] {
        assert!(
            vars.get(name).is_some_and(|v| !v.is_empty()),
            "{name} missing in {vars:?}"
        );
    }
    assert!(
        !vars.keys().any(|name| name.starts_with("AZURE_")),
        "no AZURE_* variable that could choose another credential: {vars:?}"
    );
    let unset = lines
        .iter()
        .find_map(|line| line.strip_prefix("unset "))
        .expect("an unset line");
    for name in [
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
        "PGUSER",
    ] {
        assert!(unset.split(' ').any(|n| n == name), "{name} not unset");
    }
    assert!(vars["IDENTITY_ENDPOINT"].starts_with("http://127.0.0.1:"));

    // The tool, in a shell that held another credential's variables and evaluated the lines,
    // chooses the emulator's managed identity and logs in through it.
    let tool =
        Path::new(env!("CARGO_BIN_EXE_postgres-entra-emulator")).with_file_name("postgres-entra");
    assert!(
        tool.exists(),
        "{} is built with the workspace (cargo build --workspace)",
        tool.display()
    );
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), lines.join("\n")).unwrap();
    let doctor = Command::new("sh")
        .args(["-c", r#". "$1" && exec "$2" doctor --json"#, "sh"])
        .arg(script.path())
        .arg(&tool)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AZURE_CLIENT_SECRET", "a-leftover-secret")
        .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
        .env("AZURE_TENANT_ID", "00000000-0000-0000-0000-000000000002")
        .env("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent/token")
        .env("PGUSER", "someone-else")
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&doctor.stdout),
            String::from_utf8_lossy(&doctor.stderr)
        )
    });
    let credential = report["steps"][0]["details"].to_string();
    assert!(
        credential.contains("ManagedIdentityCredential")
            && credential.contains("IDENTITY_ENDPOINT and IDENTITY_HEADER are set"),
        "{report:#}"
    );
    assert!(
        report["summary"]
            .as_str()
            .unwrap()
            .starts_with("OK: logged in"),
        "{report:#}"
    );

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
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("served 0 token and"),
        "no request reached a token endpoint other than the managed identity's: {said}"
    );
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

/// The leftover check of `make test` ends only the processes the run recorded, by id and start
/// time: a user's own server, whatever its command line, is left alone.
#[test]
fn the_leftover_check_ends_only_what_the_run_recorded() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check-leftovers.sh");
    let records = tempfile::tempdir().unwrap();
    // A user's emulator PostgreSQL, by its command line: not recorded.
    let mut lookalike = Command::new("bash")
        .args([
            "-c",
            "exec -a 'postgres -D /tmp/pg-entra-emu-user/data -p 5432' sleep 60",
        ])
        .spawn()
        .unwrap();
    // A server the run recorded, still running.
    let mut recorded = Command::new("sleep").arg("60").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let start = postgres_entra_testkit::start_time(recorded.id()).unwrap();
    std::fs::write(
        records.path().join(recorded.id().to_string()),
        format!("{start} postgres\n"),
    )
    .unwrap();
    // A recorded process that has ended, whose id a later process may have taken.
    std::fs::write(records.path().join("1"), "1 postgres\n").unwrap();

    let check = Command::new("bash")
        .arg(&script)
        .arg(records.path())
        .env("POSTGRES_ENTRA_LEFTOVER_WAIT", "1")
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(said.contains(&recorded.id().to_string()), "{said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the recorded process was not ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lookalike.try_wait().unwrap().is_none(),
        "the user's server was ended"
    );
    let _ = lookalike.kill();
    let _ = lookalike.wait();

    // Nothing recorded is left: it passes, and clears the records.
    let check = Command::new("bash")
        .arg(&script)
        .arg(records.path())
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    assert!(!records.path().exists());
}
