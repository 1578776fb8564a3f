//! Where a sqlx pool's connects go while no usable token can be had: sqlx takes its password from
//! the pool's connect options and offers no hook before a connect, so the options then point at a
//! private Unix socket (in a directory only this user can open) whose listener answers every
//! startup with a PostgreSQL error saying why: sqlx returns it as the connect's error, and no
//! connect ever presents an expired token.

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use std::path::PathBuf;

use postgres_entra::__private::PoolCore;
use postgres_entra::Error;

/// The start of every answer, by which `explain` recognises it.
const MARKER: &str = "postgres-entra: ";

/// The listener answering connects made while no token can be had.
pub(crate) struct Responder {
    directory: PathBuf,
    #[cfg(unix)]
    task: tokio::task::AbortHandle,
}

impl Drop for Responder {
    fn drop(&mut self) {
        #[cfg(unix)]
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// The port sqlx appends to the socket path (`.s.PGSQL.<port>`).
const PORT: u16 = 5432;

impl Responder {
    /// Starts the listener for `core`'s pool.
    pub(crate) fn start(core: &PoolCore) -> Result<Self, Error> {
        let directory = std::env::temp_dir().join(format!(
            "postgres-entra-{}-{:016x}",
            std::process::id(),
            fastrand_u64()
        ));
        let unavailable = |e: std::io::Error| {
            postgres_entra::__private::config_error(format!(
                "cannot create the sqlx pool's local answering socket in {}: {e}",
                directory.display()
            ))
        };
        std::fs::create_dir(&directory).map_err(unavailable)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o700))
                .map_err(unavailable)?;
            let listener =
                tokio::net::UnixListener::bind(directory.join(format!(".s.PGSQL.{PORT}")))
                    .map_err(unavailable)?;
            let core = core.clone();
            let task = tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(answer(socket, core.clone()));
                }
            });
            Ok(Self {
                directory,
                task: task.abort_handle(),
            })
        }
        #[cfg(not(unix))]
        {
            let _ = core;
            Ok(Self { directory })
        }
    }

    /// `base` pointed at this listener, without TLS (nothing secret crosses it) and without a token.
    pub(crate) fn options(&self, base: &PgConnectOptions) -> PgConnectOptions {
        base.clone()
            .socket(&self.directory)
            .port(PORT)
            .ssl_mode(PgSslMode::Disable)
            .password("")
    }

    /// Whether a server message is this listener's answer.
    pub(crate) fn answered(&self, message: &str) -> bool {
        message.starts_with(MARKER)
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// Reads the startup message and answers with an `ErrorResponse` (FATAL, SQLSTATE 08001) saying
/// why no token can be had; the failure is logged as the pool's (once, then summarized).
#[cfg(unix)]
async fn answer(mut socket: tokio::net::UnixStream, core: PoolCore) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut length = [0u8; 4];
    if socket.read_exact(&mut length).await.is_err() {
        return;
    }
    let length = u32::from_be_bytes(length) as usize;
    let mut startup = vec![0u8; length.saturating_sub(4).min(64 * 1024)];
    if socket.read_exact(&mut startup).await.is_err() {
        return;
    }
    // While the first request for a token runs, sqlx is asked to try again (57P03,
    // cannot_connect_now: sqlx retries it, re-reading the connect options, until its acquire
    // timeout); once the provider has failed, the connect fails at once with why (08001).
    let (code, message) = if core.token_failed() {
        let cause = core.explain().unwrap_or_else(|| {
            postgres_entra::__private::connect_error(core.name(), "no usable token")
        });
        core.failed(&cause);
        (
            "08001",
            format!(
                "{MARKER}no new connection for pool {}: {cause}",
                core.name()
            ),
        )
    } else {
        (
            "57P03",
            format!(
                "{MARKER}pool {} is waiting for its first token from the identity provider",
                core.name()
            ),
        )
    };
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message.as_str()),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.replace('\0', " ").as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut response = vec![b'E'];
    response.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    response.extend_from_slice(&fields);
    let _ = socket.write_all(&response).await;
    let _ = socket.shutdown().await;
}
