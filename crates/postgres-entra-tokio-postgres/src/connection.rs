//! The connection half of a login: drives the socket, as tokio-postgres's own does.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// tokio-postgres-rustls's stream type (it keeps the type itself private).
type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;

/// The connection half of a login made by [`connect`](crate::connect()): it drives the socket and must be spawned
/// (or polled), as with `tokio_postgres::connect`. Resolves when the connection closes.
pub struct Connection {
    pub(crate) inner: tokio_postgres::Connection<Socket, TlsStream>,
}

impl Connection {
    /// Polls for asynchronous messages from the server (notices, `NOTIFY`), as
    /// `tokio_postgres::Connection::poll_message` does.
    pub fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        self.inner.poll_message(cx)
    }
}

impl Future for Connection {
    type Output = Result<(), tokio_postgres::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}
