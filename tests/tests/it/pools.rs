//! "A pool under test": what every end-to-end scenario needs from a pool adapter, and one impl per
//! adapter. Adding an adapter means one more impl here and one more line in `scenarios.rs`.

use deadpool_postgres::{ManagerConfig, PoolConfig, RecyclingMethod, Timeouts};
use postgres_entra::{EntraConnector, Error, SessionOptions, TokenCache};
use postgres_entra_bb8::{EntraConnectionManager, PoolObservation};
use postgres_entra_deadpool::create_pool;
use postgres_entra_diesel::{EntraDiesel, deadpool, diesel, diesel_async};
use postgres_entra_testkit::AzureServer;
use std::any::Any;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::config::SslMode;

use crate::{Suite, chain};

/// Settings of a pool under test; each adapter maps them onto its own builder.
#[derive(Debug, Clone)]
pub(crate) struct PoolSpec {
    /// Tokens, TLS and role.
    pub(crate) connector: EntraConnector,
    pub(crate) host: String,
    /// The address to reach `host` at, when it is not resolved (an Azure name the emulator plays).
    pub(crate) hostaddr: Option<IpAddr>,
    pub(crate) port: u16,
    pub(crate) database: String,
    pub(crate) user: Option<String>,
    pub(crate) ssl_mode: SslMode,
    pub(crate) max_size: usize,
    /// deadpool: retirement at recycle (with a fifth as jitter); bb8: `max_lifetime`.
    pub(crate) max_age: Option<Duration>,
    /// deadpool: wait and create timeouts; bb8: `connection_timeout`.
    pub(crate) timeout: Duration,
    /// What this library adds to the pool (sessions bounded by their token, name, ...).
    pub(crate) options: SessionOptions,
}

impl PoolSpec {
    /// A pool of 8 for `emulator`'s server, TLS required, 10 s timeouts, no retirement.
    pub(crate) fn new(emulator: &Suite, connector: impl Into<EntraConnector>) -> Self {
        Self {
            connector: connector.into(),
            host: emulator.host().to_owned(),
            hostaddr: None,
            port: emulator.port(),
            database: emulator.database().to_owned(),
            user: None,
            ssl_mode: SslMode::Require,
            max_size: 8,
            max_age: None,
            timeout: Duration::from_secs(10),
            options: SessionOptions::new(),
        }
    }

    /// The pool options, changed by `change`.
    pub(crate) fn options(mut self, change: impl FnOnce(SessionOptions) -> SessionOptions) -> Self {
        self.options = change(self.options);
        self
    }

    pub(crate) fn pool_name(self, name: &str) -> Self {
        self.options(|options| options.pool_name(name))
    }

    pub(crate) fn size(mut self, max_size: usize) -> Self {
        self.max_size = max_size;
        self
    }

    pub(crate) fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }

    pub(crate) fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same server at another port (a relay, a trap).
    pub(crate) fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The same emulator under one of the Azure names it plays.
    pub(crate) fn azure_server(mut self, emulator: &Suite, server: AzureServer) -> Self {
        let config = emulator.server_config_for(server);
        self.host = server.host_name().to_owned();
        self.hostaddr = Some(server.address());
        self.port = config.get_ports()[0];
        self
    }

    /// The host name to connect as (still reached at the emulator's address).
    pub(crate) fn host_name(mut self, name: &str) -> Self {
        self.host = name.to_owned();
        self
    }

    pub(crate) fn user(mut self, role: &str) -> Self {
        self.user = Some(role.to_owned());
        self
    }

    pub(crate) fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = mode;
        self
    }

    /// The options with the age limit, as deadpool and bb8 adapters take it (a fifth as jitter).
    pub(crate) fn session_options(&self) -> SessionOptions {
        match self.max_age {
            Some(age) => self.options.clone().max_age(age, age / 5),
            None => self.options.clone(),
        }
    }

    /// The settings as tokio-postgres takes them.
    pub(crate) fn server_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host(&self.host);
        if let Some(address) = self.hostaddr {
            config.hostaddr(address);
        }
        config
            .port(self.port)
            .dbname(&self.database)
            .ssl_mode(self.ssl_mode)
            .connect_timeout(Duration::from_secs(10));
        if let Some(user) = &self.user {
            config.user(user);
        }
        config
    }
}

/// Why a checkout failed: the pool's own words, and our typed error if the adapter exposes it.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) text: String,
    pub(crate) reason: Option<Reason>,
}

/// Our typed error, in a form a scenario can compare across adapters.
#[derive(Debug, Clone)]
pub(crate) struct Reason {
    /// The variant: `Token`, `LoginRejected`, `Tls`, `Config`, `Connect` or `Postgres`.
    pub(crate) variant: &'static str,
    pub(crate) text: String,
    pub(crate) error: Error,
}

impl Reason {
    pub(crate) fn of(error: &Error) -> Self {
        let variant = match error {
            Error::Token(_) => "Token",
            Error::LoginRejected(_) => "LoginRejected",
            Error::Tls { .. } => "Tls",
            Error::Config { .. } => "Config",
            Error::Connect { .. } => "Connect",
            Error::Postgres { .. } => "Postgres",
            _ => "other",
        };
        Self {
            variant,
            text: crate::chain(error),
            error: error.clone(),
        }
    }
}

impl Failure {
    /// The pool's words, and our error underneath where the adapter finds one.
    fn new(text: String, ours: Option<Error>) -> Self {
        Self {
            text,
            reason: ours.as_ref().map(Reason::of),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(reason) => write!(f, "{} ({}: {})", self.text, reason.variant, reason.text),
            None => f.write_str(&self.text),
        }
    }
}

/// How many connections a pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) open: usize,
    pub(crate) idle: usize,
}

/// A pool adapter, as the scenarios drive it.
pub(crate) trait PoolUnderTest: Clone + Send + Sync + 'static {
    /// What a checkout hands out; the connection goes back to the pool when it is dropped.
    type Connection: Send + 'static;

    /// Whether the pool counts checkouts that timed out (`db.client.connection.timeouts`).
    const COUNTS_TIMEOUTS: bool;

    /// Whether the pool tells how many checkouts wait (`db.client.connection.pending_requests`).
    const COUNTS_PENDING: bool = true;

    /// Whether a login waiting for a token ends before the pool's own limit on a connect, with our
    /// error in the pool's: the adapter sees deadpool's create timeout and sqlx's acquire timeout,
    /// and bb8 has no such limit. diesel-async's deadpool pool gives its manager no look at the
    /// pool: its create timeout ends the login, and only `explain` gives our cause.
    const SEES_POOL_LIMIT: bool = true;

    /// Builds the pool; an error is what the adapter reports when the pool is made.
    fn build(spec: PoolSpec) -> impl Future<Output = Result<Self, Error>> + Send;

    /// Checks a connection out.
    fn checkout(&self) -> impl Future<Output = Result<Self::Connection, Failure>> + Send;

    /// Runs `sql` on a checked-out connection and returns the first column of the first row.
    fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> impl Future<Output = Result<String, Failure>> + Send;

    /// Connections open, and idle among them.
    fn counts(&self) -> Counts;

    /// The token cache the pool's logins use.
    fn token_cache(&self) -> TokenCache;

    /// Checks a connection out and keeps it until the returned guard is dropped.
    fn hold(&self) -> impl Future<Output = Result<Box<dyn Any + Send>, Failure>> + Send {
        async move { Ok(Box::new(self.checkout().await?) as Box<dyn Any + Send>) }
    }

    /// Set-up, not under test: fetches the token, then opens `connections` connections and returns
    /// them to the pool, so that what follows does not start with the first fetch and connects (a
    /// busy machine can take longer over them than a test's short pool timeout).
    fn warm(&self, connections: usize) -> impl Future<Output = ()> + Send {
        async move {
            self.token_cache().get().await.expect("the first token");
            let mut held = Vec::with_capacity(connections);
            while held.len() < connections {
                held.push(self.hold().await.expect("a connection while warming up"));
            }
        }
    }

    /// Checks a connection out, runs `sql` and returns the first column of the first row.
    fn query(&self, sql: &'static str) -> impl Future<Output = Result<String, Failure>> + Send {
        async move {
            let mut connection = self.checkout().await?;
            Self::first_value(&mut connection, sql).await
        }
    }

    /// Checks a connection out and checks it is logged in as `role`: the unit of every load.
    fn checkout_as(&self, role: &'static str) -> impl Future<Output = Result<(), String>> + Send {
        async move {
            let user = self
                .query("select current_user")
                .await
                .map_err(|e| e.to_string())?;
            if user == role {
                Ok(())
            } else {
                Err(format!("logged in as {user}"))
            }
        }
    }
}

/// `sql`'s first value through a tokio-postgres client (deadpool's and bb8's connections).
async fn simple_first_value(
    client: &tokio_postgres::Client,
    sql: &'static str,
) -> Result<String, Failure> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| Failure::new(chain(&e), None))?;
    Ok(messages
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default())
}

/// deadpool through `postgres_entra_deadpool::create_pool`, as a user configures it.
#[derive(Clone)]
pub(crate) struct Deadpool(postgres_entra_deadpool::Pool);

impl Deadpool {
    /// The kind of `deadpool_postgres::Config` a user loads from env or serde.
    pub(crate) fn user_config(spec: &PoolSpec) -> deadpool_postgres::Config {
        let mut config = deadpool_postgres::Config::new();
        config.host = Some(spec.host.clone());
        config.hostaddr = spec.hostaddr;
        config.port = Some(spec.port);
        config.dbname = Some(spec.database.clone());
        config.user = spec.user.clone();
        config.ssl_mode = Some(match spec.ssl_mode {
            SslMode::Disable => deadpool_postgres::SslMode::Disable,
            SslMode::Prefer => deadpool_postgres::SslMode::Prefer,
            _ => deadpool_postgres::SslMode::Require,
        });
        config.connect_timeout = Some(Duration::from_secs(10));
        config.manager = Some(ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        });
        let mut pool = PoolConfig::new(spec.max_size);
        pool.timeouts = Timeouts {
            wait: Some(spec.timeout),
            create: Some(spec.timeout),
            recycle: Some(Duration::from_secs(5).min(spec.timeout)),
        };
        config.pool = Some(pool);
        config
    }
}

impl PoolUnderTest for Deadpool {
    type Connection = postgres_entra_deadpool::Object;
    const COUNTS_TIMEOUTS: bool = false;

    async fn build(spec: PoolSpec) -> Result<Self, Error> {
        let options = spec.session_options();
        create_pool(&Self::user_config(&spec), &spec.connector, options).map(Deadpool)
    }

    async fn checkout(&self) -> Result<Self::Connection, Failure> {
        self.0
            .get()
            .await
            .map_err(|error| Failure::new(chain(&error), self.0.manager().explain(&error)))
    }

    async fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> Result<String, Failure> {
        simple_first_value(connection, sql).await
    }

    fn counts(&self) -> Counts {
        deadpool_counts(self.0.status())
    }

    fn token_cache(&self) -> TokenCache {
        self.0.manager().token_cache().clone()
    }
}

/// bb8 with `postgres_entra_bb8::EntraConnectionManager`, checking connections on checkout, its
/// failures explained by the manager.
#[derive(Clone)]
pub(crate) struct Bb8 {
    pool: bb8::Pool<EntraConnectionManager>,
    manager: EntraConnectionManager,
    _observed: Arc<PoolObservation>,
}

impl PoolUnderTest for Bb8 {
    type Connection = bb8::PooledConnection<'static, EntraConnectionManager>;
    const COUNTS_TIMEOUTS: bool = true;

    async fn build(spec: PoolSpec) -> Result<Self, Error> {
        let options = spec.session_options();
        let manager = EntraConnectionManager::new(spec.server_config(), &spec.connector, options)?;
        let pool = bb8_builder(&spec).build(manager.clone()).await?;
        let observed = Arc::new(manager.observe(&pool));
        Ok(Self {
            pool,
            manager,
            _observed: observed,
        })
    }

    async fn checkout(&self) -> Result<Self::Connection, Failure> {
        self.pool
            .get_owned()
            .await
            .map_err(|error| Failure::new(format!("{error:?}"), self.manager.explain(&error)))
    }

    async fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> Result<String, Failure> {
        simple_first_value(connection, sql).await
    }

    fn counts(&self) -> Counts {
        bb8_counts(self.pool.state())
    }

    fn token_cache(&self) -> TokenCache {
        self.manager.token_cache().clone()
    }
}

/// sqlx through `postgres_entra_sqlx::connect_lazy_with`, its failures explained by the pool.
#[derive(Clone)]
pub(crate) struct Sqlx(postgres_entra_sqlx::EntraPgPool);

impl PoolUnderTest for Sqlx {
    type Connection = sqlx::pool::PoolConnection<sqlx::Postgres>;
    const COUNTS_TIMEOUTS: bool = false;
    const COUNTS_PENDING: bool = false;

    async fn build(spec: PoolSpec) -> Result<Self, Error> {
        use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
        if spec.hostaddr.is_some() {
            return Err(postgres_entra::__private::config_error(
                "sqlx has no hostaddr: the host name must resolve",
            ));
        }
        let options = PgConnectOptions::new_without_pgpass()
            .host(&spec.host)
            .port(spec.port)
            .database(&spec.database)
            .username(spec.user.as_deref().unwrap_or(""))
            .ssl_mode(match spec.ssl_mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                _ => PgSslMode::Require,
            });
        // As the README configures sqlx: no idle timeout of its own; its lifetime only when the
        // test asks for an age limit.
        let pool = PgPoolOptions::new()
            .max_connections(spec.max_size as u32)
            .max_lifetime(spec.max_age)
            .idle_timeout(None)
            .acquire_timeout(spec.timeout);
        postgres_entra_sqlx::connect_lazy_with(options, pool, &spec.connector, spec.options)
            .map(Sqlx)
    }

    async fn checkout(&self) -> Result<Self::Connection, Failure> {
        self.0
            .acquire()
            .await
            .map_err(|error| Failure::new(error.to_string(), self.0.explain(&error)))
    }

    async fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> Result<String, Failure> {
        use sqlx::Row;
        let row = sqlx::query(sql)
            .fetch_one(&mut **connection)
            .await
            .map_err(|e| Failure::new(e.to_string(), None))?;
        Ok(row
            .try_get::<String, _>(0)
            .or_else(|_| row.try_get::<i32, _>(0).map(|v| v.to_string()))
            .unwrap_or_default())
    }

    fn counts(&self) -> Counts {
        Counts {
            open: self.0.size() as usize,
            idle: self.0.num_idle(),
        }
    }

    fn token_cache(&self) -> TokenCache {
        self.0.token_cache().clone()
    }
}

/// `sql`'s first value as text through diesel: `sql` is `select <expression>`.
async fn diesel_first_value(
    connection: &mut diesel_async::AsyncPgConnection,
    sql: &'static str,
) -> Result<String, Failure> {
    use diesel_async::RunQueryDsl;
    let expression = sql
        .strip_prefix("select ")
        .expect("a `select <expression>`");
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>(&format!(
        "({expression})::text"
    )))
    .get_result(connection)
    .await
    .map_err(|e| Failure::new(e.to_string(), None))
}

/// bb8's builder for `spec`, as the README configures bb8: the token bound retires connections,
/// not bb8's own lifetime and idle timeout (which close connections whatever the provider's
/// state).
fn bb8_builder<M: bb8::ManageConnection>(spec: &PoolSpec) -> bb8::Builder<M> {
    bb8::Pool::builder()
        .max_size(spec.max_size as u32)
        .connection_timeout(spec.timeout)
        .max_lifetime(None)
        .idle_timeout(None)
        .test_on_check_out(true)
}

/// A deadpool pool's connections, open and idle.
fn deadpool_counts(status: deadpool_postgres::Status) -> Counts {
    Counts {
        open: status.size,
        idle: status.available,
    }
}

/// A bb8 pool's connections, open and idle.
fn bb8_counts(state: bb8::State) -> Counts {
    Counts {
        open: state.connections as usize,
        idle: state.idle_connections as usize,
    }
}

/// diesel-async's deadpool pool of `AsyncPgConnection`s, on `EntraDiesel::manager`.
#[derive(Clone)]
pub(crate) struct DieselDeadpool {
    pool: postgres_entra_diesel::DeadpoolPool,
    entra: EntraDiesel,
    _observed: Arc<postgres_entra_diesel::PoolObservation>,
}

impl PoolUnderTest for DieselDeadpool {
    type Connection =
        diesel_async::pooled_connection::deadpool::Object<diesel_async::AsyncPgConnection>;
    const COUNTS_TIMEOUTS: bool = false;
    const SEES_POOL_LIMIT: bool = false;

    async fn build(spec: PoolSpec) -> Result<Self, Error> {
        let options = spec.session_options();
        let entra = EntraDiesel::new(spec.server_config(), &spec.connector, options)?;
        let pool = postgres_entra_diesel::DeadpoolPool::builder(entra.manager())
            .max_size(spec.max_size)
            .wait_timeout(Some(spec.timeout))
            .create_timeout(Some(spec.timeout))
            .recycle_timeout(Some(Duration::from_secs(5).min(spec.timeout)))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a valid deadpool configuration");
        let observed = Arc::new(entra.observe(&pool));
        Ok(Self {
            pool,
            entra,
            _observed: observed,
        })
    }

    async fn checkout(&self) -> Result<Self::Connection, Failure> {
        self.pool
            .get()
            .await
            .map_err(|error| Failure::new(chain(&error), self.entra.explain(&error)))
    }

    async fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> Result<String, Failure> {
        diesel_first_value(connection, sql).await
    }

    fn counts(&self) -> Counts {
        deadpool_counts(self.pool.status())
    }

    fn token_cache(&self) -> TokenCache {
        self.entra.token_cache().clone()
    }
}

/// A bb8 pool of diesel-async `AsyncPgConnection`s on `EntraDiesel::manager`, checking
/// connections on checkout.
#[derive(Clone)]
pub(crate) struct DieselBb8 {
    pool: postgres_entra_diesel::Bb8Pool,
    entra: EntraDiesel,
    _observed: Arc<postgres_entra_diesel::PoolObservation>,
}

impl PoolUnderTest for DieselBb8 {
    type Connection = bb8::PooledConnection<'static, postgres_entra_diesel::Manager>;
    const COUNTS_TIMEOUTS: bool = true;

    async fn build(spec: PoolSpec) -> Result<Self, Error> {
        let options = spec.session_options();
        let entra = EntraDiesel::new(spec.server_config(), &spec.connector, options)?;
        let pool = bb8_builder(&spec)
            .build(entra.manager())
            .await
            .map_err(|e| postgres_entra::__private::config_error(e.to_string()))?;
        let observed = Arc::new(entra.observe(&pool));
        Ok(Self {
            pool,
            entra,
            _observed: observed,
        })
    }

    async fn checkout(&self) -> Result<Self::Connection, Failure> {
        self.pool
            .get_owned()
            .await
            .map_err(|error| Failure::new(format!("{error:?}"), self.entra.explain(&error)))
    }

    async fn first_value(
        connection: &mut Self::Connection,
        sql: &'static str,
    ) -> Result<String, Failure> {
        diesel_first_value(connection, sql).await
    }

    fn counts(&self) -> Counts {
        bb8_counts(self.pool.state())
    }

    fn token_cache(&self) -> TokenCache {
        self.entra.token_cache().clone()
    }
}
