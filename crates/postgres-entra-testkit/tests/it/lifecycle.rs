//! The emulator leaves nothing behind: not on drop, not on panic, not when its process is killed.

use postgres_entra_testkit::{DIR_PREFIX, Emulator, TokenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::login;

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it is gone for our purposes once it no longer runs.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Pids of processes whose command line mentions `dir` (the server and its children do).
fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

fn wait_until_gone(pid: u32, dir: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while (alive(pid) || dir.exists() || !processes_using(dir).is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(pid), "postmaster {pid} still runs");
    assert!(
        processes_using(dir).is_empty(),
        "processes remain: {:?}",
        processes_using(dir)
    );
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn drop_stops_the_server_and_removes_its_files() {
    let emulator = Emulator::start().unwrap();
    let pid = emulator.server_pid().unwrap();
    let dir = emulator.directory();
    assert!(
        dir.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(DIR_PREFIX)
    );
    assert!(alive(pid));
    assert!(!processes_using(&dir).is_empty());

    drop(emulator);

    wait_until_gone(pid, &dir, Duration::from_secs(2));
}

#[test]
fn a_panicking_test_still_stops_the_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let emulator = Emulator::start().unwrap();
        tx.send((emulator.server_pid().unwrap(), emulator.directory()))
            .unwrap();
        panic!("a test failing while the emulator runs");
    })
    .join();

    assert!(outcome.is_err());
    let (pid, dir) = rx.recv().unwrap();
    wait_until_gone(pid, &dir, Duration::from_secs(2));
}

/// A process killed with SIGKILL runs no destructor; the watchdog cleans up after it.
#[test]
fn a_killed_owner_process_leaves_no_server_behind() {
    let report = tempfile::NamedTempFile::new().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lifecycle::hold_an_emulator_child",
            "--ignored",
            "--nocapture",
        ])
        .env("TESTKIT_HOLD_REPORT", report.path())
        .env_remove("NEXTEST_TEST_FILTER")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (pid, dir) = loop {
        let text = std::fs::read_to_string(report.path()).unwrap_or_default();
        if let Some((pid, dir)) = text.trim().split_once(' ') {
            break (pid.parse::<u32>().unwrap(), PathBuf::from(dir));
        }
        assert!(
            Instant::now() < deadline,
            "child never started its emulator"
        );
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(alive(pid));

    child.kill().unwrap();
    child.wait().unwrap();

    wait_until_gone(pid, &dir, Duration::from_secs(20));
}

#[test]
#[ignore = "run by a_killed_owner_process_leaves_no_server_behind"]
fn hold_an_emulator_child() {
    let Some(report) = std::env::var_os("TESTKIT_HOLD_REPORT") else {
        return;
    };
    let emulator = Emulator::start().unwrap();
    let line = format!(
        "{} {}",
        emulator.server_pid().unwrap(),
        emulator.directory().display()
    );
    std::fs::write(report, line).unwrap();
    // Bounded: the parent kills us long before this ends.
    std::thread::sleep(Duration::from_secs(60));
}

#[tokio::test]
async fn the_server_restarts_on_the_same_port_and_accepts_logins_again() {
    let emulator = Emulator::start().unwrap();
    let user = emulator.user();
    let token = emulator
        .issue_token(&user, TokenOptions::default())
        .unwrap();
    let port = emulator.port();
    let old_pid = emulator.server_pid().unwrap();
    assert_eq!(
        login(&emulator, &user.role_name, &token).await.unwrap(),
        user.role_name
    );

    emulator.restart_server().unwrap();

    assert_eq!(emulator.port(), port);
    assert_ne!(emulator.server_pid().unwrap(), old_pid);
    assert!(!alive(old_pid));
    assert_eq!(
        login(&emulator, &user.role_name, &token).await.unwrap(),
        user.role_name
    );
}
