//! `postgres-entra exec` against the local emulator, with the real `psql` and `pg_dump`: the
//! command logs in with the token it was given, exit statuses and signals pass through, plaintext
//! settings and a failing provider stop it before it runs, and no output holds a token.

mod common;

use postgres_entra_testkit::{Emulator, Endpoint, Fault};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `postgres-entra exec` as a user runs it ([`common::user_command`]), with `PATH` and `env`.
fn exec(emulator: &Emulator, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = common::user_command(emulator);
    command
        .arg("exec")
        .args(args)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Runs `exec` to completion (in a blocking section: the emulator answers on this runtime).
fn output(mut command: impl std::borrow::BorrowMut<Command>) -> Output {
    tokio::task::block_in_place(|| command.borrow_mut().output().unwrap())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// No token the emulator issued, nor any part of one, appears in `outputs`.
fn assert_no_token(emulator: &Emulator, outputs: &[&Output]) {
    let all: String = outputs
        .iter()
        .map(|o| text(&o.stdout) + &text(&o.stderr))
        .collect();
    let tokens = emulator.issued_tokens();
    assert!(!tokens.is_empty());
    for token in tokens {
        for segment in token.split('.') {
            assert!(!all.contains(segment), "a token segment was printed: {all}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pg_dump_log_in_with_the_token_and_print_none_of_it() {
    let emulator = Emulator::start_async().await.unwrap();
    let role = emulator.managed_identity().role_name;

    // The role comes from the token's claims, as the pools choose it.
    let psql = output(exec(
        &emulator,
        &[],
        &["--", "psql", "-XtAc", "select current_user"],
    ));
    assert_eq!(psql.status.code(), Some(0), "{}", text(&psql.stderr));
    assert_eq!(text(&psql.stdout).trim(), role);

    // Tools that read only DATABASE_URL get the same login.
    let url = output(exec(
        &emulator,
        &[],
        &[
            "--",
            "sh",
            "-c",
            r#"PGHOST= PGUSER= PGPASSWORD= PGSSLMODE= PGSSLROOTCERT= psql -XtA "$DATABASE_URL" -c 'select current_user, current_database()'"#,
        ],
    ));
    assert_eq!(url.status.code(), Some(0), "{}", text(&url.stderr));
    assert_eq!(
        text(&url.stdout).trim(),
        format!("{role}|{}", emulator.database())
    );

    // pg_dump, as a migration pipeline runs it.
    let dump = output(exec(&emulator, &[], &["--", "pg_dump", "--schema-only"]));
    assert_eq!(dump.status.code(), Some(0), "{}", text(&dump.stderr));
    assert!(text(&dump.stdout).contains("PostgreSQL database dump complete"));

    // The child sees verify-full and the variables libpq reads; with --no-database-url, the
    // parent's DATABASE_URL is left alone.
    let seen = output(exec(
        &emulator,
        &[("DATABASE_URL", "postgres://elsewhere/db")],
        &[
            "--no-database-url",
            "--",
            "sh",
            "-c",
            r#"echo "$PGSSLMODE $PGUSER $PGDATABASE $DATABASE_URL ${#PGPASSWORD}""#,
        ],
    ));
    let seen_text = text(&seen.stdout);
    let fields: Vec<&str> = seen_text.split_whitespace().collect();
    assert_eq!(
        fields[..4],
        [
            "verify-full",
            role.as_str(),
            emulator.database(),
            "postgres://elsewhere/db"
        ]
    );
    assert!(
        fields[4].parse::<usize>().unwrap() > 100,
        "a token's length"
    );

    assert_no_token(&emulator, &[&psql, &url, &dump, &seen]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_exit_status_and_signals_pass_through() {
    let emulator = Emulator::start_async().await.unwrap();

    let failing = output(exec(&emulator, &[], &["--", "sh", "-c", "exit 7"]));
    assert_eq!(failing.status.code(), Some(7));
    let killed = output(exec(&emulator, &[], &["--", "sh", "-c", "kill -TERM $$"]));
    assert_eq!(killed.status.code(), Some(128 + 15));
    let missing = output(exec(&emulator, &[], &["--", "no-such-command-anywhere"]));
    assert_eq!(missing.status.code(), Some(127));
    assert!(text(&missing.stderr).contains("no-such-command-anywhere"));

    // SIGTERM to `exec` (a supervisor stopping it) reaches the command, whose own status is
    // then `exec`'s.
    let mut child = exec(
        &emulator,
        &[],
        &[
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    tokio::task::block_in_place(|| {
        use std::io::Read;
        let mut ready = [0u8; 6];
        stdout.read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("exec did not end after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pgsslrootcert_the_azure_roots_are_in_a_private_file_removed_afterwards() {
    let emulator = Emulator::start_async().await.unwrap();
    let mut command = exec(
        &emulator,
        &[],
        &[
            "--",
            "sh",
            "-c",
            r#"echo "$PGSSLROOTCERT"; stat -c %a "$PGSSLROOTCERT"; grep -c 'BEGIN CERTIFICATE' "$PGSSLROOTCERT""#,
        ],
    );
    command.env_remove("PGSSLROOTCERT");

    let listed = output(&mut command);

    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed.stderr));
    let said = text(&listed.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines[1..], ["600", "4"], "{said}");
    assert!(
        !std::path::Path::new(lines[0]).exists(),
        "{} was left behind",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_settings_and_a_failing_provider_stop_the_command_before_it_runs() {
    let emulator = Emulator::start_async().await.unwrap();
    let ran = ["--", "sh", "-c", "echo ran"];

    for (name, value, says) in [
        ("PGSSLMODE", "disable", "clear text"),
        ("PGSSLMODE", "allow", "clear text"),
        ("PGCHANNELBINDING", "require", "PGCHANNELBINDING"),
        ("PGHOST", "/var/run/postgresql", "one TCP host name"),
    ] {
        let refused = output(exec(&emulator, &[(name, value)], &ran));
        assert_eq!(refused.status.code(), Some(125), "{name}={value}");
        assert!(text(&refused.stdout).is_empty(), "the command ran");
        assert!(
            text(&refused.stderr).contains(says),
            "{}",
            text(&refused.stderr)
        );
    }

    emulator.set_fault(Endpoint::ManagedIdentity, Fault::ServerError);
    let failing = output(exec(&emulator, &[], &ran));
    emulator.clear_fault(Endpoint::ManagedIdentity);
    assert_eq!(failing.status.code(), Some(125));
    assert!(text(&failing.stdout).is_empty(), "the command ran");
    let said = text(&failing.stderr);
    for expected in [
        "no token, so the command was not run",
        "HTTP 500",
        "postgres-entra doctor",
        "FAIL at step 2",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
}
