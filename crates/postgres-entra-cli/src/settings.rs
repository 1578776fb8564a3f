//! What the tool (and the examples) read from the environment: the server (`PG*`) and the
//! credential (`AZURE_*`, `IDENTITY_*`), chosen as the README documents.

use postgres_entra::{
    AzureTokenSource, CacheOptions, EntraConnector, EnvCredential, Error, TlsRoots,
};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where to connect: libpq's variables, or the flags that override them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// `PGHOST`: the server's name (the certificate must name it).
    pub host: Option<String>,
    /// `PGHOSTADDR`: an address to reach the host at (e.g. a private endpoint's).
    pub hostaddr: Option<IpAddr>,
    /// `PGPORT` (5432).
    pub port: u16,
    /// `PGDATABASE` (postgres).
    pub dbname: String,
    /// `PGUSER`: the role, when not taken from the token.
    pub user: Option<String>,
    /// `PGSSLROOTCERT`: a CA file to trust instead of the Azure roots.
    pub sslrootcert: Option<PathBuf>,
    /// A token scope instead of the one the host's cloud implies.
    pub scope: Option<String>,
    /// How long each network step and the token request may take.
    pub timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            host: None,
            hostaddr: None,
            port: 5432,
            dbname: "postgres".to_owned(),
            user: None,
            sslrootcert: None,
            scope: None,
            timeout: Duration::from_secs(15),
        }
    }
}

/// A variable's value, with an empty one taken as unset (as libpq takes it).
fn set(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The server settings given as flags, each overriding its libpq variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerFlags {
    /// `--host`, else `PGHOST`.
    pub host: Option<String>,
    /// `--hostaddr`, else `PGHOSTADDR`.
    pub hostaddr: Option<String>,
    /// `--port`, else `PGPORT`.
    pub port: Option<String>,
    /// `--dbname`, else `PGDATABASE`.
    pub dbname: Option<String>,
    /// `--user`, else `PGUSER`.
    pub user: Option<String>,
    /// `--sslrootcert`, else `PGSSLROOTCERT`.
    pub sslrootcert: Option<PathBuf>,
    /// `--scope`.
    pub scope: Option<String>,
    /// `--timeout`, in seconds.
    pub timeout: Option<u64>,
}

impl Server {
    /// `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGSSLROOTCERT`.
    pub fn from_env() -> Result<Self, String> {
        Self::resolve(ServerFlags::default())
    }

    /// The server `flags` name, each setting not given as a flag taken from its libpq variable
    /// (an empty one is unset, as libpq takes it), checked: one port number, one IP address for
    /// the host's address, no NUL in any name.
    pub fn resolve(flags: ServerFlags) -> Result<Self, String> {
        let given =
            |flag: Option<String>, name: &str| flag.filter(|v| !v.is_empty()).or_else(|| set(name));
        let mut server = Self {
            host: given(flags.host, "PGHOST"),
            user: given(flags.user, "PGUSER"),
            sslrootcert: flags
                .sslrootcert
                .filter(|p| !p.as_os_str().is_empty())
                .or_else(|| set("PGSSLROOTCERT").map(PathBuf::from)),
            scope: flags.scope.filter(|s| !s.is_empty()),
            ..Self::default()
        };
        if let Some(address) = given(flags.hostaddr, "PGHOSTADDR") {
            server.hostaddr = Some(address.trim().parse().map_err(|e| {
                format!("PGHOSTADDR (or --hostaddr) `{address}` is not one IP address: {e}")
            })?);
        }
        if let Some(port) = given(flags.port, "PGPORT") {
            server.port = port
                .trim()
                .parse()
                .map_err(|e| format!("PGPORT (or --port) `{port}` is not one port number: {e}"))?;
        }
        if let Some(dbname) = given(flags.dbname, "PGDATABASE") {
            server.dbname = dbname;
        }
        if let Some(timeout) = flags.timeout {
            server.timeout = Duration::from_secs(timeout.max(1));
        }
        let names = [
            ("the host", server.host.as_deref()),
            ("the database", Some(server.dbname.as_str())),
            ("the user", server.user.as_deref()),
        ];
        if let Some((what, _)) = names
            .iter()
            .find(|(_, value)| value.is_some_and(|v| v.contains('\0')))
        {
            return Err(format!("{what} contains a NUL character"));
        }
        Ok(server)
    }

    /// The roots to trust: `PGSSLROOTCERT`'s, or the Azure roots.
    pub fn tls_roots(&self) -> TlsRoots {
        match &self.sslrootcert {
            Some(path) => TlsRoots::CaFile(path.clone()),
            None => TlsRoots::Azure,
        }
    }

    /// The connector the library would log in to this server with: `source`'s tokens (for
    /// `--scope`, else the scope of the host's cloud), the hosts `POSTGRES_ENTRA_ALLOWED_HOSTS`
    /// allows, the roots to trust.
    pub fn connector(&self, source: Arc<AzureTokenSource>) -> Result<EntraConnector, Error> {
        let mut builder = EntraConnector::builder(source)
            .allow_hosts_from_env()
            .tls_roots(self.tls_roots())
            .cache_options(CacheOptions::default().fetch_timeout(self.timeout));
        if let Some(scope) = &self.scope {
            builder = builder.scope(scope.clone());
        }
        builder.build()
    }

    /// The connection settings for tokio-postgres (TLS required; the token is added at connect).
    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        if let Some(host) = &self.host {
            config.host(host);
        }
        if let Some(address) = self.hostaddr {
            config.hostaddr(address);
        }
        config
            .port(self.port)
            .dbname(&self.dbname)
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(self.timeout);
        if let Some(user) = &self.user {
            config.user(user);
        }
        config
    }
}

/// Which kind of credential to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// `ClientSecretCredential`: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`.
    ClientSecret,
    /// `WorkloadIdentityCredential` (AKS): `AZURE_FEDERATED_TOKEN_FILE`, tenant and client id.
    WorkloadIdentity,
    /// `ManagedIdentityCredential`: App Service's `IDENTITY_ENDPOINT`, or IMDS on a VM;
    /// `AZURE_CLIENT_ID` picks a user-assigned identity.
    ManagedIdentity,
    /// `DeveloperToolsCredential`: `az login` or `azd auth login`.
    DeveloperTools,
}

/// The credential the environment chose, and why.
pub struct ChosenCredential {
    /// The token source over the credential, built as the library recommends (retries left to
    /// the token cache).
    pub source: Arc<AzureTokenSource>,
    /// Its kind.
    pub kind: CredentialKind,
    /// Why this one: which variables decided.
    pub reason: String,
    /// The credential variables that are set (names only).
    pub seen: Vec<&'static str>,
}

impl std::fmt::Debug for ChosenCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChosenCredential")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// The credential the environment names, by the library's rules
/// (`postgres_entra::EnvCredential`, as `AzureTokenSource::from_env` chooses); `force` picks the
/// kind instead, as `AZURE_TOKEN_CREDENTIALS` would.
pub fn credential_from_env(force: Option<CredentialKind>) -> Result<ChosenCredential, String> {
    let forced = force.map(|kind| match kind {
        CredentialKind::ClientSecret => "EnvironmentCredential",
        CredentialKind::WorkloadIdentity => "WorkloadIdentityCredential",
        CredentialKind::ManagedIdentity => "ManagedIdentityCredential",
        CredentialKind::DeveloperTools => "dev",
    });
    let chosen = EnvCredential::choose_from(|name| match (name, forced) {
        ("AZURE_TOKEN_CREDENTIALS", Some(value)) => Some(value.to_owned()),
        _ => std::env::var(name).ok(),
    })
    .map_err(|e| e.to_string())?;
    let kind = match chosen.kind() {
        postgres_entra::CredentialKind::ClientSecret => CredentialKind::ClientSecret,
        postgres_entra::CredentialKind::WorkloadIdentity => CredentialKind::WorkloadIdentity,
        postgres_entra::CredentialKind::ManagedIdentity => CredentialKind::ManagedIdentity,
        _ => CredentialKind::DeveloperTools,
    };
    let source = chosen
        .token_source()
        .map_err(|e| format!("{kind:?} credential: {e}"))?;
    Ok(ChosenCredential {
        source: Arc::new(source),
        kind,
        reason: match force {
            Some(_) => "chosen with --credential".to_owned(),
            None => chosen.reason().to_owned(),
        },
        seen: chosen.variables_set().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the flags (or the variables they stand for) hold, resolving them is an answer or
    /// an error saying which setting, never a panic, and a resolved port is the one given.
    #[test]
    fn any_settings_resolve_to_a_server_or_an_error_never_a_panic() {
        let alphabet: Vec<char> = "0123456789:.,/@?# -abcxyz\0é".chars().collect();
        let mut rng = fastrand::Rng::with_seed(0x5e77);
        let word = |rng: &mut fastrand::Rng| -> String {
            (0..rng.usize(1..12))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect()
        };
        for _ in 0..10_000 {
            let flags = ServerFlags {
                host: Some(word(&mut rng)),
                hostaddr: Some(word(&mut rng)),
                port: Some(word(&mut rng)),
                dbname: Some(word(&mut rng)),
                user: Some(word(&mut rng)),
                sslrootcert: None,
                scope: None,
                timeout: Some(rng.u64(..100)),
            };
            match Server::resolve(flags.clone()) {
                Ok(server) => {
                    let port = flags.port.as_deref().unwrap().trim().parse::<u16>();
                    assert_eq!(Ok(server.port), port, "{flags:?}");
                    assert!(!server.dbname.contains('\0'));
                }
                Err(why) => assert!(
                    ["PGHOSTADDR", "PGPORT", "NUL"]
                        .iter()
                        .any(|s| why.contains(s)),
                    "{why}"
                ),
            }
        }
    }
}
