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

use postgres_entra_deadpool::{SessionOptions, create_pool};
use postgres_entra_examples::web::{http_get, router};
use postgres_entra_examples::{BoxError, Target, install_prometheus_metrics, metrics_summary};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // First the metrics pipeline, so that the connector built next records into it.
    let registry = install_prometheus_metrics()?;
    let target = Target::from_env(Duration::from_secs(3600))?;
    let pool = create_pool(
        &target.deadpool_config(16),
        &target.connector,
        SessionOptions::new().pool_name("web"),
    )?;
    let router = router(pool, registry);
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
        let (status, body) = http_get(port, "/whoami").await?;
        println!("GET /whoami -> {body}");
        if status != 200 {
            return Err(format!("unexpected answer: {status} {body}").into());
        }
        let (_, body) = http_get(port, "/metrics").await?;
        println!("GET /metrics -> (pools and tokens, shortened)");
        for line in metrics_summary(&body) {
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
