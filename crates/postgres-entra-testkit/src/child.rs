//! Running one test of the current test binary in a child process with its own environment: for
//! credentials that read the process environment (azure_identity's `ManagedIdentityCredential`
//! reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`), which a test must not change under its
//! siblings' threads.

use std::ffi::OsStr;
use std::time::Duration;

use crate::Error;

/// Set in the child's environment, so that the child test knows it is the child.
pub const CHILD_MARKER: &str = "POSTGRES_ENTRA_TEST_CHILD";

/// Whether this process is a child started by [`run_test_in_child`]. Child tests are `#[ignore]`d
/// and return at once when this is false, so that `--ignored` runs skip them.
pub fn in_child() -> bool {
    std::env::var_os(CHILD_MARKER).is_some()
}

/// Whether this process is a child started by [`run_test_in_child`] with the App Service
/// variables, `IDENTITY_ENDPOINT` checked to point at loopback: no managed-identity credential
/// built in it can fall through to the instance metadata address. `false` outside a child (the
/// test returns at once).
pub fn in_app_service_child() -> bool {
    if !in_child() {
        return false;
    }
    let endpoint = std::env::var("IDENTITY_ENDPOINT").expect("IDENTITY_ENDPOINT is set");
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    true
}

/// Runs the test named `test` (its full path, e.g. `provider_errors::child`) of the current test
/// binary in a child process with `env` added (and [`CHILD_MARKER`]), for at most `timeout`.
/// Returns what the child printed; an error carrying that output if the child failed.
pub async fn run_test_in_child<K, V>(
    test: &str,
    env: impl IntoIterator<Item = (K, V)>,
    timeout: Duration,
) -> Result<String, Error>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let exe = std::env::current_exe()?;
    let child = tokio::process::Command::new(exe)
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env)
        .env(CHILD_MARKER, "1")
        .env_remove("NEXTEST_TEST_FILTER")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| Error::Setup(format!("child test {test} ran longer than {timeout:?}")))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !text.contains("1 passed") {
        return Err(Error::Setup(format!(
            "child test {test} failed ({}):\n{text}",
            output.status
        )));
    }
    Ok(text)
}
