//! When a new token is had, through azure_identity's real credentials: at half the token's life,
//! whatever cache stands between the library and the identity provider. A credential's own cache
//! is bypassed by building a new credential per request (the constructors' way, and
//! `AzureTokenSource::fresh`); a cache outside the process (a managed-identity endpoint's) is
//! asked again at half of what remains until it renews.

use postgres_entra::{AzureTokenSource, EntraConnector, TlsRoots, TokenCache};
use postgres_entra_testkit::{Endpoint, Fault};
use std::time::{Duration, Instant, SystemTime};

use crate::pools::{Deadpool, PoolSpec, PoolUnderTest};
use crate::{Suite, TestConnector};

/// A connector whose tokens come from `source`, trusting the emulator's CA.
fn connector_over(emulator: &Suite, source: AzureTokenSource, role: &str) -> TestConnector {
    let cache = TokenCache::builder(source).build().unwrap();
    TestConnector::over(
        EntraConnector::builder_with_cache(cache.clone())
            .role_name(role)
            .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned())),
        cache,
    )
}

/// Checkouts of `pool` as `role`, one every `every`, until `until`: (succeeded, failed, the first
/// failure).
async fn paced<P: PoolUnderTest>(
    pool: &P,
    role: &'static str,
    every: Duration,
    until: Instant,
) -> (u64, u64, Option<String>) {
    let (mut ok, mut failed, mut first) = (0, 0, None);
    while Instant::now() < until {
        match pool.checkout_as(role).await {
            Ok(()) => ok += 1,
            Err(error) => {
                failed += 1;
                first.get_or_insert(error);
            }
        }
        tokio::time::sleep(every).await;
    }
    (ok, failed, first)
}

/// The managed-identity endpoint answers from a cache of its own until 5 s before a token
/// expires (20 s tokens): the refresh at half the life (10 s) gets the token already held, is
/// counted apart and not as a success, and the cache asks again at half of what remains until the
/// endpoint renews; meanwhile no checkout fails or waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_identity_endpoint_answering_from_its_cache_is_asked_again_at_half_of_what_remains()
 {
    const LIFETIME: Duration = Duration::from_secs(20);
    const RENEWS_WITHIN: Duration = Duration::from_secs(5);
    let emulator = Suite::start(LIFETIME).await;
    emulator.cache_managed_identity_tokens(Some(RENEWS_WITHIN));
    let role = emulator.managed_identity().role_name;
    let role: &'static str = Box::leak(role.into_boxed_str());
    let source = AzureTokenSource::fresh(emulator.managed_identity_credentials()).unwrap();
    let connector = connector_over(&emulator, source, role);
    let cache = connector.cache().clone();
    let pool =
        Deadpool::build(PoolSpec::new(&emulator, connector).max_age(Duration::from_millis(500)))
            .await
            .unwrap();

    pool.checkout_as(role).await.unwrap();
    let first = cache.get().await.unwrap();
    // Past the first token's expiry: the endpoint has renewed once.
    let end = Instant::now()
        + first
            .expires_on()
            .duration_since(SystemTime::now())
            .unwrap()
        + Duration::from_secs(1);
    let watcher = {
        let cache = cache.clone();
        let first = first.clone();
        async move {
            let mut renewed_with = None;
            while Instant::now() < end {
                let now = cache.get().await.unwrap();
                if now.secret() != first.secret() && renewed_with.is_none() {
                    renewed_with = first.expires_on().duration_since(SystemTime::now()).ok();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            renewed_with
        }
    };
    let (load, renewed_with) =
        tokio::join!(paced(&pool, role, Duration::from_millis(100), end), watcher);

    let (ok, failed, first_failure) = load;
    assert_eq!(failed, 0, "first failure: {first_failure:?}");
    assert!(ok > 50, "{ok} checkouts");
    let stats = cache.stats();
    let renewed_with = renewed_with.expect("the endpoint renewed the token");
    figure!(
        "renewed {} before expiry; {} answers of the token already held; {stats:?}",
        crate::secs(renewed_with),
        stats.unchanged
    );
    // Asked at 10 s (10 s left), then at half of what remained of the 18 s it is handed out for:
    // ~14 s (6 s left), ~16 s (4 s left, renewed). The endpoint counts whole seconds, so one
    // more answer from its cache may come.
    assert!((2..=3).contains(&stats.unchanged), "{stats:?}");
    assert_eq!(stats.successes, 2, "{stats:?}");
    assert_eq!(stats.waits, 1, "only the first caller waited: {stats:?}");
    assert!(
        renewed_with >= Duration::from_secs(2) && renewed_with <= RENEWS_WITHIN,
        "{renewed_with:?}"
    );
    assert_eq!(
        emulator.requests(Endpoint::ManagedIdentity),
        emulator.tokens_issued(Endpoint::ManagedIdentity) + stats.unchanged,
        "every request was answered, new or from the endpoint's cache"
    );
}

/// Tokens of 11 minutes, long enough for azure_identity's own cache (a token is kept until 5
/// minutes before it expires) to answer the refresh at half the life (5.5 minutes before expiry):
/// an identity-provider outage from 60% of the life until past the first token's expiry fails no
/// checkout through credentials built anew per request, not even when the pool must open new
/// connections after the first token's expiry. The same run through one credential kept for
/// every request (`AzureTokenSource::new`, and the constructors before this release) cannot open
/// them: its refresh got the cached token, and its real request came inside the outage.
/// Runs first (`.config/nextest.toml` gives it the highest priority), beside the rest of the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_minute_tokens_an_outage_from_sixty_percent_of_the_life_past_expiry_fails_no_checkout()
 {
    const LIFETIME: Duration = Duration::from_secs(11 * 60);
    const ROLE: &str = "orders-api";
    const SIZE: usize = 4;
    let emulator = Suite::start(LIFETIME).await;
    let sp = emulator.service_principal();
    let fresh = connector_over(
        &emulator,
        AzureTokenSource::fresh(emulator.client_secret_credentials(&sp).unwrap()).unwrap(),
        ROLE,
    );
    let kept = connector_over(
        &emulator,
        AzureTokenSource::new(emulator.client_secret_credential(&sp).unwrap()),
        ROLE,
    );
    let spec = |connector: &TestConnector| {
        PoolSpec::new(&emulator, connector.clone())
            .size(SIZE)
            .timeout(Duration::from_secs(5))
    };
    let fresh_pool = Deadpool::build(spec(&fresh)).await.unwrap();
    let kept_pool = Deadpool::build(spec(&kept)).await.unwrap();
    fresh_pool.checkout_as(ROLE).await.unwrap();
    kept_pool.checkout_as(ROLE).await.unwrap();
    let expires_on = fresh
        .cache()
        .get()
        .await
        .unwrap()
        .expires_on()
        .min(kept.cache().get().await.unwrap().expires_on());
    let expiry = Instant::now() + expires_on.duration_since(SystemTime::now()).unwrap();
    let outage_from = expiry - LIFETIME * 4 / 10;
    let end = expiry + Duration::from_secs(10);
    let outage = async {
        tokio::time::sleep_until(outage_from.into()).await;
        emulator.set_fault_for(Endpoint::Token, Fault::ServerError, end - outage_from);
        println!(
            "outage of the token endpoint from {:?} before the first tokens' expiry until {:?} after",
            expiry.saturating_duration_since(Instant::now()),
            end - expiry
        );
    };
    // Past the first tokens' expiry, inside the outage: every connection of each pool at once,
    // so that it must open new ones (sessions already open are kept through an outage).
    let burst = |pool: Deadpool| async move {
        tokio::time::sleep_until((expiry + Duration::from_secs(2)).into()).await;
        let (mut held, mut failed) = (Vec::new(), 0);
        for _ in 0..SIZE {
            match pool.hold().await {
                Ok(connection) => held.push(connection),
                Err(_) => failed += 1,
            }
        }
        failed
    };

    let (fresh_load, kept_load, fresh_burst, kept_burst, ()) = tokio::join!(
        paced(&fresh_pool, ROLE, Duration::from_millis(250), end),
        paced(&kept_pool, ROLE, Duration::from_millis(250), end),
        burst(fresh_pool.clone()),
        burst(kept_pool.clone()),
        outage,
    );

    let (fresh_stats, kept_stats) = (fresh.cache().stats(), kept.cache().stats());
    figure!(
        "new credential per request: {} checkouts, {} failed, {fresh_burst} of {SIZE} new connections failed after the first token's expiry; {fresh_stats:?}",
        fresh_load.0,
        fresh_load.1
    );
    figure!(
        "one credential kept: {} checkouts, {} failed, {kept_burst} of {SIZE} new connections failed after the first token's expiry; {kept_stats:?}",
        kept_load.0,
        kept_load.1
    );
    assert_eq!(fresh_load.1, 0, "first failure: {:?}", fresh_load.2);
    assert_eq!(fresh_burst, 0);
    assert!(fresh_load.0 > 500, "{fresh_load:?}");
    assert_eq!(fresh_stats.unchanged, 0, "{fresh_stats:?}");
    // The control: the same outage leaves the pool whose credential answered from its cache
    // without a token to open connections with.
    assert!(kept_stats.unchanged >= 1, "{kept_stats:?}");
    assert!(kept_burst > 0, "the outage bit the kept credential");
}
