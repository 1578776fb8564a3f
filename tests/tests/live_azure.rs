//! The live-Azure suite, `make test-azure`: the checks the emulator suite makes, against a real
//! Azure Database for PostgreSQL (or Cosmos DB for PostgreSQL) server and a real credential, both
//! named by the environment as for `make demo`: `PGHOST` (an Azure name), `PGDATABASE`, `PGPORT`,
//! optionally `PGUSER`, and the credential's `AZURE_*` or `IDENTITY_*` variables (see the README).
//!
//! Without them every test says so and passes without contacting anything. The tests are
//! `#[ignore]`d, so `make test` (and CI) never runs them.

use postgres_entra::{
    AccessToken, Cloud, EntraConnector, Error, SessionOptions, TlsRoots, TokenCache, TokenFuture,
    TokenSource,
};
use postgres_entra_bb8::EntraConnectionManager;
use postgres_entra_examples::Target;
use postgres_entra_testkit::trace_capture;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The configured target, or `None` (with the reason printed) when the environment names none.
fn live() -> Option<Target> {
    let host = std::env::var("PGHOST").unwrap_or_default();
    let credential_named = std::env::vars().any(|(name, value)| {
        (name.starts_with("AZURE_") || name.starts_with("IDENTITY_")) && !value.is_empty()
    });
    let azure_name = [
        ".postgres.database.azure.com",
        ".usgovcloudapi.net",
        ".chinacloudapi.cn",
        ".postgres.cosmos.azure.com",
    ]
    .iter()
    .any(|suffix| host.trim_end_matches('.').ends_with(suffix));
    if !azure_name || !credential_named {
        println!(
            "live Azure suite skipped: set PGHOST to an Azure server name (*.postgres.database.azure.com, \
             .usgovcloudapi.net, .chinacloudapi.cn or *.postgres.cosmos.azure.com; now `{host}`) and a \
             credential's AZURE_* or IDENTITY_* variables (AZURE_CLIENT_SECRET with AZURE_TENANT_ID and \
             AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE, IDENTITY_ENDPOINT, AZURE_MANAGED_IDENTITY=1, or \
             AZURE_TENANT_ID alone to use your az/azd login)"
        );
        return None;
    }
    let target = Target::azure_from_env()
        .expect("the credential named by the environment can be built")
        .expect("PGHOST is set");
    println!("live Azure suite against {}", target.description);
    Some(target)
}

/// A token source that reports its tokens as expiring after `lifetime` at the latest, so that the
/// cache refreshes within a test's time.
#[derive(Debug)]
struct ShortLived {
    inner: Arc<dyn TokenSource>,
    lifetime: Duration,
}

impl TokenSource for ShortLived {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            let token = self.inner.get_token(scope).await?;
            let expires_on = token.expires_on().min(SystemTime::now() + self.lifetime);
            Ok(AccessToken::new(token.secret(), expires_on))
        })
    }

    fn identity(&self) -> String {
        self.inner.identity()
    }
}

/// Runs `select current_user` (and whether TLS is on) through a new connection.
async fn whoami(
    connector: &EntraConnector,
    config: &tokio_postgres::Config,
) -> Result<(String, bool), Error> {
    let (client, connection) = postgres_entra_tokio_postgres::connect(connector, config).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "select current_user::text, coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .expect("a query on a fresh connection");
    Ok((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real Azure server and credential: make test-azure"]
async fn a_real_azure_server_and_credential_pass_the_emulators_checks() {
    let capture = trace_capture();
    let Some(target) = live() else {
        return;
    };
    let mut secrets = Vec::new();
    let source = target.source.clone();

    // 1. The default roots verify the real chain (unless PGSSLROOTCERT names others); the scope
    // follows the host.
    let roots = match std::env::var("PGSSLROOTCERT") {
        Ok(path) if !path.is_empty() => {
            println!("PGSSLROOTCERT is set: verifying with {path}, not the default roots");
            TlsRoots::CaFile(path.into())
        }
        _ => TlsRoots::Azure,
    };
    let host = match target.pg_config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => panic!("PGHOST names a TCP host"),
    };
    // The scope follows the host.
    let cache = TokenCache::builder(source.clone())
        .scope(Cloud::from_host(&host).scope())
        .build()
        .unwrap();
    let connector = EntraConnector::builder_with_cache(cache.clone())
        .tls_roots(roots.clone())
        .build()
        .unwrap();
    let (user, ssl) = whoami(&connector, &target.pg_config)
        .await
        .unwrap_or_else(|e| panic!("login with the default roots failed: {e}"));
    assert!(ssl, "the session is not encrypted");
    let token = cache.get().await.unwrap();
    secrets.push(token.secret().to_owned());
    println!(
        "1. logged in as `{user}` over verified TLS; scope {}",
        cache.scope()
    );

    // 2. The role, as configured or read from the token.
    match target.pg_config.get_user() {
        Some(configured) => assert_eq!(user, configured),
        None => {
            let claims = token.claims().unwrap();
            let (name, claim) = claims
                .role_name()
                .unwrap_or_else(|| panic!("no role name in the token ({claims}); set PGUSER"));
            assert_eq!(user, name);
            println!("2. role `{user}` read from the token's `{claim}` claim");
        }
    }

    // 3. Both pools log in.
    let mut deadpool_config = deadpool_postgres::Config::new();
    if let Some(tokio_postgres::config::Host::Tcp(host)) = target.pg_config.get_hosts().first() {
        deadpool_config.host = Some(host.clone());
    }
    deadpool_config.port = target.pg_config.get_ports().first().copied();
    deadpool_config.hostaddr = target.pg_config.get_hostaddrs().first().copied();
    deadpool_config.dbname = target.pg_config.get_dbname().map(str::to_owned);
    deadpool_config.user = target.pg_config.get_user().map(str::to_owned);
    let deadpool =
        postgres_entra_deadpool::create_pool(&deadpool_config, &connector, SessionOptions::new())
            .unwrap();
    let client = deadpool.get().await.unwrap();
    let via_deadpool: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    drop(client);
    let manager =
        EntraConnectionManager::new(target.pg_config.clone(), &connector, SessionOptions::new())
            .unwrap();
    manager.check().await.unwrap();
    let bb8 = bb8::Pool::builder()
        .max_size(2)
        .build(manager)
        .await
        .unwrap();
    let via_bb8: String = bb8
        .get()
        .await
        .unwrap()
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (via_deadpool.as_str(), via_bb8.as_str()),
        (user.as_str(), user.as_str())
    );
    println!("3. deadpool and bb8 pools logged in as `{user}`");

    // 4. A role that does not exist gives the documented error.
    let mut wrong = target.pg_config.clone();
    wrong.user(format!(
        "postgres_entra_no_such_role_{}",
        std::process::id()
    ));
    match whoami(&connector, &wrong).await {
        Err(Error::LoginRejected(rejected)) => {
            let text = rejected.to_string();
            assert!(text.contains("pgaadauth_create_principal"), "{text}");
            println!("4. a wrong role is refused: {text}");
        }
        other => panic!("expected a rejected login, got {other:?}"),
    }

    // 5. One refresh, observed: tokens said to live 20 s are fetched again.
    let short_cache = TokenCache::builder(ShortLived {
        inner: source.clone(),
        lifetime: Duration::from_secs(20),
    })
    .scope(cache.scope())
    .build()
    .unwrap();
    let short = EntraConnector::builder_with_cache(short_cache.clone())
        .tls_roots(roots)
        .build()
        .unwrap();
    whoami(&short, &target.pg_config).await.unwrap();
    tokio::time::sleep(Duration::from_secs(18)).await;
    whoami(&short, &target.pg_config).await.unwrap();
    let stats = short_cache.stats();
    assert!(stats.requests >= 2 && stats.failures == 0, "{stats:?}");
    assert_eq!(
        stats.waits, 1,
        "the refresh ran in the background: {stats:?}"
    );
    let refreshed = short_cache.get().await.unwrap();
    secrets.push(refreshed.secret().to_owned());
    println!("5. background refresh observed: {stats:?}");

    // 6. No token in anything traced at TRACE.
    let text = capture.text();
    for secret in &secrets {
        let signature = secret.rsplit('.').next().unwrap_or(secret);
        assert!(
            !text.contains(secret.as_str()) && !text.contains(signature),
            "a token was traced"
        );
    }
    println!("6. {} bytes traced at TRACE, no token in them", text.len());
}
