//! One connection, for tokio-postgres users without a pool.

use tokio_postgres::{Client, Config};

use postgres_entra::{EntraConnector, Error, SessionOptions};

use crate::connection::Connection;
use crate::login::PgLogin;

/// Opens a connection that logs in with an Entra ID token from `connector`: TLS required and
/// verified (`sslmode=disable` is an error, `prefer` becomes `require`), the role from the
/// connector, else `config`'s user, else the token. When the server refuses the login, it is
/// retried once with a different token if one can be had; otherwise [`Error::LoginRejected`] says
/// what to fix.
///
/// Spawn the returned [`Connection`] (it drives the socket), as with `tokio_postgres::connect`.
/// A pool adapter (`postgres-entra-deadpool`, `-bb8`, `-diesel`) does all this per connection, and
/// also retires sessions once their token has expired.
pub async fn connect(
    connector: &EntraConnector,
    config: &Config,
) -> Result<(Client, Connection), Error> {
    let login = PgLogin::new(
        connector,
        config,
        SessionOptions::new().token_bound(false),
        None,
    )?;
    login
        .open()
        .await
        .map(|(client, connection, _session)| (client, connection))
}
