//! `postgres-entra-shared-cluster COMMAND [ARG]...`: runs a command (a test run) with one
//! PostgreSQL cluster that every emulator it starts shares, each in a database of its own, instead
//! of a cluster each; stops the cluster and removes its files when the command ends, and exits
//! with the command's status.

use postgres_entra_testkit::SharedCluster;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;

const USAGE: &str = "usage: postgres-entra-shared-cluster COMMAND [ARG]...

Starts a PostgreSQL cluster for the emulators COMMAND starts (named to them by
POSTGRES_ENTRA_SHARED_CLUSTER), runs COMMAND, then stops the cluster and removes its files.
Emulators built with `private_cluster()` still start their own.";

fn main() {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "--") {
        args.next();
    }
    let Some(program) = args.next() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    if program == "-h" || program == "--help" {
        println!("{USAGE}");
        return;
    }
    let cluster = match SharedCluster::start() {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("postgres-entra-shared-cluster: could not start the cluster: {e}");
            std::process::exit(1);
        }
    };
    let status = Command::new(&program)
        .args(args)
        .env(SharedCluster::ENV, cluster.directory())
        .status();
    drop(cluster);
    match status {
        Ok(status) => std::process::exit(
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        ),
        Err(e) => {
            eprintln!(
                "postgres-entra-shared-cluster: could not run {}: {e}",
                program.to_string_lossy()
            );
            std::process::exit(127);
        }
    }
}
