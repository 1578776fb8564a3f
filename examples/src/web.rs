//! The `web_service` example's service: an axum router with `GET /whoami` (a checkout and
//! `select current_user`), `GET /metrics` (the Prometheus text format) and `GET /health`. In the
//! library of the examples so that the operations tests scrape exactly what the example serves.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use postgres_entra_deadpool::Pool;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{BoxError, prometheus_text};

#[derive(Clone)]
struct App {
    pool: Pool,
    registry: prometheus::Registry,
}

/// The service's routes over `pool`, serving `registry`'s metrics.
pub fn router(pool: Pool, registry: prometheus::Registry) -> Router {
    Router::new()
        .route("/whoami", get(whoami))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(App { pool, registry })
}

async fn whoami(State(app): State<App>) -> Result<Json<Value>, (StatusCode, String)> {
    let client = app.pool.get().await.map_err(|e| {
        let message = match app.pool.manager().explain(&e) {
            Some(entra) => format!("database login failed: {entra}"),
            None => format!("database unavailable: {e}"),
        };
        (StatusCode::SERVICE_UNAVAILABLE, message)
    })?;
    let row = client
        .query_one("select current_user", &[])
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let stats = app.pool.manager().token_cache().stats();
    Ok(Json(json!({
        "role": row.get::<_, String>(0),
        "token_requests": stats.requests,
        "token_expires_in_secs": stats.expires_in.map(|d| d.as_secs()),
    })))
}

async fn metrics(State(app): State<App>) -> Result<String, (StatusCode, String)> {
    prometheus_text(&app.registry).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// One plain HTTP/1.0 GET of `path_and_query` from `127.0.0.1:port`: the status line's code and
/// the body.
pub async fn http_get(port: u16, path_and_query: &str) -> Result<(u16, String), BoxError> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path_and_query} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head}"))?;
    Ok((status, body.to_owned()))
}
