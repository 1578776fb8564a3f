//! What the CLI's tests share.

use postgres_entra_testkit::Emulator;
use std::process::Command;

/// The `postgres-entra` binary as a user runs it: a managed identity from `IDENTITY_ENDPOINT`,
/// the server from `PG*` (trusting the emulator's CA), nothing else from this process's
/// environment.
pub(crate) fn user_command(emulator: &Emulator) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postgres-entra"));
    command
        .env_clear()
        .env("PGHOST", emulator.host())
        .env("PGPORT", emulator.port().to_string())
        .env("PGDATABASE", emulator.database())
        .env("PGSSLROOTCERT", emulator.ca_cert_path());
    for (name, value) in emulator.app_service_env() {
        command.env(name, value);
    }
    command
}
