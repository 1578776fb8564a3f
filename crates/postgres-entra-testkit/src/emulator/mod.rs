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
use crate::pg::{Cluster, SUPERUSER};
use crate::servers::AzureServer;
use crate::shared::Shared;
use crate::tls::{self, Pki};
use crate::transport::LoopbackTransport;
use crate::{Error, entra, ldap, servers};

/// Database the emulator's roles log in to.
pub const DATABASE: &str = "postgres";
/// Tenant id of the emulated directory.
pub const TENANT_ID: &str = "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68";

/// Configures an [`Emulator`] before it starts.
#[derive(Debug, Clone)]
#[must_use]
pub struct EmulatorBuilder {
    token_lifetime: Duration,
    extra_identities: Vec<Identity>,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3600),
            extra_identities: Vec::new(),
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

    /// Generates keys and certificates, starts the mock endpoints, the LDAP responder and a private
    /// PostgreSQL cluster, and creates a role for each identity. Blocks its thread for a second or
    /// two; inside a Tokio runtime prefer [`EmulatorBuilder::start_async`].
    pub fn start(self) -> Result<Emulator, Error> {
        let pki = Pki::generate()?;
        let mut identities = identity::defaults();
        identities.extend(self.extra_identities);
        let shared = Arc::new(Shared::new(
            Issuer::new(TENANT_ID)?,
            identities.clone(),
            self.token_lifetime,
        ));

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("entra-emulator")
            .enable_all()
            .build()?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ldap = std::net::TcpListener::bind("127.0.0.1:0")?;
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
        let cluster = Cluster::start(&pki, &addresses, &ldap::hba_lines(ldap_addr.port()))?;
        let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), cluster.port());
        let mut server_ports = HashMap::new();
        server_ports.insert(AzureServer::Public, cluster.port());
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
            cluster: Mutex::new(cluster),
            runtime: Some(runtime),
            http_addr,
            ca_pem: pki.ca_pem,
            server_ports,
        };
        let sql: String = identities.iter().map(principals::role_sql).collect();
        emulator.execute_blocking(sql)?;
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

/// A running local emulator of Azure Database for PostgreSQL with Entra ID login.
///
/// Dropping it stops the server and removes its files.
pub struct Emulator {
    shared: Arc<Shared>,
    cluster: Mutex<Cluster>,
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

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("cluster lock")
    }

    fn superuser_config(&self) -> tokio_postgres::Config {
        let cluster = self.cluster();
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(cluster.socket_dir())
            .port(cluster.port())
            .user(SUPERUSER)
            .dbname(DATABASE);
        config
    }

    /// Runs `sql` as the superuser on the emulator's own runtime, blocking this thread: for
    /// start-up, which blocks anyway.
    fn execute_blocking(&self, sql: String) -> Result<(), Error> {
        let config = self.superuser_config();
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime
            .as_ref()
            .expect("emulator runtime")
            .spawn(async move {
                let result = async {
                    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(connection);
                    client.batch_execute(&sql).await
                }
                .await;
                let _ = tx.send(result);
            });
        rx.recv()
            .map_err(|_| Error::Setup("the emulator's runtime stopped".into()))??;
        Ok(())
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

    /// The backend process ids of the client sessions logged in as `role` now
    /// (`pg_stat_activity`).
    pub async fn sessions_of(&self, role: &str) -> Result<Vec<i32>, Error> {
        let rows = self
            .admin_client()
            .await?
            .query(
                "select pid from pg_stat_activity where usename = $1 and backend_type = 'client backend' order by pid",
                &[&role],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Host name clients use (matches the server certificate).
    pub fn host(&self) -> &'static str {
        "localhost"
    }

    /// TCP port of the PostgreSQL server.
    pub fn port(&self) -> u16 {
        self.cluster().port()
    }

    /// Database name to connect to.
    pub fn database(&self) -> &'static str {
        DATABASE
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA certificate file, for `PGSSLROOTCERT` or a client's CA-file option.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.cluster().ca_path()
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
            .dbname(DATABASE)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// The directory holding the cluster, its socket, log and CA file.
    pub fn directory(&self) -> PathBuf {
        self.cluster().directory().to_owned()
    }

    /// Process id of the postmaster.
    pub fn server_pid(&self) -> Option<u32> {
        self.cluster().server_pid()
    }

    /// What the server wrote to its log so far.
    pub fn server_log(&self) -> String {
        self.cluster().log()
    }

    /// Stops the PostgreSQL server (fast shutdown, clients disconnected) and starts it again on the
    /// same port; the mock endpoints keep running. Blocks its thread while the server restarts.
    pub fn restart_server(&self) -> Result<(), Error> {
        self.cluster().restart_server()
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
        if let Ok(cluster) = self.cluster.get_mut() {
            cluster.stop_server();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
