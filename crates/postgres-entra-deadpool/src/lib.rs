#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use deadpool_postgres::tokio_postgres;
use deadpool_postgres::{
    Config, ConfigError, Connect, CreatePoolError, Hook, HookError, Manager, Pool, PoolBuilder,
    PoolError, Runtime,
};
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

// The public interface is:
pub use deadpool_postgres;
pub use postgres_entra;
#[cfg(feature = "azure")]
pub use postgres_entra::AzureTokenSource;
pub use postgres_entra::{CacheOptions, Cloud, EntraConnector, Error, TlsRoots, TokenCache};

/// A deadpool-postgres `Connect` that logs every new connection in with an Entra ID token.
#[derive(Clone)]
pub struct EntraConnect {
    connector: EntraConnector,
}

impl fmt::Debug for EntraConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntraConnect")
            .field("connector", &self.connector)
            .finish()
    }
}

impl EntraConnect {
    /// Wraps `connector`.
    pub fn new(connector: EntraConnector) -> Self {
        Self { connector }
    }
}

impl Connect for EntraConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> Pin<
        Box<
            dyn Future<
                    Output = Result<
                        (tokio_postgres::Client, JoinHandle<()>),
                        tokio_postgres::Error,
                    >,
                > + Send
                + '_,
        >,
    > {
        let pg_config = pg_config.clone();
        Box::pin(async move {
            match self.connector.connect(&pg_config).await {
                Ok((client, connection)) => {
                    let task = tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "PostgreSQL connection ended with an error");
                        }
                    });
                    Ok((client, task))
                }
                Err(Error::Postgres(error)) => Err(error),
                Err(error) => Err(smuggle(error).await),
            }
        })
    }
}

/// An in-memory stream whose first write fails with our error.
struct FailingStream(Option<Error>);

impl AsyncRead for FailingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FailingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<io::Result<usize>> {
        let error = self
            .0
            .take()
            .map_or_else(|| io::Error::other("closed"), io::Error::other);
        Poll::Ready(Err(error))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Wraps our error in a `tokio_postgres::Error`, which deadpool's `Connect` must return and only
/// tokio-postgres can construct: a startup over a stream that fails with our error yields an I/O
/// error carrying it. [`entra_error`] takes it back out.
async fn smuggle(error: Error) -> tokio_postgres::Error {
    let mut config = tokio_postgres::Config::new();
    config
        .user("postgres-entra")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    match config
        .connect_raw(FailingStream(Some(error)), tokio_postgres::NoTls)
        .await
    {
        Err(carrier) => carrier,
        Ok(_) => unreachable!("a startup over a failing stream cannot succeed"),
    }
}

/// Our typed error inside an error from the pool (or from a connection it made), if that is what
/// went wrong: a token that could not be fetched, a rejected login, TLS, or configuration.
///
/// ```
/// # fn report(error: deadpool_postgres::PoolError) {
/// match postgres_entra_deadpool::entra_error(&error) {
///     Some(postgres_entra_deadpool::Error::Token(e)) => eprintln!("identity provider: {e}"),
///     Some(other) => eprintln!("Entra login: {other}"),
///     None => eprintln!("pool: {error}"),
/// }
/// # }
/// ```
pub fn entra_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        // io::Error's own source() skips the error it wraps, so look inside explicitly.
        if let Some(found) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<Error>())
        {
            return Some(found);
        }
        if let Some(PoolError::Backend(backend)) = e.downcast_ref::<PoolError>() {
            next = Some(backend);
            continue;
        }
        next = e.source();
    }
    None
}

/// A deadpool `Manager` for the user's settings that logs in with Entra ID tokens.
pub fn manager(config: &Config, connector: EntraConnector) -> Result<Manager, ConfigError> {
    Ok(Manager::from_connect(
        config.get_pg_config()?,
        EntraConnect::new(connector),
        config.get_manager_config(),
    ))
}

/// A pool builder for the user's `deadpool_postgres::Config` (pool size, timeouts, recycling
/// method, ...) whose connections log in with Entra ID tokens, on the Tokio runtime. Add hooks such
/// as [`max_age`] before building.
pub fn pool_builder(
    config: &Config,
    connector: EntraConnector,
) -> Result<PoolBuilder, ConfigError> {
    Ok(Pool::builder(manager(config, connector)?)
        .config(config.get_pool_config())
        .runtime(Runtime::Tokio1))
}

/// The user's `deadpool_postgres::Config` as a pool whose connections log in with Entra ID
/// tokens: the same `deadpool_postgres::Pool` type, so the rest of the code does not change.
pub fn create_pool(config: &Config, connector: EntraConnector) -> Result<Pool, CreatePoolError> {
    pool_builder(config, connector)
        .map_err(CreatePoolError::Config)?
        .build()
        .map_err(CreatePoolError::Build)
}

/// A `pre_recycle` hook that retires connections older than `max_age` minus up to `jitter`,
/// chosen per connection so that connections made together do not all expire together
/// (deadpool has no maximum lifetime of its own).
pub fn max_age(max_age: Duration, jitter: Duration) -> Hook {
    let jitter = jitter.min(max_age);
    let hasher = std::collections::hash_map::RandomState::new();
    Hook::sync_fn(move |_client, metrics| {
        let fraction = (hasher.hash_one(metrics.created) % 10_000) as f64 / 10_000.0;
        let limit = max_age - jitter.mul_f64(fraction);
        if metrics.age() >= limit {
            tracing::debug!(
                age_ms = metrics.age().as_millis() as u64,
                "retiring a connection past its maximum age"
            );
            Err(HookError::message("connection reached its maximum age"))
        } else {
            Ok(())
        }
    })
}
