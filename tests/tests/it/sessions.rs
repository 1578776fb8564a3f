//! Sessions bounded by their login token, for every adapter: revoking principals mid-churn ends
//! their sessions within a token lifetime plus the retirement interval while other principals'
//! checkouts never fail, retirements are spread out, and with the bound off a session outlives its
//! token as before.

use postgres_entra::{AzureTokenSource, EntraConnector, SessionOptions, TlsRoots};
use postgres_entra_testkit::Emulator;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pools::{Failure, PoolSpec, PoolUnderTest};
use crate::{Suite, metered_connector};

for_pools!([deadpool, bb8, sqlx, diesel_deadpool, diesel_bb8] {
    revoking_principals_mid_churn_ends_their_sessions_and_spares_the_others,
    with_the_bound_off_a_session_outlives_its_token_and_with_it_on_it_does_not,
});

/// deadpool's check of idle connections; bb8 retires them at checkout and return.
const REAP: Duration = Duration::from_millis(200);

/// What a churning pool saw.
#[derive(Default)]
struct Seen {
    ok: u64,
    /// Failed checkouts: when, and our typed error's variant if the adapter gave one.
    failures: Vec<(Instant, Option<&'static str>, String)>,
}

/// `tasks` tasks checking connections out of `pool` (and running `select 1`) until `until`.
fn churn<P: PoolUnderTest>(
    pool: &P,
    tasks: usize,
    until: Instant,
) -> (Arc<Mutex<Seen>>, Vec<tokio::task::JoinHandle<()>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let handles = (0..tasks)
        .map(|_| {
            let (pool, seen) = (pool.clone(), seen.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    match pool.query("select 1").await {
                        Ok(_) => seen.lock().unwrap().ok += 1,
                        Err(Failure { text, reason }) => {
                            seen.lock().unwrap().failures.push((
                                Instant::now(),
                                reason.map(|r| r.variant),
                                text,
                            ));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect();
    (seen, handles)
}

fn emulator_connector(
    emulator: &Emulator,
    credential: Arc<dyn azure_core::credentials::TokenCredential>,
) -> postgres_entra::EntraConnectorBuilder {
    EntraConnector::builder(AzureTokenSource::new(credential))
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
}

/// The most of `times` in any window of `window`.
fn most_in_any(times: &[Instant], window: Duration) -> usize {
    let mut times = times.to_vec();
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

async fn revoking_principals_mid_churn_ends_their_sessions_and_spares_the_others<
    P: PoolUnderTest,
>() {
    const LIFETIME: Duration = Duration::from_secs(4);
    const REVOKE_AT: Duration = Duration::from_millis(1500);
    const RUN: Duration = Duration::from_secs(10);
    let emulator = Suite::start(LIFETIME).await;
    // Revoked by leaving a group: the service principal, logging in as the group.
    let (sp, readers, group_connector) = crate::member_of_group(&emulator, "db-readers").await;
    // Revoked by disabling it: the workload identity.
    let wi = emulator.workload_identity();
    // Left alone: the managed identity.
    let mi = emulator.managed_identity();
    let quick = SessionOptions::new()
        .retire_jitter(Duration::from_secs(1))
        .reap_interval(REAP);
    let spec = |connector: EntraConnector, size: usize, options: SessionOptions| {
        PoolSpec::new(&emulator, connector)
            .size(size)
            .timeout(Duration::from_secs(1))
            .options(|_| options)
    };
    const CONTROL_SIZE: usize = 8;
    let control = P::build(
        spec(
            emulator_connector(&emulator, emulator.managed_identity_credential().unwrap())
                .build()
                .unwrap(),
            CONTROL_SIZE,
            SessionOptions::new()
                .retire_jitter(Duration::from_secs(3))
                .reap_interval(REAP),
        )
        // What is asked of this pool is that no checkout fails, not that each is quick: on a
        // busy machine a checkout that waits for a reconnect can take over a second.
        .timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    control.warm(CONTROL_SIZE).await;
    // The revoked principals' pools after the control pool is warm, so that their tokens (sqlx's
    // pool fetches one when it is built) are young at the revocation however long that took.
    let group_pool =
        P::build(spec(group_connector.build().unwrap(), 4, quick.clone()).user("db-readers"))
            .await
            .unwrap();
    let wi_pool = P::build(spec(
        emulator_connector(
            &emulator,
            emulator.workload_identity_credential(&wi).unwrap(),
        )
        .role_name(&wi.role_name)
        .build()
        .unwrap(),
        4,
        quick.clone(),
    ))
    .await
    .unwrap();
    group_pool.warm(4).await;
    wi_pool.warm(4).await;

    let started = Instant::now();
    let until = started + RUN;
    let (group_seen, mut tasks) = churn(&group_pool, 4, until);
    let (wi_seen, more) = churn(&wi_pool, 4, until);
    tasks.extend(more);
    let (control_seen, more) = churn(&control, CONTROL_SIZE, until);
    tasks.extend(more);

    tokio::time::sleep(REVOKE_AT).await;
    assert!(!emulator.sessions_of("db-readers").await.unwrap().is_empty());
    assert!(
        !emulator
            .sessions_of(&wi.role_name)
            .await
            .unwrap()
            .is_empty()
    );
    emulator.remove_group_member(&readers, &sp).unwrap();
    emulator.disable(&wi).unwrap();
    let revoked = Instant::now();
    // Every token in use was issued before the revocation: all expire within a lifetime; then
    // the jitter (a tenth of the token's life at most), the idle check and a checkout cycle.
    let deadline = revoked + LIFETIME + LIFETIME / 10 + REAP + Duration::from_secs(1);
    let gone_after = loop {
        let left = emulator.sessions_of("db-readers").await.unwrap().len()
            + emulator.sessions_of(&wi.role_name).await.unwrap().len();
        if left == 0 {
            break revoked.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{left} sessions of revoked principals remain {:?} after the revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for task in tasks {
        task.await.unwrap();
    }

    let control_seen = std::mem::take(&mut *control_seen.lock().unwrap());
    let control_logins: Vec<Instant> = emulator
        .logins()
        .into_iter()
        .filter(|l| l.role == mi.role_name && l.outcome.is_ok())
        .map(|l| l.at)
        .collect();
    let reconnects: Vec<Instant> = control_logins
        .iter()
        .copied()
        .filter(|at| *at > started + Duration::from_secs(1))
        .collect();
    // The jitter is a tenth of the token's life at most (0.4 s here): spread within it.
    let most = most_in_any(&reconnects, Duration::from_millis(50));
    figure!(
        "revoked sessions gone {} after the revocation (4 s tokens); control: {} checkouts, {} failed, {} reconnects, at most {most} in any 50 ms (pool of {CONTROL_SIZE})",
        crate::secs(gone_after),
        control_seen.ok,
        control_seen.failures.len(),
        reconnects.len()
    );
    assert!(
        control_seen.failures.is_empty(),
        "the other principal's checkouts never fail: {:?}",
        control_seen.failures.first()
    );
    assert!(control_seen.ok > 100);
    assert!(
        reconnects.len() >= CONTROL_SIZE,
        "the control pool's sessions were retired too: {} reconnects",
        reconnects.len()
    );
    assert!(
        most < CONTROL_SIZE,
        "retirements are spread: {most} reconnects in 50 ms"
    );
    assert!(
        !emulator
            .sessions_of(&mi.role_name)
            .await
            .unwrap()
            .is_empty()
    );

    // The revoked principals' new logins fail with our typed errors: a login refused to the
    // former group member, no token for the disabled identity.
    for (seen, expected) in [(&group_seen, "LoginRejected"), (&wi_seen, "Token")] {
        let seen = seen.lock().unwrap();
        let after: Vec<_> = seen
            .failures
            .iter()
            .filter(|(at, _, _)| *at > revoked)
            .collect();
        assert!(
            after
                .iter()
                .any(|(_, variant, _)| *variant == Some(expected)),
            "expected {expected} failures after the revocation, got {:?}",
            after.first()
        );
        assert!(
            after
                .iter()
                .all(|(_, variant, _)| variant.is_none_or(|v| v == expected)),
            "{:?}",
            after
                .iter()
                .find(|(_, variant, _)| variant.is_some_and(|v| v != expected))
        );
        assert!(
            seen.failures.iter().all(|(at, _, _)| *at > revoked),
            "nothing failed before the revocation: {:?}",
            seen.failures.first()
        );
    }
}

async fn with_the_bound_off_a_session_outlives_its_token_and_with_it_on_it_does_not<
    P: PoolUnderTest,
>() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let emulator = Suite::start(LIFETIME).await;
    let (reader, connector) = metered_connector(&emulator);
    let spec = |name: &str, bound: bool| {
        PoolSpec::new(&emulator, connector.clone())
            .size(1)
            .pool_name(name)
            .options(|options| {
                options
                    .token_bound(bound)
                    .retire_jitter(Duration::ZERO)
                    .reap_interval(REAP)
            })
    };
    let off = P::build(spec("off", false)).await.unwrap();
    let on = P::build(spec("on", true)).await.unwrap();
    let pid = "select pg_backend_pid()::text";
    let (first_off, first_on) = (off.query(pid).await.unwrap(), on.query(pid).await.unwrap());

    tokio::time::sleep(LIFETIME + Duration::from_secs(1)).await;
    let before = reader.collect();
    let (then_off, then_on) = (off.query(pid).await.unwrap(), on.query(pid).await.unwrap());

    assert_eq!(
        then_off, first_off,
        "with the bound off, the session lives on"
    );
    assert_ne!(then_on, first_on, "with it on, the session was replaced");
    let after = reader.collect();
    let retired = |pool| {
        after.sum(
            "postgres_entra.connection.retired",
            &[("db.client.connection.pool.name", pool)],
        )
    };
    assert_eq!(retired("on"), 1.0, "{}", after.text());
    assert_eq!(retired("off"), 0.0);
    let oldest = |pool| {
        after.value(
            "postgres_entra.connection.oldest_token_age",
            &[("db.client.connection.pool.name", pool)],
        )
    };
    let (oldest_off, oldest_on) = (oldest("off").unwrap(), oldest("on").unwrap());
    assert!(oldest_off > LIFETIME.as_secs_f64(), "{oldest_off}");
    assert!(oldest_on < LIFETIME.as_secs_f64(), "{oldest_on}");
    assert!(
        before
            .value(
                "postgres_entra.connection.oldest_token_age",
                &[("db.client.connection.pool.name", "off")],
            )
            .unwrap()
            > LIFETIME.as_secs_f64()
    );
}
