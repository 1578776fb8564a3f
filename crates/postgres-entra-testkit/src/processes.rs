//! The servers a test run started, recorded by process id and start time, so that the run's final
//! check (`scripts/check-leftovers.sh`) ends those alone: never a user's own PostgreSQL or
//! Prometheus, whatever its command line looks like.

use std::path::PathBuf;

/// The environment variable naming the directory a run records its servers in (`make test` sets
/// it to a fresh directory under `target/`).
pub const PROCESSES_VARIABLE: &str = "POSTGRES_ENTRA_TEST_PROCESSES";

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`, in clock ticks since boot),
/// which tells it from a later process that gets the same id.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Records that this run started process `pid` (a file `<pid>` holding its start time and
/// `what`), when the run records them ([`PROCESSES_VARIABLE`] is set); else does nothing.
pub fn record_started(pid: u32, what: &str) {
    let Some(directory) = std::env::var_os(PROCESSES_VARIABLE).map(PathBuf::from) else {
        return;
    };
    let Some(started) = start_time(pid) else {
        return;
    };
    let _ = std::fs::create_dir_all(&directory);
    let _ = std::fs::write(
        directory.join(pid.to_string()),
        format!("{started} {what}\n"),
    );
}
