//! The emulator: a private PostgreSQL cluster that logs Entra principals in with access tokens, plus
//! the mock Entra endpoints that issue those tokens, all on loopback. This module starts and stops
//! it and says where to connect; [`principals`] holds its identities, roles and credentials, and
//! [`controls`] its fault switches and records.

mod controls;
mod principals;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::identity::{self, Identity};
use crate::issuer::Issuer;
use crate::pg::{Attached, Cluster, Location};
use crate::servers::AzureServer;
use crate::shared::Shared;
use crate::tls::{self, Pki};
use crate::transport::LoopbackTransport;
use crate::{Error, entra, ldap, servers};

/// Database the emulator's roles log in to on a private cluster.
const PRIVATE_DATABASE: &str = "postgres";
/// Ends every other session in the current database.
const END_SESSIONS: &str = "select pg_terminate_backend(pid) from pg_stat_activity \
     where datname = current_database() and pid <> pg_backend_pid()";
/// Whether the `public` schema holds anything (every object in a schema depends on it): tables,
/// functions, types, operators...
const LEFT_OBJECTS: &str = "select exists (select 1 from pg_depend \
     where refclassid = 'pg_namespace'::regclass and refobjid = 'public'::regnamespace)";
/// Resets the settings made for the current database alone (`alter database ... set`, `alter role
/// ... in database ... set`, its connection limit), which outlive the schema.
const RESET_SETTINGS: &str = "do $$ declare setting record; begin \
     execute format('alter database %I connection limit -1', current_database()); \
     for setting in select setrole from pg_db_role_setting where setdatabase = \
         (select oid from pg_database where datname = current_database()) loop \
       if setting.setrole = 0 then \
         execute format('alter database %I reset all', current_database()); \
       else \
         execute format('alter role %I in database %I reset all', \
           (select rolname from pg_roles where oid = setting.setrole), current_database()); \
       end if; \
     end loop; end $$";
/// Tenant id of the emulated directory.
pub const TENANT_ID: &str = "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68";

/// Configures an [`Emulator`] before it starts.
#[derive(Debug, Clone)]
#[must_use]
pub struct EmulatorBuilder {
    token_lifetime: Duration,
    extra_identities: Vec<Identity>,
    private_cluster: bool,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3600),
            extra_identities: Vec::new(),
            private_cluster: false,
        }
    }
}

impl EmulatorBuilder {
    /// Lifetime of issued tokens (whole seconds, at least 1); Entra's are about an hour.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime.max(Duration::from_secs(1));
        self
    }

    /// Registers another identity (and creates its role) besides the default ones.
    pub fn identity(mut self, identity: Identity) -> Self {
        self.extra_identities.push(identity);
        self
    }

    /// Starts a PostgreSQL cluster of its own even when the environment names a shared one
    /// ([`crate::SharedCluster`]): for tests that stop, restart or kill the server, or read its log.
    pub fn private_cluster(mut self) -> Self {
        self.private_cluster = true;
        self
    }

    /// Starts the mock endpoints and the LDAP responder, then a private PostgreSQL cluster with
    /// freshly generated keys and certificates; or, when [`crate::SharedCluster::ENV`] names a
    /// shared cluster (and [`EmulatorBuilder::private_cluster`] was not asked for), takes a free
    /// slot of it (a database of its own) and the run's keys and certificates. Then creates a role
    /// for each identity. Blocks its thread for up to a second or two (a twentieth of a second on a
    /// shared cluster); inside a Tokio runtime prefer [`EmulatorBuilder::start_async`].
    pub fn start(self) -> Result<Emulator, Error> {
        // A slot of the shared cluster, if the environment names one and it has a slot free.
        let slot = if self.private_cluster {
            None
        } else {
            Attached::from_env()?.and_then(|cluster| {
                let claimed = cluster.claim();
                if claimed.is_none() {
                    tracing::info!("emulator: every slot of the shared cluster is taken; starting a private cluster");
                }
                claimed.map(|(database, listener)| (cluster, database, listener))
            })
        };
        let issuer = match &slot {
            Some((cluster, ..)) => {
                let (key, rogue) = cluster.signing_keys()?;
                Issuer::with_keys(TENANT_ID, key, rogue)
            }
            None => Issuer::new(TENANT_ID)?,
        };
        let mut identities = identity::defaults();
        identities.extend(self.extra_identities);
        let shared = Arc::new(Shared::new(issuer, identities.clone(), self.token_lifetime));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("entra-emulator")
            .enable_all()
            .build()?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?;
        // On a shared cluster, the token check listens on the port of the slot it took.
        let (ldap, slot) = match slot {
            Some((cluster, database, listener)) => (listener, Some((cluster, database))),
            None => (std::net::TcpListener::bind("127.0.0.1:0")?, None),
        };
        let http_addr = http.local_addr()?;
        let ldap_addr = ldap.local_addr()?;
        http.set_nonblocking(true)?;
        ldap.set_nonblocking(true)?;
        let router = entra::router(shared.clone());
        runtime.spawn(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(http) {
                let _ = axum::serve(listener, router).await;
            }
        });
        let ldap_shared = shared.clone();
        runtime.spawn(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(ldap) {
                ldap::serve(listener, ldap_shared).await;
            }
        });

        let addresses = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let (server, database, ca_pem) = match slot {
            None => {
                let pki = Pki::generate()?;
                let mut hba = ldap::hba_lines("all", ldap_addr.port()).join("\n");
                hba.push('\n');
                let cluster = Cluster::start(&pki, &addresses, &hba)?;
                let server = Server::Private(Mutex::new(cluster));
                (server, PRIVATE_DATABASE.to_owned(), pki.ca_pem)
            }
            Some((cluster, database)) => {
                let ca_pem = std::fs::read_to_string(cluster.location().ca_path())?;
                let dir = tempfile::Builder::new()
                    .prefix(crate::pg::DIR_PREFIX)
                    .tempdir()?;
                let server = Server::Shared { cluster, dir };
                (server, database, ca_pem)
            }
        };
        let port = server.location().port();
        let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let mut server_ports = HashMap::new();
        server_ports.insert(AzureServer::Public, port);
        for server in AzureServer::ALL
            .into_iter()
            .filter(|s| *s != AzureServer::Public)
        {
            let listener = std::net::TcpListener::bind((server.address(), 0))?;
            listener.set_nonblocking(true)?;
            server_ports.insert(server, listener.local_addr()?.port());
            runtime.spawn(async move {
                if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                    servers::forward(listener, server.address(), target).await;
                }
            });
        }
        let emulator = Emulator {
            transport: LoopbackTransport::new(http_addr),
            shared,
            server,
            database,
            runtime: Some(runtime),
            http_addr,
            ca_pem,
            server_ports,
        };
        let roles: String = identities.iter().map(principals::role_sql).collect();
        emulator.prepare_database(roles)?;
        Ok(emulator)
    }

    /// [`EmulatorBuilder::start`] on Tokio's blocking pool, so that no runtime thread waits for
    /// PostgreSQL to start.
    pub async fn start_async(self) -> Result<Emulator, Error> {
        tokio::task::spawn_blocking(move || self.start())
            .await
            .map_err(|e| Error::Setup(format!("the emulator's start-up task failed: {e}")))?
    }
}

/// Where an emulator's database lives.
#[derive(Debug)]
enum Server {
    /// A cluster of its own.
    Private(Mutex<Cluster>),
    /// A slot of a test run's shared cluster: its database and the port its logins' LDAP binds go
    /// to; its files (federated tokens) in `dir`.
    Shared {
        cluster: Attached,
        dir: tempfile::TempDir,
    },
}

impl Server {
    fn location(&self) -> Location {
        match self {
            Self::Private(cluster) => cluster.lock().expect("cluster lock").location(),
            Self::Shared { cluster, .. } => cluster.location().clone(),
        }
    }
}

/// A running local emulator of Azure Database for PostgreSQL with Entra ID login.
///
/// Dropping it stops its server and removes its files (on a shared cluster: ends the sessions in its
/// database and frees its slot).
pub struct Emulator {
    shared: Arc<Shared>,
    server: Server,
    database: String,
    runtime: Option<tokio::runtime::Runtime>,
    http_addr: SocketAddr,
    ca_pem: String,
    transport: Arc<LoopbackTransport>,
    /// The port each Azure name is reached on (the public one is PostgreSQL's own).
    server_ports: HashMap<AzureServer, u16>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("port", &self.port())
            .field("http", &self.http_addr)
            .field("tenant_id", &TENANT_ID)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts an emulator with the default settings (one-hour tokens); see
    /// [`EmulatorBuilder::start`].
    pub fn start() -> Result<Self, Error> {
        Self::builder().start()
    }

    /// Starts an emulator with the default settings without blocking a runtime thread.
    pub async fn start_async() -> Result<Self, Error> {
        Self::builder().start_async().await
    }

    /// Configures an emulator.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }

    /// The superuser's settings for the emulator's database, over the cluster's private socket.
    fn superuser_config(&self) -> tokio_postgres::Config {
        self.server.location().superuser_config(&self.database)
    }

    /// Runs `task` on the emulator's own runtime, blocking this thread: for start-up and drop,
    /// which block anyway.
    fn block_on<T: Send + 'static>(
        &self,
        task: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime
            .as_ref()
            .expect("emulator runtime")
            .spawn(async move {
                let _ = tx.send(task.await);
            });
        rx.recv()
            .map_err(|_| Error::Setup("the emulator's runtime stopped".into()))?
    }

    /// Creates the roles (`roles`, SQL; roles belong to the whole cluster, and on a shared one
    /// some exist already). On a shared cluster, first ends the sessions the slot's last emulator
    /// left, resets the settings it made for the database and, should it have left objects in
    /// the database, drops them.
    fn prepare_database(&self, roles: String) -> Result<(), Error> {
        let own = self.superuser_config();
        let shared = matches!(self.server, Server::Shared { .. });
        self.block_on(async move {
            let (client, connection) = own.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            if shared {
                client.batch_execute(END_SESSIONS).await?;
                client.batch_execute(RESET_SETTINGS).await?;
                let left: bool = client.query_one(LEFT_OBJECTS, &[]).await?.get(0);
                if left {
                    client
                        .batch_execute(
                            "DROP SCHEMA public CASCADE; CREATE SCHEMA public AUTHORIZATION pg_database_owner",
                        )
                        .await?;
                }
            }
            Ok(client.batch_execute(&roles).await?)
        })
    }

    /// Ends the sessions in the emulator's database: on a shared cluster, what a private cluster's
    /// stop does, before the slot is freed.
    fn end_sessions(&self) -> Result<(), Error> {
        let own = self.superuser_config();
        self.block_on(async move {
            let (client, connection) = own.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok(client.batch_execute(END_SESSIONS).await?)
        })
    }

    /// Runs `sql` as the superuser, driven by the caller's runtime.
    async fn execute(&self, sql: &str) -> Result<(), Error> {
        self.admin_client().await?.batch_execute(sql).await?;
        Ok(())
    }

    /// A superuser connection over the private socket, driven by the caller's runtime (for
    /// inspecting or killing sessions in tests).
    pub async fn admin_client(&self) -> Result<tokio_postgres::Client, Error> {
        let (client, connection) = self
            .superuser_config()
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// The backend process ids of the client sessions logged in as `role` to the emulator's
    /// database now (`pg_stat_activity`).
    pub async fn sessions_of(&self, role: &str) -> Result<Vec<i32>, Error> {
        let rows = self
            .admin_client()
            .await?
            .query(
                "select pid from pg_stat_activity where usename = $1 and datname = current_database() \
                 and backend_type = 'client backend' order by pid",
                &[&role],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Ends every session logged in as `role` to the emulator's database, server-side (as an
    /// administrator's `pg_terminate_backend` would); returns how many there were.
    pub async fn terminate_sessions_of(&self, role: &str) -> Result<usize, Error> {
        let rows = self
            .admin_client()
            .await?
            .query(
                "select pg_terminate_backend(pid) from pg_stat_activity where usename = $1 \
                 and datname = current_database() and backend_type = 'client backend'",
                &[&role],
            )
            .await?;
        Ok(rows.len())
    }

    /// Host name clients use (matches the server certificate).
    pub fn host(&self) -> &'static str {
        "localhost"
    }

    /// TCP port of the PostgreSQL server.
    pub fn port(&self) -> u16 {
        self.server.location().port()
    }

    /// Database name to connect to: `postgres` on a private cluster, one of the emulator's own on
    /// a shared one.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA certificate file, for `PGSSLROOTCERT` or a client's CA-file option.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.server.location().ca_path()
    }

    /// A rustls client configuration that trusts the emulator's CA (full verification).
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, Error> {
        tls::client_config(&self.ca_pem)
    }

    /// A tokio-postgres TLS connector that trusts the emulator's CA.
    pub fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.tls_config()?,
        ))
    }

    /// Connection settings for `role`, TLS required; the caller adds the token as password.
    pub fn pg_config(&self, role: &str) -> tokio_postgres::Config {
        let mut config = self.server_config();
        config.user(role);
        config
    }

    /// Connection settings without a user, for a connector that decides the role; TLS required.
    /// The server is reached as `localhost`, and plays Azure Database for PostgreSQL in the public
    /// cloud; [`Emulator::server_config_for`] reaches it under another Azure name.
    pub fn server_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config.host(self.host());
        self.with_server_settings(config)
    }

    /// Connection settings for `server`: its Azure name (for TLS and the cloud) and the loopback
    /// address that plays it (`hostaddr`); no user; TLS required.
    pub fn server_config_for(&self, server: AzureServer) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        let port = match server {
            AzureServer::Public => self.port(),
            other => self.server_ports[&other],
        };
        config
            .host(server.host_name())
            .hostaddr(server.address())
            .port(port);
        self.with_server_settings(config)
    }

    fn with_server_settings(&self, mut config: tokio_postgres::Config) -> tokio_postgres::Config {
        if config.get_ports().is_empty() {
            config.port(self.port());
        }
        config
            .dbname(&self.database)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The emulator's own directory: on a private cluster the one holding the cluster, its
    /// socket, log and CA file; on a shared one, a directory for the emulator's files alone.
    pub fn directory(&self) -> PathBuf {
        match &self.server {
            Server::Private(cluster) => {
                cluster.lock().expect("cluster lock").directory().to_owned()
            }
            Server::Shared { dir, .. } => dir.path().to_owned(),
        }
    }

    /// Process id of the postmaster of a private cluster (`None` on a shared one).
    pub fn server_pid(&self) -> Option<u32> {
        match &self.server {
            Server::Private(cluster) => cluster.lock().expect("cluster lock").server_pid(),
            Server::Shared { .. } => None,
        }
    }

    /// What the server wrote to its log so far (a shared cluster's log holds every emulator's).
    pub fn server_log(&self) -> String {
        self.server.location().log()
    }

    /// Stops the PostgreSQL server (fast shutdown, clients disconnected) and starts it again on the
    /// same port; the mock endpoints keep running. Blocks its thread while the server restarts.
    /// Only on a private cluster ([`EmulatorBuilder::private_cluster`]).
    pub fn restart_server(&self) -> Result<(), Error> {
        match &self.server {
            Server::Private(cluster) => cluster.lock().expect("cluster lock").restart_server(),
            Server::Shared { .. } => Err(Error::Setup(
                "restarting the server needs a cluster of the emulator's own: build it with \
                 `private_cluster()` (this one has a database on the test run's shared cluster)"
                    .into(),
            )),
        }
    }

    /// Tenant id of the emulated directory.
    pub fn tenant_id(&self) -> &'static str {
        TENANT_ID
    }

    /// Base URL of the mock Entra endpoints (`http://127.0.0.1:PORT`).
    pub fn entra_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// URL of the mock v2.0 token endpoint for the emulated tenant.
    pub fn token_url(&self) -> String {
        format!("{}/{TENANT_ID}/oauth2/v2.0/token", self.entra_url())
    }

    /// The App Service managed-identity environment: `IDENTITY_ENDPOINT` and `IDENTITY_HEADER`.
    pub fn app_service_env(&self) -> [(&'static str, String); 2] {
        [
            (
                "IDENTITY_ENDPOINT",
                format!("{}{}", self.entra_url(), entra::APP_SERVICE_PATH),
            ),
            ("IDENTITY_HEADER", self.shared.identity_header.clone()),
        ]
    }

    /// The transport that sends every azure_identity request to the mock.
    pub fn transport(&self) -> Arc<LoopbackTransport> {
        self.transport.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        match &mut self.server {
            Server::Private(cluster) => {
                if let Ok(cluster) = cluster.get_mut() {
                    cluster.stop_server();
                }
            }
            Server::Shared { .. } => {
                if let Err(e) = self.end_sessions() {
                    tracing::warn!("emulator: could not end the sessions in its database: {e}");
                }
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
