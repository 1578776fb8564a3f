//! The cache against a call-counting source on a paused Tokio clock: expiries are crossed without
//! sleeping for real.

use super::*;
use crate::clock::TokioClock;
use crate::token::TokenFuture;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::SystemTime;
use tokio::time::advance;

/// A token source backed by a closure.
struct FnSource {
    identity: String,
    fetch: Box<dyn Fn(&str) -> TokenFuture<'static> + Send + Sync>,
}

impl fmt::Debug for FnSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TokenSource for FnSource {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        (self.fetch)(scope)
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
}

fn fn_source<F, Fut>(identity: &str, fetch: F) -> FnSource
where
    F: Fn(&str) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<AccessToken, TokenError>> + Send + 'static,
{
    FnSource {
        identity: identity.to_owned(),
        fetch: Box::new(move |scope| Box::pin(fetch(scope))),
    }
}

fn failure(message: &str) -> TokenError {
    TokenError::new(TokenErrorKind::Other, message)
}

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// A token source that counts calls and can be made slow, failing, or to return stale tokens.
#[derive(Debug)]
struct Provider {
    clock: TokioClock,
    calls: AtomicU32,
    call_times: Mutex<Vec<Instant>>,
    lifetime: Mutex<Duration>,
    latency: Mutex<Duration>,
    failure: Mutex<Option<TokenError>>,
    panics: Mutex<bool>,
    /// How far the provider's clock is ahead of the tokio clock (a jump the host has seen too).
    ahead: Mutex<Duration>,
    expired: Mutex<bool>,
}

impl Provider {
    fn new(clock: TokioClock, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            clock,
            calls: AtomicU32::new(0),
            call_times: Mutex::new(Vec::new()),
            lifetime: Mutex::new(lifetime),
            latency: Mutex::new(Duration::ZERO),
            failure: Mutex::new(None),
            panics: Mutex::new(false),
            ahead: Mutex::new(Duration::ZERO),
            expired: Mutex::new(false),
        })
    }
    fn calls(&self) -> u32 {
        self.calls.load(SeqCst)
    }
    fn set_latency(&self, latency: Duration) {
        *self.latency.lock().unwrap() = latency;
    }
    fn fail_with(&self, failure: Option<TokenError>) {
        *self.failure.lock().unwrap() = failure;
    }
    fn source(self: &Arc<Self>, identity: &str) -> FnSource {
        let provider = self.clone();
        fn_source(identity, move |_scope| {
            let provider = provider.clone();
            async move {
                let n = provider.calls.fetch_add(1, SeqCst) + 1;
                provider.call_times.lock().unwrap().push(Instant::now());
                let latency = *provider.latency.lock().unwrap();
                tokio::time::sleep(latency).await;
                assert!(
                    !*provider.panics.lock().unwrap(),
                    "the token source panicked"
                );
                if let Some(failure) = provider.failure.lock().unwrap().clone() {
                    return Err(failure);
                }
                let now = provider.clock.now() + *provider.ahead.lock().unwrap();
                let expires_on = if *provider.expired.lock().unwrap() {
                    now - Duration::from_secs(1)
                } else {
                    now + *provider.lifetime.lock().unwrap()
                };
                Ok(AccessToken::new(format!("secret-token-{n}"), expires_on))
            }
        })
    }
}

fn cache(provider: &Arc<Provider>, options: CacheOptions) -> TokenCache {
    TokenCache::builder(provider.source("test-identity"))
        .options(options)
        .clock(Arc::new(provider.clock.clone()))
        .build()
        .unwrap()
}

/// A cache whose provider (hour-long tokens) fails with `error`, backing off from `min` to `max`.
fn failing(min: Duration, max: Duration, error: TokenError) -> (Arc<Provider>, TokenCache) {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let cache = cache(&provider, CacheOptions::default().backoff(min, max));
    provider.fail_with(Some(error));
    (provider, cache)
}

fn setup(lifetime: Duration) -> (Arc<Provider>, TokenCache) {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), lifetime);
    let cache = cache(&provider, CacheOptions::default());
    (provider, cache)
}

/// Lets spawned tasks woken by a time advance run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Hits on different threads share no reference count nor hit counter (the cause of a cache hit
/// up to four times slower with 64 tasks on two cores than with one task): the cache keeps a copy
/// of the token per shard, each in lines of its own, threads take the shards in turn, and every
/// hit is counted.
#[tokio::test]
async fn hits_on_different_threads_share_no_reference_count() {
    let (_provider, cache) = setup(HOUR);
    cache.get().await.unwrap();
    let entry = cache.entry(None).await.unwrap();
    for (i, a) in entry.tokens.iter().enumerate() {
        for b in &entry.tokens[i + 1..] {
            let (a, b) = (Arc::as_ptr(a) as usize, Arc::as_ptr(b) as usize);
            assert!(a.abs_diff(b) >= 128, "two copies share a line pair");
        }
    }

    let threads: Vec<_> = (0..HIT_SHARDS)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                (hit_shard(), runtime.block_on(cache.get()).unwrap())
            })
        })
        .collect();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    for (shard, token) in &got {
        assert!(
            Arc::ptr_eq(token, &entry.tokens[*shard]),
            "its own shard's copy"
        );
        assert_eq!(token.secret(), entry.secret());
    }
    assert_eq!(cache.stats().hits, 1 + HIT_SHARDS as u64);
}

#[tokio::test(start_paused = true)]
async fn sixty_four_concurrent_cold_callers_cause_one_request() {
    let (provider, cache) = setup(HOUR);
    provider.set_latency(Duration::from_millis(200));

    let callers: Vec<_> = (0..64)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get().await.map(|t| t.secret().to_owned()) })
        })
        .collect();
    let mut secrets = Vec::new();
    for caller in callers {
        secrets.push(caller.await.unwrap().unwrap());
    }

    assert_eq!(provider.calls(), 1);
    assert!(secrets.iter().all(|s| s == "secret-token-1"));
    let stats = cache.stats();
    assert_eq!((stats.requests, stats.successes, stats.waits), (1, 1, 64));
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_in_the_background_and_no_caller_waits() {
    let (provider, cache) = setup(HOUR);
    provider.set_latency(Duration::from_secs(9));
    let first = cache.entry(None).await.unwrap();
    assert_eq!(cache.stats().waits, 1);
    // At half its life.
    let refresh_in = first
        .refresh_at()
        .duration_since(provider.clock.now())
        .unwrap();
    assert_eq!(refresh_in, 30 * MINUTE);

    advance(refresh_in + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(
        provider.calls(),
        2,
        "the background refresh started on time"
    );
    // While the (slow) refresh runs, callers get the still-valid token at once.
    let before = Instant::now();
    for _ in 0..100 {
        assert_eq!(cache.get().await.unwrap().secret(), "secret-token-1");
    }
    assert_eq!(Instant::now(), before, "no caller waited");

    advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(cache.get().await.unwrap().secret(), "secret-token-2");
    let stats = cache.stats();
    assert_eq!((stats.requests, stats.waits, stats.hits), (2, 1, 101));
}

#[tokio::test(start_paused = true)]
async fn short_lived_tokens_refresh_at_half_their_life_too() {
    let (provider, cache) = setup(Duration::from_secs(4));
    let first = cache.entry(None).await.unwrap();
    let now = provider.clock.now();
    assert_eq!(
        first.refresh_at().duration_since(now).unwrap(),
        Duration::from_secs(2)
    );
    // The expiry buffer is a tenth of the lifetime for short tokens.
    assert_eq!(
        first.usable_until().duration_since(now).unwrap(),
        Duration::from_millis(3600)
    );

    // Across ten lifetimes, one request per two seconds and never a waiting caller after the first.
    for _ in 0..40 {
        advance(Duration::from_secs(1)).await;
        settle().await;
        let token = cache.entry(None).await.unwrap();
        assert!(provider.clock.now() < token.usable_until());
    }
    assert_eq!(cache.stats().waits, 1);
    assert!(
        (20..=21).contains(&provider.calls()),
        "{} requests",
        provider.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
    let (provider, cache) = failing(
        Duration::from_secs(1),
        Duration::from_secs(8),
        failure("AADSTS7000215: invalid client secret"),
    );

    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::Other);
    assert!(error.to_string().contains("AADSTS7000215"), "{error}");
    // Callers during the backoff get the error at once, without new requests.
    for _ in 0..50 {
        let error = cache.get().await.unwrap_err();
        assert!(error.retry_in().unwrap() <= Duration::from_secs(1));
    }
    assert_eq!(provider.calls(), 1);

    // Background retries continue on their own, further and further apart.
    for _ in 0..600 {
        advance(Duration::from_millis(100)).await;
        settle().await;
    }
    let times = provider.call_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let expected = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, 8.0), (4.0, 8.0)];
    for (gap, (low, high)) in gaps.iter().zip(expected) {
        let secs = gap.as_secs_f64();
        // Time moves in 100 ms steps, which adds up to that much slack.
        assert!(secs >= low && secs <= high + 0.1, "gaps {gaps:?}");
    }
    assert!(gaps.len() >= 8, "retries kept going: {gaps:?}");
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(8100)),
        "capped: {gaps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_from_the_provider_is_honoured() {
    let (provider, cache) = setup(HOUR);
    provider.fail_with(Some(
        failure("throttled").with_retry_after(Duration::from_secs(30)),
    ));
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.provider_retry_after(), Some(Duration::from_secs(30)));
    assert!(error.to_string().contains("throttled"));

    advance(Duration::from_secs(29)).await;
    settle().await;
    assert_eq!(provider.calls(), 1, "no request before Retry-After");
    advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(provider.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_valid_token_is_served_through_an_outage_and_an_expired_one_never() {
    let (provider, cache) = setup(HOUR);
    let first = cache.entry(None).await.unwrap();
    provider.fail_with(Some(TokenError::new(
        TokenErrorKind::Unreachable,
        "connection refused",
    )));

    // From the refresh point to just before the end of the usable life: failing refreshes, and
    // every caller still served the valid token without waiting.
    advance(45 * MINUTE).await;
    let mut served = 0;
    while provider.clock.now() + Duration::from_secs(2) < first.usable_until() {
        advance(Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(cache.get().await.unwrap().secret(), "secret-token-1");
        served += 1;
    }
    assert!(served > 800);
    assert!(provider.calls() > 10, "kept retrying: {}", provider.calls());
    assert!(cache.stats().failures > 10);
    assert_eq!(cache.stats().waits, 1);
    assert!(!cache.provider_unavailable(), "a token is still served");

    // Past its usable life the token is never handed out, even though nothing else is available.
    advance(Duration::from_secs(3)).await;
    settle().await;
    let error = cache.get().await.unwrap_err();
    assert!(error.to_string().contains("connection refused"), "{error}");
    assert!(cache.provider_unavailable());
    assert_eq!(cache.failure().unwrap().kind(), TokenErrorKind::Unreachable);

    // The provider recovers: the next caller, within a second, gets a token again.
    provider.fail_with(None);
    advance(Duration::from_millis(801)).await;
    let token = cache.entry(None).await.unwrap();
    assert!(token.secret() != "secret-token-1");
    assert!(provider.clock.now() < token.usable_until());
    assert!(!cache.provider_unavailable());
    assert!(cache.failure().is_none());
}

#[tokio::test(start_paused = true)]
async fn without_a_token_callers_make_the_cache_ask_once_a_second_and_recovery_is_prompt() {
    let (provider, cache) = failing(
        Duration::from_secs(1),
        Duration::from_secs(60),
        TokenError::new(TokenErrorKind::ServerError, "AADSTS50001").with_http_status(500),
    );

    // 60 s of 8 callers, each asking again 10 ms after its last answer: about one request a
    // second, never a storm, never a long exponential wait; a caller waits at most for the next
    // attempt.
    let started = Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let (mut failures, mut longest) = (0, Duration::ZERO);
                while started.elapsed() < Duration::from_secs(60) {
                    let asked = Instant::now();
                    assert!(cache.get().await.is_err());
                    failures += 1;
                    longest = longest.max(asked.elapsed());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (failures, longest)
            })
        })
        .collect();
    let mut longest = Duration::ZERO;
    for caller in callers {
        let (failures, waited) = caller.await.unwrap();
        assert!(failures >= 60, "{failures} answers in 60 s");
        longest = longest.max(waited);
    }
    // One request per retry interval (0.8 s) at most, background retries included: 75 in 60 s,
    // and the first.
    let calls = provider.calls();
    assert!((72..=76).contains(&calls), "{calls} requests in 60 s");
    assert!(
        longest <= Duration::from_millis(800),
        "a caller waited {longest:?}"
    );

    // The provider answers again: a caller that asks at once is served by the next attempt,
    // within a second.
    provider.fail_with(None);
    let recovered_at = Instant::now();
    cache.get().await.unwrap();
    assert!(
        recovered_at.elapsed() <= Duration::from_millis(800),
        "{:?}",
        recovered_at.elapsed()
    );

    // A refusal is not worth waiting for: callers get it at once.
    let (provider, cache) = setup(HOUR);
    provider.fail_with(Some(TokenError::new(
        TokenErrorKind::CredentialRejected,
        "AADSTS700016: application not found",
    )));
    let _ = cache.get().await;
    let asked = Instant::now();
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::CredentialRejected);
    assert_eq!(asked.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_source_is_a_failure_like_any_other_not_a_request_storm() {
    let (provider, cache) = setup(HOUR);
    *provider.panics.lock().unwrap() = true;

    // 8 tasks calling every 10 ms for 3 s.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let mut kinds = Vec::new();
                for _ in 0..300 {
                    if let Err(error) = cache.get().await {
                        kinds.push((error.kind(), error.to_string()));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                kinds
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }

    let calls = provider.calls();
    assert!(
        (2..=5).contains(&calls),
        "{calls} calls of a panicking source"
    );
    assert_eq!(cache.stats().failures, u64::from(calls));
    assert_eq!(errors.len(), 8 * 300);
    assert!(
        errors
            .iter()
            .all(|(kind, text)| *kind == TokenErrorKind::Cancelled && text.contains("panicked")),
        "{:?}",
        errors.first()
    );
}

/// A clock whose wall time can jump forward (a host resumed from suspend: monotonic timers lag
/// the wall clock) or be stepped back (NTP, a VM restored from a snapshot).
#[derive(Debug, Clone)]
struct JumpClock {
    base: TokioClock,
    jumped: Arc<Mutex<Duration>>,
    stepped_back: Arc<Mutex<Duration>>,
}

/// A provider of hour-long tokens, and a cache over it named `name` whose clock can jump.
fn jumping(name: &str) -> (Arc<Provider>, JumpClock, TokenCache) {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let clock = JumpClock {
        base: provider.clock.clone(),
        jumped: Arc::default(),
        stepped_back: Arc::default(),
    };
    let cache = TokenCache::builder(provider.source(name))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    (provider, clock, cache)
}

impl Clock for JumpClock {
    fn now(&self) -> SystemTime {
        self.base.now() + *self.jumped.lock().unwrap() - *self.stepped_back.lock().unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn after_the_wall_clock_jumps_past_expiry_no_expired_token_is_handed_out() {
    let (provider, clock, cache) = jumping("suspended");
    let first = cache.get().await.unwrap();

    // Two hours pass on the wall clock while no timer fires.
    *clock.jumped.lock().unwrap() = 2 * HOUR;
    *provider.ahead.lock().unwrap() = 2 * HOUR;

    let next = cache.get().await.unwrap();
    assert_ne!(next.secret(), first.secret(), "never the expired token");
    assert_eq!(provider.calls(), 2);
    assert_eq!(cache.stats().waits, 2);
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_stepped_back_delays_no_refresh_no_retry_and_serves_no_expired_token() {
    let (provider, clock, cache) = jumping("stepped back");
    let first = cache.get().await.unwrap();

    // The wall clock is stepped back an hour, and the provider fails from then on.
    *clock.stepped_back.lock().unwrap() = HOUR;
    provider.fail_with(Some(
        TokenError::new(TokenErrorKind::ServerError, "unavailable").with_http_status(503),
    ));

    // The refresh comes at 45 minutes of the token's life all the same, and the retries after it.
    advance(45 * MINUTE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(
        provider.calls(),
        2,
        "the refresh was not put off by the step"
    );
    for _ in 0..12 {
        advance(Duration::from_secs(10)).await;
        settle().await;
    }
    assert!(
        provider.calls() >= 4,
        "retries keep coming: {}",
        provider.calls()
    );
    assert_eq!(cache.get().await.unwrap().secret(), first.secret());

    // Past its usable life on the monotonic clock (59:30), the token is never handed out, though
    // the wall clock says it has an hour left.
    advance(12 * MINUTE + Duration::from_secs(30)).await;
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::ServerError);

    // The provider back, the next caller gets a new token.
    provider.fail_with(None);
    advance(Duration::from_secs(1)).await;
    let fresh = cache.get().await.unwrap();
    assert_ne!(fresh.secret(), first.secret());
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_failed_leaves_the_next_refusal_free_to_ask_again() {
    let (provider, cache) = setup(HOUR);
    let token = cache.entry(None).await.unwrap();

    // The provider blips while the first replacement is asked for.
    provider.fail_with(Some(
        TokenError::new(TokenErrorKind::ServerError, "unavailable").with_http_status(503),
    ));
    let error = cache.replacement_for(&token, None).await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::ServerError);
    provider.fail_with(None);

    // The next refusal, once the provider may be asked again, gets a different token.
    advance(Duration::from_secs(1)).await;
    let fresh = cache
        .replacement_for(&token, None)
        .await
        .unwrap()
        .expect("a different token after the blip");
    assert_ne!(fresh.secret(), token.secret());
    assert_eq!(provider.calls(), 3);
    assert_eq!(cache.stats().invalidations, 2);
}

#[tokio::test(start_paused = true)]
async fn a_token_expired_on_arrival_is_not_served() {
    let (provider, cache) = setup(HOUR);
    *provider.expired.lock().unwrap() = true;

    let error = cache.get().await.unwrap_err();

    assert_eq!(error.kind(), TokenErrorKind::ExpiredOnArrival);
    assert!(error.to_string().contains("clock"), "{error}");
    assert!(cache.stats().expires_in.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_slow_provider_times_out_with_a_typed_error_and_a_caller_deadline_is_kept() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let cache = cache(
        &provider,
        CacheOptions::default().fetch_timeout(Duration::from_secs(5)),
    );
    provider.set_latency(Duration::from_secs(600));

    let started = Instant::now();
    let error = cache
        .entry(Some(Instant::now() + Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert!(error.to_string().contains("still running"), "{error}");
    // Meanwhile the fetch runs on: `failure` says so.
    assert!(
        cache
            .failure()
            .unwrap()
            .to_string()
            .contains("not been answered yet")
    );

    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert!(error.to_string().contains("within 5 s"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_is_replaced_once_while_other_callers_keep_it() {
    let (provider, cache) = setup(HOUR);
    let first = cache.entry(None).await.unwrap();
    provider.set_latency(Duration::from_secs(2));

    // While the replacement is being fetched, other callers get the current token at once.
    let replacing = {
        let (cache, first) = (cache.clone(), first.clone());
        tokio::spawn(async move { cache.replacement_for(&first, None).await })
    };
    settle().await;
    let before = Instant::now();
    for _ in 0..10 {
        assert_eq!(cache.get().await.unwrap().secret(), "secret-token-1");
    }
    assert_eq!(Instant::now(), before, "nobody else waited");
    let second = replacing
        .await
        .unwrap()
        .unwrap()
        .expect("a different token");
    assert_eq!(second.secret(), "secret-token-2");

    // The first token again (a connect that still held it): the replacement already made is
    // handed out, without asking again.
    let again = cache.replacement_for(&first, None).await.unwrap().unwrap();
    assert_eq!(again.secret(), "secret-token-2");
    // The replacement itself rejected: asking again cannot help.
    for _ in 0..2 {
        assert!(no_replacement(&cache, &second).await);
    }

    assert_eq!(provider.calls(), 2);
    let stats = cache.stats();
    assert_eq!((stats.invalidations, stats.waits), (1, 1));
}

/// A source that caches like azure_identity's credentials: it returns the token it holds until 5
/// minutes before expiry, and only then asks for a new one.
fn caching_like_azure_identity(provider: &Arc<Provider>) -> FnSource {
    let inner = Arc::new(provider.source("azure-like"));
    let held: Arc<Mutex<Option<AccessToken>>> = Arc::default();
    let clock = provider.clock.clone();
    fn_source("azure-like", move |scope| {
        let (inner, held, scope) = (inner.clone(), held.clone(), scope.to_owned());
        let clock = clock.clone();
        async move {
            let cached = held.lock().unwrap().clone();
            if let Some(token) = cached
                && token.expires_on() > clock.now() + 5 * MINUTE
            {
                return Ok(token);
            }
            let token = inner.get_token(&scope).await?;
            *held.lock().unwrap() = Some(token.clone());
            Ok(token)
        }
    })
}

/// Whether the cache, told `token` was rejected, has no other token to offer.
async fn no_replacement(cache: &TokenCache, token: &Arc<Entry>) -> bool {
    cache.replacement_for(token, None).await.unwrap().is_none()
}

#[tokio::test(start_paused = true)]
async fn a_source_that_returns_the_same_token_gets_asked_once_per_rejected_token() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let cache = TokenCache::builder(caching_like_azure_identity(&provider))
        .clock(Arc::new(provider.clock.clone()))
        .build()
        .unwrap();
    let token = cache.entry(None).await.unwrap();

    // However many logins fail with it, the provider is asked at most once, and it hands back
    // the same token: no retry can help.
    for _ in 0..50 {
        assert!(no_replacement(&cache, &token).await);
        let current = cache.entry(None).await.unwrap();
        assert_eq!(current.secret(), token.secret());
        assert!(no_replacement(&cache, &current).await);
    }
    assert_eq!(provider.calls(), 1, "the source's own cache answered");
    assert_eq!(cache.stats().invalidations, 1);
    assert_eq!(cache.stats().requests, 2);

    // The background refresh at 45 min gets the same token back (the source's window is 5 min);
    // what was learnt about it is kept, so rejections still cost nothing.
    advance(46 * MINUTE).await;
    settle().await;
    let refreshed = cache.entry(None).await.unwrap();
    assert_eq!(refreshed.secret(), token.secret());
    assert!(no_replacement(&cache, &refreshed).await);
    assert_eq!(cache.stats().invalidations, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_provider_turns_a_replacement_into_its_error() {
    let (provider, cache) = setup(HOUR);
    let token = cache.entry(None).await.unwrap();
    provider.fail_with(Some(
        TokenError::new(TokenErrorKind::ServerError, "AADSTS50001: unavailable")
            .with_http_status(503),
    ));

    let error = cache.replacement_for(&token, None).await.unwrap_err();

    assert_eq!(error.kind(), TokenErrorKind::ServerError);
    assert_eq!(error.http_status(), Some(503));
    // The valid token is still served to everyone else.
    assert_eq!(cache.get().await.unwrap().secret(), token.secret());
}

#[tokio::test]
async fn caches_are_shared_by_cloning_and_never_otherwise() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let build = || {
        TokenCache::builder(provider.source("same-identity"))
            .build()
            .unwrap()
    };
    let a = build();
    let a_clone = a.clone();
    let b = build();

    let ta = a.get().await.unwrap();
    assert_eq!(a_clone.get().await.unwrap().secret(), ta.secret());
    assert_ne!(b.get().await.unwrap().secret(), ta.secret());
    assert_eq!(
        provider.calls(),
        2,
        "no hidden sharing between caches built separately"
    );
}

#[test]
fn options_that_cannot_work_are_refused_at_build_time() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let build = |options: CacheOptions| {
        TokenCache::builder(provider.source("x"))
            .options(options)
            .build()
    };
    let ms = Duration::from_millis;
    for (options, says) in [
        (
            CacheOptions::default().backoff(ms(0), ms(100)),
            "tight loop",
        ),
        (CacheOptions::default().retry_interval(ms(1)), "tight loop"),
        (
            CacheOptions::default().backoff(ms(500), ms(100)),
            "shorter than the first",
        ),
        (
            CacheOptions::default().fetch_timeout(Duration::ZERO),
            "fetch_timeout is zero",
        ),
    ] {
        let error = build(options).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(error.to_string().contains(says), "{error}");
    }
    build(CacheOptions::default().backoff(ms(10), ms(10))).unwrap();
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped_by_the_longest_backoff() {
    let (provider, cache) = failing(
        Duration::from_secs(1),
        Duration::from_secs(20),
        TokenError::new(TokenErrorKind::Throttled, "throttled")
            .with_http_status(429)
            .with_retry_after(Duration::from_secs(3600)),
    );
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::Throttled);
    assert!(error.retry_in().is_none());
    assert!(cache.get().await.unwrap_err().retry_in().unwrap() <= Duration::from_secs(20));

    advance(Duration::from_secs(21)).await;
    settle().await;
    assert_eq!(
        provider.calls(),
        2,
        "asked again after backoff_max, not after an hour"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_is_never_scheduled_past_the_usable_life_of_the_token_served() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), Duration::from_secs(100));
    let cache = cache(
        &provider,
        CacheOptions::default().backoff(Duration::from_secs(30), Duration::from_secs(60)),
    );
    let token = cache.get().await.unwrap();
    provider.fail_with(Some(
        TokenError::new(TokenErrorKind::Throttled, "throttled")
            .with_http_status(429)
            .with_retry_after(Duration::from_secs(60)),
    ));
    // The refresh at 75 s fails and asks for 60 s; the token stops being served at 90 s.
    advance(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(provider.calls(), 2);
    provider.fail_with(None);
    advance(Duration::from_secs(14)).await;
    settle().await;
    assert_eq!(
        provider.calls(),
        3,
        "retried when the token ran out, not 60 s later"
    );
    let fresh = cache.get().await.unwrap();
    assert_ne!(fresh.secret(), token.secret());
}

#[test]
fn an_invalid_scope_is_refused_at_build_time() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    for scope in ["", "https://ossrdbms-aad.database.windows.net"] {
        let error = TokenCache::builder(provider.source("x"))
            .scope(scope)
            .build()
            .unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
    }
}

#[tokio::test(start_paused = true)]
async fn debug_output_never_contains_the_token() {
    let (provider, cache) = setup(HOUR);
    let token = cache.entry(None).await.unwrap();
    provider.fail_with(Some(failure("boom")));
    let error = cache.replacement_for(&token, None).await.unwrap_err();
    let access = AccessToken::new("secret-token-1", SystemTime::now());

    let rendered = [
        format!("{token:?}"),
        format!("{cache:?}"),
        format!("{access:?}"),
        format!("{error:?} {error}"),
        format!("{:?}", cache.stats()),
        format!("{:?}", provider.source("x")),
    ];
    for text in rendered {
        assert!(!text.contains("secret-token"), "leaked in {text}");
    }
    assert_eq!(token.secret(), "secret-token-1");
}

#[test]
fn backoff_delay_grows_and_is_capped() {
    let options =
        CacheOptions::default().backoff(Duration::from_millis(500), Duration::from_secs(60));
    assert_eq!(options.backoff_delay(1, 1.0), Duration::from_millis(500));
    assert_eq!(options.backoff_delay(1, 0.0), Duration::from_millis(250));
    assert_eq!(options.backoff_delay(4, 1.0), Duration::from_secs(4));
    assert_eq!(options.backoff_delay(30, 1.0), Duration::from_secs(60));
    assert_eq!(
        options.backoff_delay(u32::MAX, 0.0),
        Duration::from_secs(30)
    );
}

/// When the provider was called, as offsets from the first call, with a token lifetime of
/// `lifetime`, after `run` of paused time, and the cache's counters then: the cache over a direct
/// source, or over one that caches like azure_identity.
async fn provider_calls(
    lifetime: Duration,
    run: Duration,
    like_azure_identity: bool,
) -> (Vec<Duration>, CacheStats) {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), lifetime);
    let builder = if like_azure_identity {
        TokenCache::builder(caching_like_azure_identity(&provider))
    } else {
        TokenCache::builder(provider.source("direct"))
    };
    let cache = builder
        .clock(Arc::new(provider.clock.clone()))
        .build()
        .unwrap();
    let start = Instant::now();
    cache.get().await.unwrap();
    // A caller every 15 s: none may ever wait, nor get a token within 30 s of its expiry.
    const STEP: Duration = Duration::from_secs(15);
    let mut elapsed = Duration::ZERO;
    while elapsed < run {
        advance(STEP).await;
        settle().await;
        elapsed += STEP;
        let token = cache.get().await.unwrap();
        let left = token
            .expires_on()
            .duration_since(provider.clock.now())
            .unwrap();
        assert!(
            left > Duration::from_secs(30),
            "{left:?} left at {elapsed:?}"
        );
    }
    assert_eq!(cache.stats().waits, 1, "only the first caller waited");
    let times = provider.call_times.lock().unwrap().clone();
    (
        times.into_iter().map(|t| t - start).collect(),
        cache.stats(),
    )
}

#[tokio::test(start_paused = true)]
async fn an_hour_long_token_is_refreshed_at_half_its_life_from_a_direct_source() {
    let (calls, stats) = provider_calls(HOUR, 2 * HOUR, false).await;
    assert_eq!((stats.successes, stats.unchanged), (5, 0));
    assert_eq!(
        calls,
        [
            Duration::ZERO,
            30 * MINUTE,
            60 * MINUTE,
            90 * MINUTE,
            120 * MINUTE
        ]
    );
}

/// A source with a cache of its own (azure_identity's credentials keep a token until 5 minutes
/// before it expires) answers the refresh at half life with the token already held: the cache asks
/// again at half of what remains of its usable life, until the source renews.
#[tokio::test(start_paused = true)]
async fn an_hour_long_token_from_a_source_with_its_own_cache_is_asked_for_at_half_of_what_remains()
{
    let (calls, stats) = provider_calls(HOUR, 65 * MINUTE, true).await;
    // The provider itself is called when the source's cache gives up, 5 minutes before expiry:
    // the cache asked the source at 30:00, 44:45, 52:07.5 and 55:48.75 (of the 59:30 the token is
    // handed out for, half of what remained each time), the last one reaching the provider, seen
    // at the end of the 15 s step of paused time it fell in.
    assert_eq!(calls, [Duration::ZERO, 56 * MINUTE]);
    assert_eq!(
        (stats.requests, stats.successes, stats.unchanged),
        (5, 2, 3)
    );
}

/// A source whose cache answers with the same token to the end (a platform that never renews
/// early): asked at half of what remains, never more than once a second, counted apart from
/// successes; and its token is not handed out past its usable life however often it is offered.
#[tokio::test(start_paused = true)]
async fn a_source_that_never_renews_is_asked_at_half_of_what_remains_and_its_token_still_ends() {
    let provider = Provider::new(TokioClock::new(SystemTime::now()), HOUR);
    let inner = Arc::new(provider.source("never-renews"));
    let held: Arc<Mutex<Option<AccessToken>>> = Arc::default();
    let asked: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let source = {
        let (held, asked) = (held.clone(), asked.clone());
        fn_source("never-renews", move |scope| {
            let (inner, held, asked, scope) =
                (inner.clone(), held.clone(), asked.clone(), scope.to_owned());
            async move {
                asked.lock().unwrap().push(Instant::now());
                let cached = held.lock().unwrap().clone();
                match cached {
                    Some(token) => Ok(token),
                    None => {
                        let token = inner.get_token(&scope).await?;
                        *held.lock().unwrap() = Some(token.clone());
                        Ok(token)
                    }
                }
            }
        })
    };
    let cache = TokenCache::builder(source)
        .clock(Arc::new(provider.clock.clone()))
        .build()
        .unwrap();
    let first = cache.entry(None).await.unwrap();
    let start = Instant::now();
    while provider.clock.now() < first.usable_until() {
        assert!(provider.clock.now() + Duration::from_secs(30) <= first.expires_on());
        assert_eq!(cache.get().await.unwrap().secret(), first.secret());
        advance(Duration::from_millis(250)).await;
        settle().await;
    }
    let error = cache.get().await.unwrap_err();
    assert_eq!(error.kind(), TokenErrorKind::ExpiredOnArrival, "{error}");

    let asked: Vec<Duration> = asked.lock().unwrap().iter().map(|t| *t - start).collect();
    let stats = cache.stats();
    assert_eq!(provider.calls(), 1);
    assert_eq!(stats.successes, 1);
    // While the token was handed out: from half its life (30 min), half of what remained each
    // time (14:45, 7:22.5, ...), never less than a second apart (time moves in 250 ms steps here).
    // Past its usable life the same answer is a failure, retried with backoff.
    let unchanged = stats.unchanged as usize;
    assert!((10..=13).contains(&unchanged), "{asked:?}");
    assert_eq!(asked[1], 30 * MINUTE, "{asked:?}");
    let gaps: Vec<Duration> = asked[..=unchanged]
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    assert!(
        gaps.windows(2).all(|w| w[1] <= w[0])
            && gaps.iter().all(|g| *g >= Duration::from_millis(750)),
        "{gaps:?}"
    );
    assert!(stats.failures >= 1);
    assert_eq!(stats.unchanged + 1 + stats.failures, stats.requests);
}

#[tokio::test(start_paused = true)]
async fn a_day_long_managed_identity_token_is_renewed_at_half_its_life() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let (direct, _) = provider_calls(DAY, DAY, false).await;
    assert_eq!(direct, [Duration::ZERO, DAY / 2, DAY]);
}

/// A source may return any `SystemTime` as the expiry (a custom source's bug, a provider's
/// far-future `expires_on`): one within a factor of two of the latest the platform represents is
/// served without a panic on the way to the monotonic clock or the refresh timer.
#[tokio::test(start_paused = true)]
async fn a_token_expiring_at_the_end_of_time_is_served_without_overflow() {
    let latest = (0..=63u32)
        .find_map(|bits| SystemTime::now().checked_add(Duration::from_secs(u64::MAX >> bits)))
        .unwrap();
    let lifetime = latest.duration_since(SystemTime::now()).unwrap();
    assert!(lifetime > Duration::from_secs(1 << 40), "{lifetime:?}");
    let (provider, cache) = setup(lifetime);

    let token = cache.get().await.unwrap();
    advance(Duration::from_secs(86_400)).await;
    settle().await;
    let again = cache.get().await.unwrap();

    assert_eq!(token.secret(), again.secret());
    assert_eq!(provider.calls(), 1);
    assert!(cache.stats().expires_in.unwrap() > Duration::from_secs(1 << 40));
}
