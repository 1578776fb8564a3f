//! Identity-provider outages longer than a token's life, for every pool: new logins resume within a
//! second of the provider answering again while the provider hears about one request a second,
//! warm pools serve every checkout through the outage, every failed checkout carries our typed
//! cause (no pool's own untyped timeout), refused logins back off, and the logs stay readable.

use postgres_entra::CacheOptions;
use postgres_entra_testkit::{Endpoint, Fault};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pools::{PoolSpec, PoolUnderTest};
use crate::{Suite, captured_len, captured_text, connector, connector_with, hammer};

for_pools!([deadpool, bb8, sqlx, diesel_deadpool, diesel_bb8] {
    new_logins_resume_within_a_second_of_the_provider_answering_after_one_and_three_token_lives,
    a_warm_pool_serves_every_checkout_through_an_outage_of_three_token_lives,
    a_warm_pool_serves_every_checkout_through_a_stall_of_three_token_lives,
    during_a_stalled_provider_every_failed_checkout_carries_our_typed_cause,
} only [deadpool, bb8, diesel_deadpool, diesel_bb8] {
    // sqlx opens its connections itself: a refused login cannot be held back.
    refused_logins_back_off_after_a_revocation,
});

const ROLE: &str = "orders-api";

/// Ends every session of the service principal's role server-side, so that the pool must log in
/// again.
async fn kill_sessions(emulator: &Suite) {
    emulator.terminate_sessions_of(ROLE).await.unwrap();
}

async fn new_logins_resume_within_a_second_of_the_provider_answering_after_one_and_three_token_lives<
    P: PoolUnderTest,
>() {
    const LIFETIME: Duration = Duration::from_secs(2);
    // bb8's and sqlx's default timeout, not a short one: bb8 backs off between failed connects up
    // to half its connection timeout, which a short timeout would hide.
    const TIMEOUT: Duration = Duration::from_secs(30);
    let emulator = Arc::new(Suite::start(LIFETIME).await);
    // As the README builds credentials: azure_core's retries off (the emulator's credentials are
    // built so), the cache's defaults.
    let spec = PoolSpec::new(&emulator, connector(&emulator))
        .size(2)
        .timeout(TIMEOUT);
    let pool: P = P::build(spec).await.unwrap();
    pool.warm(1).await;

    for lives in [1, 3] {
        let outage = LIFETIME * lives;
        let requests_before = emulator.requests(Endpoint::Token);
        emulator.set_fault(Endpoint::Token, Fault::ServerError);
        // Past the usable life, the sessions gone: every checkout needs a new login, which needs
        // a token, which the provider will not give. Two tasks keep checking out through the
        // outage and a few seconds past it; each checkout's start and end are kept. A task ends
        // the sessions only while no checkout is under way (the lock), so that none is killed in
        // use: what fails, fails for want of a token.
        let until = Instant::now() + outage + Duration::from_secs(3);
        let under_way = Arc::new(tokio::sync::RwLock::new(()));
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let (pool, emulator, under_way) =
                    (pool.clone(), emulator.clone(), under_way.clone());
                tokio::spawn(async move {
                    let mut checkouts = Vec::new();
                    while Instant::now() < until {
                        {
                            let _alone = under_way.write().await;
                            kill_sessions(&emulator).await;
                        }
                        let checkout = under_way.read().await;
                        let started = Instant::now();
                        let outcome = pool.checkout_as(ROLE).await;
                        checkouts.push((started, Instant::now(), outcome));
                        drop(checkout);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    checkouts
                })
            })
            .collect();
        tokio::time::sleep(outage).await;
        let requests = emulator.requests(Endpoint::Token) - requests_before;
        emulator.clear_fault(Endpoint::Token);
        let answered = Instant::now();
        let mut checkouts = Vec::new();
        for task in tasks {
            checkouts.extend(task.await.unwrap());
        }

        let recovered = checkouts
            .iter()
            .filter(|(_, ended, outcome)| outcome.is_ok() && *ended > answered)
            .map(|(_, ended, _)| *ended - answered)
            .min()
            .expect("new logins resume");
        let longest = checkouts
            .iter()
            .map(|(started, ended, _)| *ended - *started)
            .max()
            .unwrap();
        let failed: Vec<&String> = checkouts
            .iter()
            .filter_map(|(_, _, outcome)| outcome.as_ref().err())
            .collect();
        let rate = requests as f64 / outage.as_secs_f64();
        figure!(
            "outage of {lives} token lives (2 s tokens): {requests} requests to the provider ({rate:.2} a second); the first checkout {} after it answered again; {} checkouts, {} failed, the longest {}",
            crate::ms(recovered),
            checkouts.len(),
            failed.len(),
            crate::secs(longest)
        );
        assert!(failed.is_empty(), "checkouts failed: {failed:#?}");
        assert!(
            recovered <= Duration::from_secs(1),
            "recovered {recovered:?} after the provider answered"
        );
        assert!(
            longest <= TIMEOUT + Duration::from_secs(1),
            "a checkout waited {longest:?}, past the pool's timeout"
        );
        // One request per retry interval (800 ms), plus the background refresh and the request
        // that began the outage.
        let allowed = outage.as_secs_f64() / 0.8 + 2.0;
        assert!(
            requests as f64 <= allowed,
            "{requests} requests ({rate:.2} a second) during an outage of {outage:?}"
        );
    }
}

/// How the identity provider fails in a warm-pool outage.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// It answers every request with a server error.
    Errors,
    /// It answers none (each request runs into the cache's fetch timeout, 10 s).
    Stall,
}

async fn a_warm_pool_serves_every_checkout_through_an_outage_of_three_token_lives<
    P: PoolUnderTest,
>() {
    warm_pool_through::<P>(Outage::Errors).await;
}

async fn a_warm_pool_serves_every_checkout_through_a_stall_of_three_token_lives<
    P: PoolUnderTest,
>() {
    warm_pool_through::<P>(Outage::Stall).await;
}

async fn warm_pool_through<P: PoolUnderTest>(outage: Outage) {
    const LIFETIME: Duration = Duration::from_secs(2);
    const SIZE: usize = 4;
    let emulator = Suite::start(LIFETIME).await;
    // Default options: sessions bounded by their token.
    let spec = PoolSpec::new(&emulator, connector(&emulator)).size(SIZE);
    let pool: P = P::build(spec).await.unwrap();
    // The first connection fetches the one token of the whole run; the provider fails from then
    // on, until the sessions are counted below. Every session logs in with that token, so the
    // cache holds nothing newer than they do (an outage begun after the warm-up could begin after
    // a refresh on a slow machine, and an outage timed to end with the churn ended, on a busy
    // one, before the count: either way the pool rightly replaced a session).
    let mut held = vec![pool.hold().await.unwrap()];
    match outage {
        Outage::Errors => emulator.set_fault(Endpoint::Token, Fault::ServerError),
        Outage::Stall => emulator.set_latency(Endpoint::Token, Duration::from_secs(600)),
    }
    while held.len() < SIZE {
        held.push(pool.hold().await.unwrap());
    }
    drop(held);
    let before = emulator.sessions_of(ROLE).await.unwrap();
    assert_eq!(before.len(), SIZE);
    assert_eq!(emulator.tokens_issued(Endpoint::Token), 1);

    // Three lives of outage: the token the sessions logged in with runs out.
    let load = crate::churn(&pool, SIZE, 3 * LIFETIME, ROLE).await;

    assert_eq!(load.failed, 0, "first failure: {:?}", load.first_error);
    assert!(load.ok > 100, "{} checkouts", load.ok);
    let during = emulator.sessions_of(ROLE).await.unwrap();
    assert_eq!(
        during, before,
        "the sessions were kept past their token's expiry: nothing could replace them"
    );
    emulator.heal();
    // The provider answers again: the sessions are retired and replaced (after a stall, once the
    // request in flight has run into the fetch timeout).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        pool.checkout_as(ROLE).await.unwrap();
        let now = emulator.sessions_of(ROLE).await.unwrap();
        if before.iter().all(|pid| !now.contains(pid)) {
            break;
        }
        assert!(Instant::now() < deadline, "old sessions remain: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    figure!(
        "{} checkouts through an outage ({outage:?}) of three token lives (2 s tokens), none failed",
        load.ok
    );
}

async fn during_a_stalled_provider_every_failed_checkout_carries_our_typed_cause<
    P: PoolUnderTest,
>() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let emulator = Suite::start(LIFETIME).await;
    // The pool's timeout as in a typical configuration (10 s), the cache's defaults (its fetch
    // timeout is 10 s too).
    let spec = PoolSpec::new(&emulator, connector(&emulator)).size(2);
    let pool: P = P::build(spec).await.unwrap();
    pool.checkout_as(ROLE).await.unwrap();
    // The provider stops answering; the token runs out; the sessions end.
    emulator.set_latency(Endpoint::Token, Duration::from_secs(60));
    tokio::time::sleep(LIFETIME).await;
    kill_sessions(&emulator).await;

    let started = Instant::now();
    let failure = pool.query("select 1").await.unwrap_err();
    let took = started.elapsed();

    let reason = failure
        .reason
        .unwrap_or_else(|| panic!("an untyped failure: {}", failure.text));
    assert_eq!(reason.variant, "Token", "{reason:?}");
    if P::SEES_POOL_LIMIT {
        assert!(
            !failure.text.contains("Timeout occurred while creating"),
            "deadpool's own timeout won: {}",
            failure.text
        );
    }
    figure!(
        "failed after {} with our {} cause",
        crate::secs(took),
        reason.variant
    );
}

async fn refused_logins_back_off_after_a_revocation<P: PoolUnderTest>() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let emulator = Suite::start(LIFETIME).await;
    let (sp, readers, connector) = crate::member_of_group(&emulator, "db-readers").await;
    let connector = connector.build().unwrap();
    let spec = PoolSpec::new(&emulator, connector)
        .size(4)
        .timeout(Duration::from_millis(500))
        .options(|options| options.reap_interval(Duration::from_millis(200)));
    let pool: P = P::build(spec).await.unwrap();
    pool.warm(1).await;

    emulator.remove_group_member(&readers, &sp).unwrap();
    let revoked = Instant::now();
    // Four tasks keep asking for connections for 10 s.
    let _ = hammer(4, Duration::from_secs(10), {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move { pool.query("select 1").await.map(drop).map_err(|e| e.text) }
        }
    })
    .await;

    let refused: Vec<Instant> = emulator
        .logins()
        .into_iter()
        .filter(|l| l.role == "db-readers" && l.at > revoked && l.outcome.is_err())
        .map(|l| l.at)
        .collect();
    let first = *refused.first().expect("the revoked principal was refused");
    let per_second: Vec<usize> = (0..8)
        .map(|s| {
            let from = first + Duration::from_secs(s) + Duration::from_millis(500);
            refused
                .iter()
                .filter(|at| **at >= from && **at < from + Duration::from_secs(1))
                .count()
        })
        .collect();
    figure!(
        "refused logins after the revocation: {} in all, per second after the first: {per_second:?}",
        refused.len()
    );
    assert!(
        per_second.iter().all(|n| *n <= 1),
        "at most one refused login a second: {per_second:?}"
    );
    let (early, late): (usize, usize) =
        (per_second[..4].iter().sum(), per_second[4..].iter().sum());
    assert!(late <= early.max(1), "falling: {per_second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_outage_under_churn_logs_tens_of_lines_per_pool_and_recovery_once() {
    const LIFETIME: Duration = Duration::from_secs(4);
    const OUTAGE: Duration = Duration::from_secs(60);
    let emulator = Arc::new(Suite::start(LIFETIME).await);
    // Each pool with a connector (and so a token cache) of its own, named in its log lines.
    let spec = |name: &str| {
        PoolSpec::new(
            &emulator,
            connector_with(&emulator, CacheOptions::default()),
        )
        .size(4)
        .pool_name(name)
        .timeout(Duration::from_secs(1))
    };
    let deadpool = crate::pools::Deadpool::build(spec("deadpool"))
        .await
        .unwrap();
    let bb8 = crate::pools::Bb8::build(spec("bb8")).await.unwrap();
    let sqlx = crate::pools::Sqlx::build(spec("sqlx")).await.unwrap();
    deadpool.warm(1).await;
    bb8.warm(1).await;
    sqlx.warm(1).await;

    let log_start = captured_len();
    emulator.set_fault_for(Endpoint::Token, Fault::ServerError, OUTAGE);
    // Sessions end every 2 s, so every pool keeps trying to log in through the outage.
    let killer = {
        let emulator = emulator.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < OUTAGE + Duration::from_secs(2) {
                kill_sessions(&emulator).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let run = OUTAGE + Duration::from_secs(3);
    let (d, b, s) = tokio::join!(
        crate::churn(&deadpool, 4, run, ROLE),
        crate::churn(&bb8, 4, run, ROLE),
        crate::churn(&sqlx, 4, run, ROLE),
    );
    killer.await.unwrap();
    // After the outage, every pool works again.
    for recovered in [
        deadpool.checkout_as(ROLE).await,
        bb8.checkout_as(ROLE).await,
        sqlx.checkout_as(ROLE).await,
    ] {
        recovered.unwrap();
    }

    let text = captured_text();
    let window = &text[log_start..];
    let ours: Vec<&str> = window
        .lines()
        .filter(|l| (l.contains(" WARN ") || l.contains(" INFO ")) && l.contains("postgres_entra"))
        .collect();
    let about = |what: &str| ours.iter().filter(|l| l.contains(what)).count();
    let failed = d.failed + b.failed + s.failed;
    figure!(
        "{failed} checkouts failed during a 60 s outage; {} log lines at INFO and WARN (of {} bytes logged at all levels)",
        ours.len(),
        window.len()
    );
    for line in &ours {
        println!("  {}", line.chars().take(220).collect::<String>());
    }
    assert!(failed > 100, "the pools kept failing to log in: {failed}");
    for pool in ["deadpool", "bb8", "sqlx"] {
        let lines = about(&format!("pool {pool}"));
        assert!((1..=8).contains(&lines), "{lines} lines about pool {pool}");
        let recovered = ours
            .iter()
            .filter(|l| l.contains(&format!("pool {pool}")) && l.contains("working again after"))
            .count();
        assert_eq!(recovered, 1, "recovery of pool {pool} logged once");
    }
    assert!(ours.len() <= 40, "{} lines", ours.len());
}
