//! The emulator: a private PostgreSQL cluster that logs Entra principals in with access tokens, plus
//! the mock Entra endpoints that issue those tokens, all on loopback.

use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::entra::{self, APP_SERVICE_PATH};
use crate::faults::{Endpoint, Fault, Faults};
use crate::identity::{self, Identity, IdentityKind};
use crate::issuer::{Issuer, Rejection, TokenOptions};
use crate::pg::{Cluster, SUPERUSER};
use crate::tls::{self, Pki};
use crate::transport::LoopbackTransport;
use crate::{Error, ldap};

/// Database the emulator's roles log in to.
pub const DATABASE: &str = "postgres";
/// Tenant id of the emulated directory.
pub const TENANT_ID: &str = "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68";

/// One login the emulated server checked, as the token verifier saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoginAttempt {
    /// Role the client asked to log in as.
    pub role: String,
    /// `Ok` when the token was accepted, otherwise why it was refused.
    pub outcome: Result<(), Rejection>,
}

/// State shared by the mock endpoints, the LDAP responder and the [`Emulator`] handle.
pub(crate) struct Shared {
    pub(crate) issuer: Issuer,
    pub(crate) faults: Faults,
    pub(crate) identity_header: String,
    identities: RwLock<Vec<Identity>>,
    /// Roles that log in with a fixed password instead of a token (benchmark baselines).
    static_passwords: RwLock<HashMap<String, String>>,
    lifetime_secs: AtomicU64,
    /// How far the mock identity provider's clock is behind ours, in seconds.
    idp_clock_behind_secs: AtomicU64,
    issued: Mutex<Vec<String>>,
    logins: Mutex<Vec<LoginAttempt>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("tenant_id", &self.issuer.tenant_id)
            .field("identities", &self.identities)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn token_lifetime(&self) -> Duration {
        Duration::from_secs(self.lifetime_secs.load(Ordering::SeqCst))
    }

    /// How far the identity provider's clock is behind: absolute times it issues (`exp`, and the
    /// managed-identity endpoints' `expires_on`) are that much earlier.
    pub(crate) fn idp_clock_behind(&self) -> Duration {
        Duration::from_secs(self.idp_clock_behind_secs.load(Ordering::SeqCst))
    }

    pub(crate) fn record_issued(&self, token: &str) {
        self.issued
            .lock()
            .expect("issued lock")
            .push(token.to_owned());
    }

    pub(crate) fn identities(&self) -> Vec<Identity> {
        self.identities.read().expect("identities lock").clone()
    }

    pub(crate) fn identity_by_client_id(
        &self,
        client_id: &str,
        kind: IdentityKind,
    ) -> Option<Identity> {
        self.identities()
            .into_iter()
            .find(|i| i.kind == kind && i.client_id == client_id)
    }

    /// The server-side login check, recorded for tests to inspect.
    pub(crate) fn check_login(&self, role: &str, token: &str) -> Result<(), Rejection> {
        let static_password = self
            .static_passwords
            .read()
            .expect("passwords lock")
            .get(role)
            .cloned();
        let outcome = match static_password {
            Some(password) if password == token => Ok(()),
            Some(_) => Err(Rejection::WrongPassword),
            None => self.check_token(role, token),
        };
        self.logins.lock().expect("logins lock").push(LoginAttempt {
            role: role.to_owned(),
            outcome: outcome.clone(),
        });
        outcome
    }

    fn check_token(&self, role: &str, token: &str) -> Result<(), Rejection> {
        self.issuer.verify_access_token(token).and_then(|claims| {
            let identity = self
                .identities()
                .into_iter()
                .find(|i| i.role_name == role)
                .ok_or(Rejection::UnknownRole)?;
            match claims.get("oid").and_then(|v| v.as_str()) {
                Some(oid) if oid == identity.object_id => Ok(()),
                _ => Err(Rejection::WrongIdentity),
            }
        })
    }
}

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
    /// PostgreSQL cluster, and creates a role for each identity. Blocks for a second or two; callable
    /// from inside or outside a Tokio runtime.
    pub fn start(self) -> Result<Emulator, Error> {
        let pki = Pki::generate()?;
        let mut identities = identity::defaults();
        identities.extend(self.extra_identities);
        let shared = Arc::new(Shared {
            issuer: Issuer::new(TENANT_ID)?,
            faults: Faults::default(),
            identity_header: uuid::Uuid::new_v4().simple().to_string(),
            identities: RwLock::new(identities.clone()),
            static_passwords: RwLock::new(HashMap::new()),
            lifetime_secs: AtomicU64::new(self.token_lifetime.as_secs()),
            idp_clock_behind_secs: AtomicU64::new(0),
            issued: Mutex::new(Vec::new()),
            logins: Mutex::new(Vec::new()),
        });

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

        let cluster = Cluster::start(&pki, ldap_addr.port())?;
        let emulator = Emulator {
            transport: LoopbackTransport::new(http_addr),
            shared,
            cluster: Mutex::new(cluster),
            runtime: Some(runtime),
            http_addr,
            ca_pem: pki.ca_pem,
        };
        for identity in &identities {
            emulator.create_role(identity)?;
        }
        Ok(emulator)
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
    /// Starts an emulator with the default settings (one-hour tokens).
    pub fn start() -> Result<Self, Error> {
        Self::builder().start()
    }

    /// Configures an emulator.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("cluster lock")
    }

    /// Runs `future` on the emulator's own runtime and waits for it, from any context.
    fn run<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime
            .as_ref()
            .expect("emulator runtime")
            .spawn(async move {
                let _ = tx.send(future.await);
            });
        rx.recv().expect("emulator task finished")
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

    fn create_role(&self, identity: &Identity) -> Result<(), Error> {
        let config = self.superuser_config();
        let role = quote_ident(&identity.role_name);
        let comment = format!(
            "Entra principal: kind={:?} oid={} appid={}",
            identity.kind, identity.object_id, identity.client_id
        );
        let sql = format!(
            "CREATE ROLE {role} LOGIN; COMMENT ON ROLE {role} IS {}; GRANT CREATE ON SCHEMA public TO {role};",
            quote_literal(&comment)
        );
        self.run(async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await
        })?;
        Ok(())
    }

    /// Registers a new identity and creates its role.
    pub fn add_identity(&self, identity: Identity) -> Result<(), Error> {
        self.create_role(&identity)?;
        self.shared
            .identities
            .write()
            .expect("identities lock")
            .push(identity);
        Ok(())
    }

    /// Creates a role that logs in with a fixed `password` over the same TLS and LDAP path as
    /// tokens: the baseline for benchmarks ("what if there were no token to fetch").
    pub fn add_password_role(&self, role: &str, password: &str) -> Result<(), Error> {
        let config = self.superuser_config();
        let sql = format!("CREATE ROLE {} LOGIN", quote_ident(role));
        self.run(async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await
        })?;
        self.shared
            .static_passwords
            .write()
            .expect("passwords lock")
            .insert(role.to_owned(), password.to_owned());
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
    pub fn server_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port())
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
    /// same port; the mock endpoints keep running.
    pub fn restart_server(&self) -> Result<(), Error> {
        self.cluster().restart_server()
    }

    /// All registered identities.
    pub fn identities(&self) -> Vec<Identity> {
        self.shared.identities()
    }

    fn first(&self, kind: IdentityKind, wants: impl Fn(&Identity) -> bool) -> Identity {
        self.identities()
            .into_iter()
            .find(|i| i.kind == kind && wants(i))
            .expect("default identities are always registered")
    }

    /// The user (role named by UPN), for tokens minted with [`Emulator::issue_token`].
    pub fn user(&self) -> Identity {
        self.first(IdentityKind::User, |_| true)
    }

    /// The service principal that authenticates with a client secret.
    pub fn service_principal(&self) -> Identity {
        self.first(IdentityKind::ServicePrincipal, |i| {
            i.client_secret.is_some()
        })
    }

    /// The service principal with a federated credential (Kubernetes workload identity).
    pub fn workload_identity(&self) -> Identity {
        self.first(IdentityKind::ServicePrincipal, |i| {
            i.federated_subject.is_some()
        })
    }

    /// The managed identity served by the managed-identity endpoints.
    pub fn managed_identity(&self) -> Identity {
        self.first(IdentityKind::ManagedIdentity, |_| true)
    }

    /// Mints a token for `identity` directly (as Entra would issue one), recording it as issued.
    pub fn issue_token(&self, identity: &Identity, options: TokenOptions) -> Result<String, Error> {
        let token = self
            .shared
            .issuer
            .mint(identity, &options, self.shared.token_lifetime())?;
        self.shared.record_issued(&token);
        Ok(token)
    }

    /// A federated (Kubernetes service-account) token for a workload identity's client assertion.
    pub fn federated_assertion(&self, identity: &Identity) -> Result<String, Error> {
        let subject = identity.federated_subject.as_deref().ok_or_else(|| {
            Error::Setup(format!(
                "{} has no federated credential",
                identity.role_name
            ))
        })?;
        self.shared
            .issuer
            .mint_assertion(subject, Duration::from_secs(3600))
    }

    /// Every access token issued so far, by any path (to search captured output for leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.issued.lock().expect("issued lock").clone()
    }

    /// Every login the server checked so far.
    pub fn logins(&self) -> Vec<LoginAttempt> {
        self.shared.logins.lock().expect("logins lock").clone()
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
                format!("{}{APP_SERVICE_PATH}", self.entra_url()),
            ),
            ("IDENTITY_HEADER", self.shared.identity_header.clone()),
        ]
    }

    /// The transport that sends every azure_identity request to the mock.
    pub fn transport(&self) -> Arc<LoopbackTransport> {
        self.transport.clone()
    }

    /// azure_identity's `ClientSecretCredential` for `identity`, pointed at the mock.
    pub fn client_secret_credential(
        &self,
        identity: &Identity,
    ) -> Result<Arc<ClientSecretCredential>, Error> {
        let secret = identity
            .client_secret
            .clone()
            .ok_or_else(|| Error::Setup(format!("{} has no client secret", identity.role_name)))?;
        Ok(ClientSecretCredential::new(
            TENANT_ID,
            identity.client_id.clone(),
            secret.into(),
            Some(ClientSecretCredentialOptions {
                client_options: self.transport.client_options(),
            }),
        )?)
    }

    /// azure_identity's `WorkloadIdentityCredential` for `identity`, with its federated token written
    /// to a file in the emulator's directory, pointed at the mock.
    pub fn workload_identity_credential(
        &self,
        identity: &Identity,
    ) -> Result<Arc<WorkloadIdentityCredential>, Error> {
        let path = self
            .directory()
            .join(format!("federated-token-{}", identity.client_id));
        std::fs::write(&path, self.federated_assertion(identity)?)?;
        Ok(WorkloadIdentityCredential::new(Some(
            WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: self.transport.client_options(),
                },
                client_id: Some(identity.client_id.clone()),
                tenant_id: Some(TENANT_ID.to_owned()),
                token_file_path: Some(path),
            },
        ))?)
    }

    /// azure_identity's `ManagedIdentityCredential` with the redirecting transport: whichever
    /// endpoint it picks (App Service from the environment, or IMDS), the request lands on the mock.
    pub fn managed_identity_credential(&self) -> Result<Arc<ManagedIdentityCredential>, Error> {
        Ok(ManagedIdentityCredential::new(Some(
            ManagedIdentityCredentialOptions {
                client_options: self.transport.client_options(),
                ..Default::default()
            },
        ))?)
    }

    /// Makes the mock identity provider's clock run `behind` ours from now on: the `exp` of the
    /// tokens it issues, and the `expires_on` the managed-identity endpoints report, move that much
    /// earlier (a token whose lifetime is shorter than the skew arrives already expired).
    pub fn set_idp_clock_behind(&self, behind: Duration) {
        self.shared
            .idp_clock_behind_secs
            .store(behind.as_secs(), Ordering::SeqCst);
    }

    /// Lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared
            .lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::SeqCst);
    }

    /// Requests received by `endpoint` so far (served, faulted or refused).
    pub fn requests(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.requests(endpoint)
    }

    /// Tokens issued by `endpoint` so far.
    pub fn tokens_issued(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.tokens_issued(endpoint)
    }

    /// Requests `endpoint` answered with an injected fault so far.
    pub fn faulted_requests(&self, endpoint: Endpoint) -> u64 {
        self.shared.faults.faulted(endpoint)
    }

    /// Serves `fault` from `endpoint` until cleared.
    pub fn set_fault(&self, endpoint: Endpoint, fault: Fault) {
        self.shared.faults.set_fault(endpoint, Some(fault), None);
    }

    /// Serves `fault` from `endpoint` for `duration` (an outage window), then recovers by itself.
    pub fn set_fault_for(&self, endpoint: Endpoint, fault: Fault, duration: Duration) {
        self.shared
            .faults
            .set_fault(endpoint, Some(fault), Some(duration));
    }

    /// Stops injecting faults at `endpoint`.
    pub fn clear_fault(&self, endpoint: Endpoint) {
        self.shared.faults.set_fault(endpoint, None, None);
    }

    /// Delays every answer from `endpoint` by `latency` (zero: none).
    pub fn set_latency(&self, endpoint: Endpoint, latency: Duration) {
        self.shared.faults.set_latency(endpoint, latency);
    }

    /// Clears faults and latency at every endpoint.
    pub fn heal(&self) {
        for endpoint in Endpoint::ALL {
            self.clear_fault(endpoint);
            self.set_latency(endpoint, Duration::ZERO);
        }
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

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
