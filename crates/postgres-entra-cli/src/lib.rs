//! The `postgres-entra` command-line tool: `doctor` checks every step of an Entra ID login to
//! Azure Database for PostgreSQL and says how to fix the first that fails; `token` prints what a
//! token from the configured credential says (never the token); `exec` runs a tool such as psql
//! or a migration with a fresh token in its environment. The library is the tool's
//! implementation, shared with the repository's examples and tests.

pub mod doctor;
pub mod exec;
pub mod settings;
pub mod tls;

use postgres_entra::{CacheOptions, Cloud, TokenCache, TokenSource};
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::settings::{ChosenCredential, Server};

/// What `postgres-entra token` prints: the claims of a fresh token, never the token.
#[derive(Debug, Clone, Serialize)]
pub struct TokenReport {
    /// The credential, by its readable name.
    pub identity: String,
    /// The scope requested.
    pub scope: String,
    /// `aud`.
    pub audience: Vec<String>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `tid`.
    pub tenant_id: Option<String>,
    /// `oid`.
    pub object_id: Option<String>,
    /// `appid` / `azp`.
    pub app_id: Option<String>,
    /// `idtyp`.
    pub id_type: Option<String>,
    /// `upn`.
    pub upn: Option<String>,
    /// `preferred_username`.
    pub preferred_username: Option<String>,
    /// `unique_name`.
    pub unique_name: Option<String>,
    /// The managed identity's name, from `xms_mirid`.
    pub managed_identity_name: Option<String>,
    /// The PostgreSQL role the token names, and the claim it comes from.
    pub role: Option<(String, &'static str)>,
    /// How many group ids the token carries.
    pub groups: usize,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// Seconds until `exp`.
    pub expires_in_secs: Option<u64>,
}

impl TokenReport {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!("token for {} (scope {})\n", self.identity, self.scope);
        let mut line = |label: &str, value: &Option<String>| {
            if let Some(value) = value {
                out.push_str(&format!("  {label:<20} {value}\n"));
            }
        };
        line("aud", &Some(self.audience.join(", ")));
        line("iss", &self.issuer);
        line("tid", &self.tenant_id);
        line("oid", &self.object_id);
        line("appid", &self.app_id);
        line("idtyp", &self.id_type);
        line("upn", &self.upn);
        line("preferred_username", &self.preferred_username);
        line("unique_name", &self.unique_name);
        line("managed identity", &self.managed_identity_name);
        line(
            "role",
            &Some(match &self.role {
                Some((name, claim)) => format!("{name} (from {claim})"),
                None => "none: an app-only token; set PGUSER to its display name".to_owned(),
            }),
        );
        line("groups", &Some(self.groups.to_string()));
        line(
            "expires in",
            &self
                .expires_in_secs
                .map(|s| format!("{} min {} s", s / 60, s % 60)),
        );
        out
    }
}

/// Fetches a token for `server`'s scope (`--scope`, or the cloud of its host, or the public
/// cloud) and reports its claims.
pub async fn token(server: &Server, credential: ChosenCredential) -> Result<TokenReport, String> {
    let scope = server.scope.clone().unwrap_or_else(|| {
        server
            .host
            .as_deref()
            .map(Cloud::from_host)
            .unwrap_or_default()
            .scope()
            .to_owned()
    });
    let source = credential.source;
    let identity = source.identity();
    let cache = TokenCache::builder(source)
        .scope(scope.clone())
        .options(CacheOptions::default().fetch_timeout(server.timeout))
        .build()
        .map_err(|e| e.to_string())?;
    let token = cache.get().await.map_err(|e| e.to_string())?;
    let claims = token.claims().map_err(|e| e.to_string())?;
    let secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
    Ok(TokenReport {
        identity,
        scope,
        audience: claims.audience().to_vec(),
        issuer: claims.issuer().map(str::to_owned),
        tenant_id: claims.tenant_id().map(str::to_owned),
        object_id: claims.object_id().map(str::to_owned),
        app_id: claims.app_id().map(str::to_owned),
        id_type: claims.id_type().map(str::to_owned),
        upn: claims.upn().map(str::to_owned),
        preferred_username: claims.preferred_username().map(str::to_owned),
        unique_name: claims.unique_name().map(str::to_owned),
        managed_identity_name: claims.managed_identity_name().map(str::to_owned),
        role: claims
            .role_name()
            .map(|(name, claim)| (name.to_owned(), claim)),
        groups: claims.group_count(),
        expires_at: claims.expires_at().and_then(secs),
        expires_in_secs: claims
            .expires_at()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map(|d| d.as_secs()),
    })
}
