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

    // The child sees verify-full and the variables libpq reads; with --no-database-url, no
    // DATABASE_URL at all (an inherited one could name another server, which the token in
    // PGPASSWORD would then reach).
    let seen = output(exec(
        &emulator,
        &[("DATABASE_URL", "postgres://elsewhere/db")],
        &[
            "--no-database-url",
            "--",
            "sh",
            "-c",
            r#"echo "$PGSSLMODE $PGUSER $PGDATABASE ${DATABASE_URL-unset} ${#PGPASSWORD}""#,
        ],
    ));
    let seen_text = text(&seen.stdout);
    let fields: Vec<&str> = seen_text.split_whitespace().collect();
    assert_eq!(
        fields[..4],
        ["verify-full", role.as_str(), emulator.database(), "unset"]
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
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            killed.status.signal(),
            Some(15),
            "exec ends by the command's signal"
        );
    }
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
        ("PGHOST", "/var/run/postgresql", "Unix socket"),
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

/// One hostile setting: what it is, the variables, and what must become of it.
type Variant = (&'static str, Vec<(&'static str, String)>, Expect);

/// What became of one hostile setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// exec refuses it: exit 125, saying this, and the command never ran.
    Refused(&'static str),
    /// exec strips it: the command logs in to the emulator, from the environment and from
    /// `$DATABASE_URL`.
    LogsIn,
}

/// Every way a libpq setting in exec's own environment could lead its command elsewhere or weaken
/// its TLS: each is refused or stripped, and a listener that asks for a cleartext password (on
/// every port a variant names) never hears from the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_setting_in_the_environment_leads_the_command_or_its_token_elsewhere() {
    let emulator = Emulator::start_async().await.unwrap();
    let role = emulator.managed_identity().role_name;
    let trap = postgres_entra_testkit::PlaintextListener::start()
        .await
        .unwrap();
    let (port, server) = (trap.port().to_string(), emulator.port().to_string());
    // A service file naming the trap, without TLS, where libpq looks for one.
    let dir = tempfile::tempdir().unwrap();
    let service = format!("[trap]\nhost=127.0.0.1\nport={port}\nsslmode=disable\n");
    for name in ["pg_service.conf", ".pg_service.conf", "service.conf"] {
        std::fs::write(dir.path().join(name), &service).unwrap();
    }
    let home = dir.path().to_string_lossy().into_owned();
    let file = dir
        .path()
        .join("service.conf")
        .to_string_lossy()
        .into_owned();
    let trap_url = format!("postgresql://127.0.0.1:{port}/postgres?sslmode=disable");
    let variants: Vec<Variant> = vec![
        (
            "a service file named by PGSERVICEFILE",
            vec![
                ("PGSERVICE", "trap".into()),
                ("PGSERVICEFILE", file.clone()),
            ],
            Expect::Refused("PGSERVICE"),
        ),
        (
            "a service file under PGSYSCONFDIR",
            vec![("PGSERVICE", "trap".into()), ("PGSYSCONFDIR", home.clone())],
            Expect::Refused("PGSERVICE"),
        ),
        (
            "~/.pg_service.conf",
            vec![("PGSERVICE", "trap".into()), ("HOME", home.clone())],
            Expect::Refused("PGSERVICE"),
        ),
        (
            "service files without PGSERVICE",
            vec![
                ("PGSERVICEFILE", file.clone()),
                ("PGSYSCONFDIR", home.clone()),
                ("HOME", home.clone()),
            ],
            Expect::LogsIn,
        ),
        (
            "a Linux abstract socket",
            vec![("PGHOST", "@trap".into())],
            Expect::Refused("Unix socket"),
        ),
        (
            "a Unix socket directory",
            vec![("PGHOST", "/tmp".into())],
            Expect::Refused("Unix socket"),
        ),
        (
            "URL pieces in the host",
            vec![("PGHOST", format!("127.0.0.1?port={port}&sslmode=disable#"))],
            Expect::Refused("neither a DNS name"),
        ),
        (
            "a host list",
            vec![("PGHOST", "localhost,127.0.0.1".into())],
            Expect::Refused("list of hosts"),
        ),
        (
            "a port list",
            vec![("PGPORT", format!("{server},{port}"))],
            Expect::Refused("one port number"),
        ),
        (
            "an address list",
            vec![("PGHOSTADDR", "127.0.0.1,127.0.0.1".into())],
            Expect::Refused("one IP address"),
        ),
        (
            "a host not allowed",
            vec![
                ("PGHOST", "db.example.com".into()),
                ("PGHOSTADDR", "127.0.0.1".into()),
            ],
            Expect::Refused("allow"),
        ),
        (
            "session attributes and load balancing",
            vec![
                ("PGTARGETSESSIONATTRS", "read-only".into()),
                ("PGLOADBALANCEHOSTS", "random".into()),
            ],
            Expect::LogsIn,
        ),
        (
            "PGREQUIRESSL=0",
            vec![("PGREQUIRESSL", "0".into())],
            Expect::LogsIn,
        ),
        (
            "PGSSLNEGOTIATION=direct",
            vec![("PGSSLNEGOTIATION", "direct".into())],
            Expect::LogsIn,
        ),
        (
            "PGGSSENCMODE=require",
            vec![("PGGSSENCMODE", "require".into())],
            Expect::LogsIn,
        ),
        (
            "client certificate settings",
            vec![
                ("PGSSLCERT", "/nonexistent.crt".into()),
                ("PGSSLKEY", "/nonexistent.key".into()),
                ("PGSSLCRL", "/nonexistent.crl".into()),
            ],
            Expect::LogsIn,
        ),
        (
            "PGSSLMODE=disable",
            vec![("PGSSLMODE", "disable".into())],
            Expect::Refused("clear text"),
        ),
        (
            "PGSSLMODE=allow",
            vec![("PGSSLMODE", "allow".into())],
            Expect::Refused("clear text"),
        ),
        (
            "PGCHANNELBINDING=require",
            vec![("PGCHANNELBINDING", "require".into())],
            Expect::Refused("PGCHANNELBINDING"),
        ),
        (
            "an empty PGHOSTADDR (unset, as for libpq)",
            vec![("PGHOSTADDR", String::new())],
            Expect::LogsIn,
        ),
    ];
    // Both ways a tool finds the server: libpq's variables, and `$DATABASE_URL`.
    let command = [
        "--",
        "sh",
        "-c",
        r#"psql -XtAc 'select current_user' && psql -XtA "$DATABASE_URL" -c 'select 2'"#,
    ];
    let mut outputs = Vec::new();
    for (what, env, expect) in &variants {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut run = exec(&emulator, &env, &command);
        if env
            .iter()
            .any(|(name, _)| *name == "PGPORT" && env.len() == 3)
        {
            // Empty settings are unset: with PGHOST gone too, there is no server.
            run.env_remove("PGHOST");
        }
        let ran = output(run);
        match expect {
            Expect::Refused(says) => {
                assert_eq!(
                    ran.status.code(),
                    Some(125),
                    "{what}: {}",
                    text(&ran.stderr)
                );
                assert!(text(&ran.stdout).is_empty(), "{what}: the command ran");
                assert!(
                    text(&ran.stderr).contains(says),
                    "{what}: {}",
                    text(&ran.stderr)
                );
            }
            Expect::LogsIn => {
                assert_eq!(ran.status.code(), Some(0), "{what}: {}", text(&ran.stderr));
                assert_eq!(text(&ran.stdout), format!("{role}\n2\n"), "{what}");
            }
        }
        outputs.push(ran);
    }
    // An empty PGDATABASE is unset too: the default database, named.
    let ran = output(exec(
        &emulator,
        &[("PGDATABASE", "")],
        &["--", "sh", "-c", r#"echo "$PGDATABASE""#],
    ));
    assert_eq!(text(&ran.stdout), "postgres\n", "{}", text(&ran.stderr));

    // An inherited DATABASE_URL naming the trap is removed, with --no-database-url too.
    let ran = output(exec(
        &emulator,
        &[("DATABASE_URL", trap_url.as_str())],
        &[
            "--no-database-url",
            "--",
            "sh",
            "-c",
            r#"psql -XtA "$DATABASE_URL" -c 'select 3'"#,
        ],
    ));
    assert_eq!(ran.status.code(), Some(0), "{}", text(&ran.stderr));
    assert_eq!(text(&ran.stdout), "3\n");
    outputs.push(ran);

    assert_eq!(trap.connections(), 0, "the trap heard from the command");
    assert!(trap.received().is_empty());
    let all: Vec<&Output> = outputs.iter().collect();
    assert_no_token(&emulator, &all);
}

/// The command sees the connection exec made and none of the credential's secrets, unless asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_gets_no_credential_secret_unless_asked() {
    let emulator = Emulator::start_async().await.unwrap();
    let show = ["--", "sh", "-c", "env | cut -d= -f1 | sort"];
    let names = |keep: bool| {
        let mut args = vec![];
        if keep {
            args.push("--keep-credential-env");
        }
        args.extend(show);
        let ran = output(exec(
            &emulator,
            &[("AZURE_CLIENT_CERTIFICATE_PASSWORD", "not-for-the-command")],
            &args,
        ));
        assert_eq!(ran.status.code(), Some(0), "{}", text(&ran.stderr));
        text(&ran.stdout)
    };
    let stripped = names(false);
    for gone in [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    ] {
        assert!(
            !stripped.lines().any(|l| l == gone),
            "{gone} reached the command"
        );
    }
    for set in [
        "PGHOST",
        "PGPASSWORD",
        "PGSSLMODE",
        "PGGSSENCMODE",
        "DATABASE_URL",
    ] {
        assert!(stripped.lines().any(|l| l == set), "{set} missing");
    }
    let kept = names(true);
    for kept_name in [
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    ] {
        assert!(kept.lines().any(|l| l == kept_name), "{kept_name} not kept");
    }
}

/// A signal sent to exec alone (not by the terminal to its whole group) reaches the command; a
/// command killed by a signal makes exec end by the same signal, its roots file removed first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_to_exec_reach_the_command_and_a_signal_death_is_passed_up() {
    use std::os::unix::process::ExitStatusExt;
    let emulator = Emulator::start_async().await.unwrap();
    for (signal, code) in [
        (nix::sys::signal::Signal::SIGINT, 41),
        (nix::sys::signal::Signal::SIGQUIT, 42),
        (nix::sys::signal::Signal::SIGUSR1, 43),
        (nix::sys::signal::Signal::SIGHUP, 44),
    ] {
        let name = signal.as_str().trim_start_matches("SIG");
        let script = format!("trap 'exit {code}' {name}; echo ready; while :; do sleep 0.1; done");
        let mut child = exec(&emulator, &[], &["--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        tokio::task::block_in_place(|| {
            use std::io::Read;
            let mut ready = [0u8; 6];
            stdout.read_exact(&mut ready).unwrap();
        });
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
        let status = wait_bounded(&mut child).await;
        assert_eq!(status.code(), Some(code), "{signal}");
    }

    // The command killed by SIGTERM: exec ends by SIGTERM too, after removing the roots file.
    let mut command = exec(
        &emulator,
        &[],
        &["--", "sh", "-c", r#"echo "$PGSSLROOTCERT"; kill -TERM $$"#],
    );
    command.env_remove("PGSSLROOTCERT");
    let ended = output(command);
    assert_eq!(ended.status.signal(), Some(15), "{:?}", ended.status);
    let roots = text(&ended.stdout);
    assert!(
        !std::path::Path::new(roots.trim()).exists(),
        "{roots} was left behind"
    );
}

/// Waits (bounded) for `child` to end.
async fn wait_bounded(child: &mut std::process::Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("exec did not end");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
