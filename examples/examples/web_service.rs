//! A small axum web service with a deadpool pool whose connections log in with Entra ID tokens.
//! `GET /whoami` answers with the database role and the token cache's counters; `GET /metrics`
//! serves the pool's and the tokens' OpenTelemetry metrics in the Prometheus text format (the
//! application picks the exporter: here `opentelemetry-prometheus`).
//!
//! Run against the local emulator:   cargo run -p postgres-entra-examples --example web_service
//!   then: curl http://127.0.0.1:3000/whoami ; curl http://127.0.0.1:3000/metrics
//!   (PORT changes the port; --check serves both to itself, prints them and exits)
//! Run against Azure: set PGHOST (and PGUSER, PGDATABASE) plus AZURE_* or IDENTITY_* as described in
//! examples/src/lib.rs, then run the same command.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use postgres_entra_deadpool::{Pool, PoolOptions, create_pool};
use postgres_entra_examples::{
    BoxError, Target, install_prometheus_metrics, metrics_summary, prometheus_text,
};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone)]
struct App {
    pool: Pool,
    registry: prometheus::Registry,
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

/// One plain HTTP/1.0 request to ourselves, for `--check`.
async fn get_self(port: u16, path: &str) -> Result<String, BoxError> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // First the metrics pipeline, so that the connector built next records into it.
    let registry = install_prometheus_metrics()?;
    let target = Target::from_env(Duration::from_secs(3600))?;
    let pool = create_pool(
        &target.deadpool_config(16),
        &target.connector,
        PoolOptions::new().pool_name("web"),
    )?;
    let app = App { pool, registry };
    let router = Router::new()
        .route("/whoami", get(whoami))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(app);
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let check = std::env::args().any(|a| a == "--check");
    let listener =
        tokio::net::TcpListener::bind(("127.0.0.1", if check { 0 } else { port })).await?;
    let port = listener.local_addr()?.port();
    println!("database: {}", target.description);
    println!("serving on http://127.0.0.1:{port}/whoami");

    if check {
        tokio::spawn(async move { axum::serve(listener, router).await });
        let response = get_self(port, "/whoami").await?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        println!("GET /whoami -> {body}");
        if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
            return Err(format!("unexpected answer: {response}").into());
        }
        let response = get_self(port, "/metrics").await?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        println!("GET /metrics -> (pools and tokens, shortened)");
        for line in metrics_summary(body) {
            println!("  {line}");
        }
        if !body.contains("db_client_connection_create_time_seconds_count{") {
            return Err(format!("no pool metrics in /metrics: {body}").into());
        }
        return Ok(());
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
