//! Many connects across several short token lifetimes: all succeed, and the identity provider sees
//! about one request per lifetime, not one per connect.

use postgres_entra::AzureTokenSource;
use postgres_entra_testkit::{Emulator, Endpoint};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{connector, current_user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_across_several_token_lifetimes_need_about_two_requests_per_lifetime() {
    const LIFETIME: Duration = Duration::from_secs(3);
    const RUN: Duration = Duration::from_secs(10);
    let emulator = Emulator::builder()
        .token_lifetime(LIFETIME)
        .start_async()
        .await
        .unwrap();
    let sp = emulator.service_principal();
    let credential = emulator.client_secret_credential(&sp).unwrap();
    let connector = connector(
        &emulator,
        AzureTokenSource::new(credential),
        Some(&sp.role_name),
    );
    let config = emulator.server_config();
    let connects = Arc::new(AtomicU64::new(0));

    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (connector, config, connects) =
                (connector.clone(), config.clone(), connects.clone());
            tokio::spawn(async move {
                while started.elapsed() < RUN {
                    let user = current_user(&connector, &config)
                        .await
                        .expect("every connect succeeds");
                    assert_eq!(user, "orders-api");
                    connects.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    let connects = connects.load(Ordering::Relaxed);
    let requests = emulator.requests(Endpoint::Token);
    let lifetimes = RUN.as_secs_f64() / LIFETIME.as_secs_f64();
    println!(
        "{connects} connects over {lifetimes:.1} token lifetimes took {requests} token requests"
    );
    assert!(connects > 50, "{connects} connects");
    // Refresh at half the lifetime: 7-8 requests in 10 s of 3 s tokens.
    let refreshes = 2.0 * lifetimes;
    assert!(
        (refreshes.floor() as u64..=refreshes.ceil() as u64 + 2).contains(&requests),
        "{requests} requests for {lifetimes:.1} lifetimes"
    );
    let logins = emulator.logins();
    assert_eq!(
        logins.len() as u64,
        connects,
        "one login per connect, no retries"
    );
    assert!(
        logins.iter().all(|l| l.outcome.is_ok()),
        "no expired token was ever presented"
    );
    let stats = connector.cache().stats();
    assert_eq!(stats.failures, 0);
    assert!(stats.waits <= 4, "only the cold start waited: {stats:?}");
}
