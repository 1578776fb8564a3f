//! End-to-end tests: each pool adapter against the local emulator, with azure_identity's real
//! credentials, short token lifetimes, identity-provider faults and server restarts.

mod bb8_pool;
mod deadpool_pool;

use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots};
use postgres_entra_testkit::Emulator;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A connector for the service principal of `emulator`, through azure_identity's
/// `ClientSecretCredential`, trusting the emulator's CA, with a cache of its own.
pub fn connector(emulator: &Emulator) -> EntraConnector {
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    EntraConnector::builder(AzureTokenSource::new(credential))
        .role_name(sp.role_name)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .private_cache()
        .build()
        .unwrap()
}

/// Outcome of a load run.
#[derive(Debug, Default)]
pub struct Load {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Runs `checkout` from `tasks` concurrent tasks until `duration` has passed.
pub async fn hammer<F, Fut>(tasks: usize, duration: Duration, checkout: F) -> Load
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let checkout = Arc::new(checkout);
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (checkout, ok, failed, first_error) = (
                checkout.clone(),
                ok.clone(),
                failed.clone(),
                first_error.clone(),
            );
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    match checkout().await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            first_error.lock().unwrap().get_or_insert(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let first_error = first_error.lock().unwrap().take();
    Load {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        first_error,
    }
}

/// `error` and all its sources, as a reporter like anyhow's `{:#}` prints them.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// Token requests expected for `run` with tokens living `lifetime`: one per three quarters of a
/// lifetime (the refresh point), plus the cold start.
pub fn expected_requests(run: Duration, lifetime: Duration) -> std::ops::RangeInclusive<u64> {
    let refreshes = run.as_secs_f64() / (lifetime.as_secs_f64() * 0.75);
    (refreshes.floor() as u64).max(1)..=refreshes.ceil() as u64 + 2
}
