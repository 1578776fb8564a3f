//! What only the sqlx adapter has to get right: the login relay sqlx connects through (served for
//! as long as the sqlx pool lives, on a socket of this process only, after errors, with half-sent
//! startups and killed processes), the user named by a URL or by sqlx's defaults, sessions retired
//! however many tokens came since, a typed answer when no token can be had, and its metrics.

use postgres_entra::{AccessToken, EntraConnector, Error, SessionOptions, TlsRoots};
use postgres_entra_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use postgres_entra_testkit::{Endpoint, FnTokenSource, Rejection, TokenOptions};
use postgres_entra_testkit::{in_child, run_test_in_child};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Suite, connector, connector_builder, metered_connector, wrong_secret_connector};

/// The relay's socket, as the sqlx pool's connect options name it.
fn socket(pool: &sqlx::PgPool) -> PathBuf {
    let options = pool.connect_options();
    options
        .get_socket()
        .expect("the pool connects through the relay's socket")
        .join(format!(".s.PGSQL.{}", options.get_port()))
}

/// Waits (bounded) until `path` is gone.
async fn removed(path: &std::path::Path) -> bool {
    let started = Instant::now();
    while path.exists() && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !path.exists()
}

/// The server process behind the connection a checkout of `pool` gets.
async fn backend_pid(pool: &sqlx::PgPool) -> i32 {
    let pid: (i32,) = sqlx::query_as("select pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap();
    pid.0
}

/// A pool for the emulator's service principal, with sqlx's default pool options, one login made.
async fn plain_pool(emulator: &Suite) -> postgres_entra_sqlx::EntraPgPool {
    postgres_entra_sqlx::connect_with(
        options(emulator),
        PgPoolOptions::new(),
        &connector(emulator),
        SessionOptions::new(),
    )
    .await
    .unwrap()
}

/// [`plain_pool`] without the login.
fn lazy_pool(emulator: &Suite) -> postgres_entra_sqlx::EntraPgPool {
    postgres_entra_sqlx::connect_lazy_with(
        options(emulator),
        PgPoolOptions::new(),
        &connector(emulator),
        SessionOptions::new(),
    )
    .unwrap()
}

fn options(emulator: &Suite) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host(emulator.host())
        .port(emulator.port())
        .database(emulator.database())
        .username("")
}

fn url(emulator: &Suite) -> String {
    format!(
        "postgres://{}:{}/{}",
        emulator.host(),
        emulator.port(),
        emulator.database()
    )
}

async fn current_user(pool: &postgres_entra_sqlx::EntraPgPool) -> Result<String, sqlx::Error> {
    let user: (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&**pool)
        .await?;
    Ok(user.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_serves_the_sqlx_pool_for_as_long_as_it_lives_and_its_options_hold_no_token() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = plain_pool(&emulator).await;
    let path = socket(&pool);
    assert!(path.exists());
    // sqlx's options name the socket, and hold no password: nothing to print.
    let printed = format!("{:?} {:#?}", pool.connect_options(), pool.connect_options());
    for token in emulator.issued_tokens() {
        assert!(
            !printed.contains(&token),
            "a token in sqlx's connect options"
        );
    }

    // The sqlx pool taken out of the handle goes on logging in once the handle is gone.
    let plain: sqlx::PgPool = (*pool).clone();
    drop(pool);
    let user: (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&plain)
        .await
        .unwrap();
    assert_eq!(user.0, "orders-api");

    // Closing it ends the relay and removes its socket; no login happens after.
    plain.close().await;
    assert!(removed(&path).await, "{} was left", path.display());
    let logins = emulator.logins().len();
    assert!(plain.acquire().await.is_err());
    assert_eq!(emulator.logins().len(), logins, "no login once closed");

    // A pool dropped without closing removes its socket too.
    let dropped = plain_pool(&emulator).await;
    let path = socket(&dropped);
    dropped.close().await;
    drop(dropped);
    assert!(removed(&path).await, "{} was left", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_process_may_use_the_relay_and_a_stalled_startup_holds_up_nothing() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = plain_pool(&emulator).await;
    let path = socket(&pool);
    // The socket's directory is this user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");

    // Another process is hung up on at once, without an answer to its request.
    let other = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
             try:\n  s.sendall(b'\\x00\\x00\\x00\\x08\\x04\\xd2\\x16\\x2f')\n  \
             print(len(s.recv(100)))\nexcept ConnectionError:\n  print(0)",
        )
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&other.stdout).trim(),
        "0",
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );

    // A client of this process that sends half a startup message holds up no other login, and is
    // hung up on after a while.
    let mut stalled = tokio::net::UnixStream::connect(&path).await.unwrap();
    stalled.write_all(&[0, 0, 0, 40, 0, 3]).await.unwrap();
    let user: (String,) = sqlx::query_as("select current_user::text")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(user.0, "orders-api");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(0))), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_accepting_after_running_out_of_file_descriptors() {
    run_test_in_child(
        "sqlx_only::out_of_file_descriptors",
        std::iter::empty::<(&str, &str)>(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
}

/// In a process of its own: its file descriptor limit is lowered. Its log sink panics on the
/// relay's line about the failed accept (an application's faulty layer): the relay goes on.
#[test]
#[ignore = "run by the_relay_keeps_accepting_after_running_out_of_file_descriptors"]
fn out_of_file_descriptors() {
    if !in_child() {
        return;
    }
    postgres_entra_testkit::panicking_log_runtime(
        "could not accept a connection",
        tracing::Level::WARN,
    )
    .block_on(out_of_file_descriptors_in_a_runtime());
}

async fn out_of_file_descriptors_in_a_runtime() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().acquire_timeout(Duration::from_secs(1)),
        &connector(&emulator),
        SessionOptions::new(),
    )
    .await
    .unwrap();
    let held = pool.acquire().await.unwrap();

    // Every descriptor taken but one: sqlx's next socket takes it, and the relay cannot accept.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, highest + 1, hard).unwrap();
    let mut fillers = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        fillers.push(file);
    }
    fillers.pop();
    let starved = pool.acquire().await;
    assert!(starved.is_err(), "no connection without a descriptor");
    drop(fillers);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();

    // Descriptors back: logins go on.
    let again = pool.acquire().await.expect("the relay accepts again");
    drop((held, again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_left_by_a_killed_process_is_removed_by_the_next_one() {
    // A process that makes a pool and is killed by SIGTERM leaves its socket behind...
    let killed = run_test_in_child(
        "sqlx_only::killed_with_a_pool",
        std::iter::empty::<(&str, &str)>(),
        Duration::from_secs(60),
    )
    .await
    .unwrap_err()
    .to_string();
    let path = killed
        .lines()
        .find_map(|line| Some(line.split_once("relay socket: ")?.1.trim()))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the child said where its socket was: {killed}"));
    assert!(
        path.exists(),
        "a process killed by SIGTERM leaves its socket"
    );
    // ... which the next process to make a pool removes.
    run_test_in_child(
        "sqlx_only::a_pool_in_a_new_process",
        std::iter::empty::<(&str, &str)>(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(!path.exists(), "{} was left", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_socket_left_by_a_killed_process_is_removed_by_the_next_one"]
async fn killed_with_a_pool() {
    if !in_child() {
        return;
    }
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = lazy_pool(&emulator);
    println!("relay socket: {}", socket(&pool).display());
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_socket_left_by_a_killed_process_is_removed_by_the_next_one"]
async fn a_pool_in_a_new_process() {
    if !in_child() {
        return;
    }
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    lazy_pool(&emulator);
}

#[test]
fn a_pool_made_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let connector = EntraConnector::builder(FnTokenSource::new("never", |_| async {
        Err(postgres_entra::TokenError::new(
            postgres_entra::TokenErrorKind::Other,
            "never asked",
        ))
    }))
    .build()
    .unwrap();
    let error = postgres_entra_sqlx::connect_lazy_with(
        PgConnectOptions::new_without_pgpass().host("localhost"),
        PgPoolOptions::new(),
        &connector,
        SessionOptions::new(),
    )
    .unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error}");
    assert!(error.to_string().contains("Tokio runtime"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_retired_however_many_tokens_came_since() {
    const LIFETIME: Duration = Duration::from_secs(1);
    let emulator = Suite::start(LIFETIME).await;
    let connector = connector(&emulator);
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_connections(1),
        &connector,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    let pid = || backend_pid(&pool);
    let first = pid().await;
    // The connection sits idle while the cache goes through a dozen tokens.
    let until = Instant::now() + 6 * LIFETIME;
    while Instant::now() < until {
        connector.cache().get().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        connector.cache().stats().successes >= 9,
        "{:?}",
        connector.cache().stats()
    );
    assert_ne!(
        pid().await,
        first,
        "the idle session was retired at its next checkout"
    );
}

/// The pool's own callbacks are the user's alone: sessions end at sqlx's ping (before a checkout,
/// or, without that ping, when a connection is given back), so the user's `before_acquire` and
/// `after_release` run as set, and each checkout's server process changes once its token has run
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_callbacks_run_and_sessions_still_end_with_their_token() {
    const LIFETIME: Duration = Duration::from_secs(2);
    for test_before_acquire in [true, false] {
        let emulator = Suite::start(LIFETIME).await;
        let (acquired, released) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, r) = (acquired.clone(), released.clone());
        let pool_options = PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(test_before_acquire)
            .before_acquire(move |_, _| {
                a.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(true) })
            })
            .after_release(move |_, _| {
                r.fetch_add(1, Ordering::SeqCst);
                Box::pin(async { Ok(true) })
            });
        let pool = postgres_entra_sqlx::connect_with(
            options(&emulator),
            pool_options,
            &connector(&emulator),
            SessionOptions::new(),
        )
        .await
        .unwrap();
        let pid = || backend_pid(&pool);

        let first = pid().await;
        assert_eq!(pid().await, first, "kept while its token is valid");
        // Past the token and its jitter (a tenth of the life).
        tokio::time::sleep(LIFETIME + LIFETIME / 10 + Duration::from_millis(300)).await;
        let mut later = pid().await;
        if !test_before_acquire {
            // The session ends when its connection is given back, after that checkout.
            later = pid().await;
        }

        assert_ne!(later, first, "test_before_acquire {test_before_acquire}");
        assert!(
            acquired.load(Ordering::SeqCst) >= 1,
            "the user's before_acquire ran"
        );
        // sqlx gives a connection back in a task of its own: the last may still be on its way.
        assert!(
            released.load(Ordering::SeqCst) >= 2,
            "the user's after_release ran: {released:?} (before_acquire {acquired:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connect_logs_in_with_a_token_still_usable_past_the_first_ones_life() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let emulator = Suite::start(LIFETIME).await;
    let connector = connector(&emulator);
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_lifetime(Duration::from_millis(300)),
        &connector,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    let first = connector.cache().get().await.unwrap();

    // Past the first token's refresh point and its usable life: every connect since used a
    // newer token, which the server accepted.
    let until = Instant::now() + LIFETIME + Duration::from_secs(1);
    let mut checkouts = 0;
    while Instant::now() < until {
        assert_eq!(current_user(&pool).await.unwrap(), "orders-api");
        checkouts += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = connector.cache().get().await.unwrap();
    assert!(now.expires_on() > first.expires_on(), "a newer token");
    assert!(
        emulator.logins().iter().all(|l| l.outcome.is_ok()),
        "no login presented an expired or unusable token"
    );
    assert!(emulator.logins().len() > 5, "connections were replaced");
    println!("{checkouts} checkouts, {} logins", emulator.logins().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_a_user_takes_the_role_from_the_connector_and_plaintext_is_refused() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = postgres_entra_sqlx::connect(
        &url(&emulator),
        &connector(&emulator),
        SessionOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-api");
    let ssl: (bool,) = sqlx::query_as("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert!(ssl.0, "over TLS");

    let error = postgres_entra_sqlx::connect(
        &format!("{}?sslmode=disable", url(&emulator)),
        &connector_builder(&emulator).build().unwrap(),
        SessionOptions::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error}");
    assert!(error.to_string().contains("clear text"), "{error}");
}

/// A connector for the emulator's managed identity, naming no role: the settings' user, else the
/// token's name (`orders-mi`), decides.
fn managed_identity_connector(emulator: &Suite) -> EntraConnector {
    EntraConnector::builder(postgres_entra::AzureTokenSource::new(
        emulator.managed_identity_credential().unwrap(),
    ))
    .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_named_by_the_url_or_options_is_the_role_and_sqlx_defaults_are_not() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let connector = managed_identity_connector(&emulator);
    let base = url(&emulator);
    let (host, port) = (emulator.host(), emulator.port());

    // Named as `?user=`: that role, so a role this identity is not mapped to is refused (sqlx
    // takes `?user=` as the user just as it takes `user@`).
    for url in [
        format!("{base}?user=nobody-mi"),
        format!("postgres://nobody-mi@{host}:{port}/postgres"),
    ] {
        let error = postgres_entra_sqlx::connect(&url, &connector, SessionOptions::new())
            .await
            .unwrap_err();
        let Error::LoginRejected(rejected) = &error else {
            panic!("{url}: expected a refused login, got {error}");
        };
        assert_eq!(rejected.role(), "nobody-mi", "{url}");
    }
    let refused = emulator.logins();
    assert!(
        refused
            .iter()
            .all(|l| l.role == "nobody-mi" && l.outcome == Err(Rejection::UnknownRole)),
        "{refused:?}"
    );

    // Not named: the identity's own role, from the token. `PgConnectOptions::new()` fills in the
    // operating system's user; that is not a configured role.
    let pool = postgres_entra_sqlx::connect(&base, &connector, SessionOptions::new())
        .await
        .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-mi");
    let defaults = PgConnectOptions::new_without_pgpass()
        .host(host)
        .port(port)
        .database(emulator.database());
    let pool = postgres_entra_sqlx::connect_with(
        defaults,
        PgPoolOptions::new(),
        &connector,
        SessionOptions::new(),
    )
    .await
    .unwrap();
    assert_eq!(current_user(&pool).await.unwrap(), "orders-mi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_log_in_never_leaves_an_expired_one_in_the_options() {
    let emulator = Arc::new(Suite::start(Duration::from_secs(3600)).await);
    // The first token is a user's, good for 3 s; every later one carries no name (its role cannot
    // be told), so it cannot replace the first.
    let calls = Arc::new(AtomicUsize::new(0));
    let (minter, counter) = (emulator.clone(), calls.clone());
    let source = FnTokenSource::new("then-nameless", move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let (token, life) = if n == 0 {
            let token = minter
                .issue_token(&minter.user(), TokenOptions::default())
                .unwrap();
            (token, Duration::from_secs(3))
        } else {
            ("nameless.not-a-jwt.x".to_owned(), Duration::from_secs(3600))
        };
        async move { Ok(AccessToken::new(token, SystemTime::now() + life)) }
    });
    let connector = EntraConnector::builder(source)
        .tls_roots(TlsRoots::CaPem(emulator.ca_pem().to_owned()))
        .build()
        .unwrap();
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new()
            .max_lifetime(Duration::from_millis(200))
            .acquire_timeout(Duration::from_secs(2)),
        &connector,
        SessionOptions::new(),
    )
    .await
    .unwrap();

    // Past the first token's life: connects go on, and none presents it.
    let until = Instant::now() + Duration::from_secs(5);
    let mut last = None;
    while Instant::now() < until {
        if let Err(error) = current_user(&pool).await {
            last = Some(error);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(calls.load(Ordering::SeqCst) >= 2, "the second token came");
    assert!(
        emulator
            .logins()
            .iter()
            .all(|l| l.outcome != Err(Rejection::Expired)),
        "an expired token was presented: {:?}",
        emulator.logins()
    );
    let error = last.expect("connects failed once the first token ran out");
    let why = pool.explain(&error).expect("typed");
    assert!(matches!(why, Error::Config { .. }), "{why}");
    assert!(why.to_string().contains("no role name"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_connect_fails_saying_so_and_explain_names_the_cause() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let pool = postgres_entra_sqlx::connect_lazy_with(
        options(&emulator),
        PgPoolOptions::new().acquire_timeout(Duration::from_secs(2)),
        &wrong_secret_connector(&emulator),
        SessionOptions::new(),
    )
    .unwrap();

    let error = pool.acquire().await.unwrap_err();

    // sqlx's own error says it, in our words.
    let text = error.to_string();
    assert!(!text.contains("os error"), "{text}");
    assert!(
        text.contains("postgres-entra: could not get an Entra ID access token"),
        "{text}"
    );
    assert!(text.contains("HTTP 401"), "{text}");
    let why = pool.explain(&error).expect("typed");
    assert!(matches!(why, Error::Token(_)), "{why}");
    assert!(emulator.logins().is_empty());

    // A provider that has not answered yet: explain says a request is in flight.
    let slow = Suite::start(Duration::from_secs(3600)).await;
    slow.set_latency(Endpoint::Token, Duration::from_secs(5));
    let pool = postgres_entra_sqlx::connect_lazy_with(
        options(&slow),
        PgPoolOptions::new().acquire_timeout(Duration::from_millis(500)),
        &connector(&slow),
        SessionOptions::new(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let error = pool.acquire().await.unwrap_err();
    let why = pool.explain(&error).expect("typed while the fetch runs");
    assert!(
        why.to_string().contains("still running")
            || why.to_string().contains("not been answered yet"),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_and_its_tokens_are_recorded_as_metrics() {
    let emulator = Suite::start(Duration::from_secs(3600)).await;
    let (reader, connector) = metered_connector(&emulator);
    let pool = postgres_entra_sqlx::connect_with(
        options(&emulator),
        PgPoolOptions::new().max_connections(3),
        &connector,
        SessionOptions::new().pool_name("orders"),
    )
    .await
    .unwrap();
    let held = pool.acquire().await.unwrap();

    let metrics = reader.collect();
    let orders = [("db.client.connection.pool.name", "orders")];
    let state = |state| {
        [
            ("db.client.connection.pool.name", "orders"),
            ("db.client.connection.state", state),
        ]
    };
    assert_eq!(
        metrics.value("db.client.connection.max", &orders),
        Some(3.0)
    );
    assert_eq!(
        metrics.value("db.client.connection.count", &state("used")),
        Some(1.0),
        "{}",
        metrics.text()
    );
    assert_eq!(
        metrics.sum(
            "postgres_entra.token.refreshes",
            &[("postgres_entra.outcome", "success")]
        ),
        1.0
    );
    // The relay's logins and sessions: creation times, and the age of the oldest token in use.
    assert!(
        metrics.count("db.client.connection.create_time", &orders) >= 1,
        "{}",
        metrics.text()
    );
    assert!(
        metrics
            .value("postgres_entra.connection.oldest_token_age", &orders)
            .is_some(),
        "{}",
        metrics.text()
    );
    drop(held);
    drop(pool);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        reader.collect().value("db.client.connection.max", &orders),
        None,
        "a dropped pool is no longer observed"
    );
}
