//! Integration tests of the emulator against real PostgreSQL, real TLS and azure_identity's real
//! credential types. One binary, one emulator per test (each cleans up after itself).

mod azure_names;
mod binary;
mod credentials;
mod lifecycle;
mod login;
mod loopback;
mod mock_entra;
mod relay;

use postgres_entra_testkit::Emulator;

/// The scope every credential asks for.
pub const SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// Logs in as `role` with `token` over TLS and returns `current_user`.
pub async fn login(
    emulator: &Emulator,
    role: &str,
    token: &str,
) -> Result<String, tokio_postgres::Error> {
    let mut config = emulator.pg_config(role);
    config.password(token);
    let (client, connection) = config
        .connect(emulator.tls().expect("tls connector"))
        .await?;
    tokio::spawn(connection);
    let row = client.query_one("select current_user", &[]).await?;
    Ok(row.get(0))
}

/// Asserts that `result` is a refused login (SQLSTATE class 28) and returns the server's message.
pub fn assert_refused(result: Result<String, tokio_postgres::Error>) -> String {
    let error = result.expect_err("login must be refused");
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got {error:?}"));
    assert!(
        db.code().code().starts_with("28"),
        "expected an authorization error, got {} {}",
        db.code().code(),
        db.message()
    );
    db.message().to_owned()
}

/// Decodes a JWT's header and payload without verifying it.
pub fn jwt_parts(token: &str) -> (serde_json::Value, serde_json::Value) {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let mut decode = || {
        let part = parts.next().expect("JWT part");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .expect("base64url");
        serde_json::from_slice(&bytes).expect("JSON")
    };
    (decode(), decode())
}
