//! The state the mock Entra endpoints, the LDAP responder and the [`crate::Emulator`] handle
//! share, and the login check the emulated server runs: everything the server and the identity
//! provider agree on, in one place that depends on neither.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::faults::Faults;
use crate::identity::{Identity, IdentityKind};
use crate::issuer::{Issuer, Rejection};
use crate::servers::AzureServer;

/// One login the emulated server checked, as the token verifier saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoginAttempt {
    /// Role the client asked to log in as.
    pub role: String,
    /// `Ok` when the token was accepted, otherwise why it was refused.
    pub outcome: Result<(), Rejection>,
    /// When the server checked it.
    pub at: std::time::Instant,
}

/// State shared by the mock endpoints, the LDAP responder and the emulator handle.
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
    platform_cache: Mutex<PlatformCache>,
}

/// The managed-identity endpoints' own cache, when switched on: the token last issued for an
/// identity and resource, handed out again until less than `renew_within` of its life is left.
#[derive(Default)]
struct PlatformCache {
    renew_within: Option<Duration>,
    /// (client id, resource) → (token, expiry in unix seconds).
    held: HashMap<(String, String), (String, i64)>,
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
    pub(crate) fn new(issuer: Issuer, identities: Vec<Identity>, token_lifetime: Duration) -> Self {
        Self {
            issuer,
            faults: Faults::default(),
            identity_header: uuid::Uuid::new_v4().simple().to_string(),
            identities: RwLock::new(identities),
            static_passwords: RwLock::new(HashMap::new()),
            lifetime_secs: AtomicU64::new(token_lifetime.as_secs()),
            idp_clock_behind_secs: AtomicU64::new(0),
            issued: Mutex::new(Vec::new()),
            logins: Mutex::new(Vec::new()),
            platform_cache: Mutex::default(),
        }
    }

    pub(crate) fn set_platform_cache(&self, renew_within: Option<Duration>) {
        let mut cache = self.platform_cache.lock().expect("platform cache lock");
        cache.renew_within = renew_within;
        cache.held.clear();
    }

    /// The token the managed-identity endpoints' cache holds for `client_id` and `resource`, with
    /// its expiry (unix seconds), if the cache is on and the token is not due for renewal at `now`.
    pub(crate) fn platform_cached(
        &self,
        client_id: &str,
        resource: &str,
        now: i64,
    ) -> Option<(String, i64)> {
        let cache = self.platform_cache.lock().expect("platform cache lock");
        let renew_within = cache.renew_within?;
        let (token, expires) = cache
            .held
            .get(&(client_id.to_owned(), resource.to_owned()))?;
        (*expires - now > renew_within.as_secs() as i64).then(|| (token.clone(), *expires))
    }

    /// Keeps `token` in the managed-identity endpoints' cache, when it is on.
    pub(crate) fn platform_keep(&self, client_id: &str, resource: &str, token: &str, expires: i64) {
        let mut cache = self.platform_cache.lock().expect("platform cache lock");
        if cache.renew_within.is_some() {
            cache.held.insert(
                (client_id.to_owned(), resource.to_owned()),
                (token.to_owned(), expires),
            );
        }
    }

    pub(crate) fn token_lifetime(&self) -> Duration {
        Duration::from_secs(self.lifetime_secs.load(Ordering::SeqCst))
    }

    pub(crate) fn set_token_lifetime(&self, lifetime: Duration) {
        self.lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::SeqCst);
    }

    /// How far the identity provider's clock is behind: absolute times it issues (`exp`, and the
    /// managed-identity endpoints' `expires_on`) are that much earlier.
    pub(crate) fn idp_clock_behind(&self) -> Duration {
        Duration::from_secs(self.idp_clock_behind_secs.load(Ordering::SeqCst))
    }

    pub(crate) fn set_idp_clock_behind(&self, behind: Duration) {
        self.idp_clock_behind_secs
            .store(behind.as_secs(), Ordering::SeqCst);
    }

    pub(crate) fn record_issued(&self, token: &str) {
        self.issued
            .lock()
            .expect("issued lock")
            .push(token.to_owned());
    }

    pub(crate) fn issued(&self) -> Vec<String> {
        self.issued.lock().expect("issued lock").clone()
    }

    pub(crate) fn logins(&self) -> Vec<LoginAttempt> {
        self.logins.lock().expect("logins lock").clone()
    }

    pub(crate) fn identities(&self) -> Vec<Identity> {
        self.identities.read().expect("identities lock").clone()
    }

    pub(crate) fn add_identity(&self, identity: Identity) {
        self.identities
            .write()
            .expect("identities lock")
            .push(identity);
    }

    pub(crate) fn add_static_password(&self, role: &str, password: &str) {
        self.static_passwords
            .write()
            .expect("passwords lock")
            .insert(role.to_owned(), password.to_owned());
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

    /// The server-side login check for a login to `server`, recorded for tests to inspect.
    pub(crate) fn check_login(
        &self,
        role: &str,
        token: &str,
        server: AzureServer,
    ) -> Result<(), Rejection> {
        let static_password = self
            .static_passwords
            .read()
            .expect("passwords lock")
            .get(role)
            .cloned();
        let outcome = match static_password {
            Some(password) if password == token => Ok(()),
            Some(_) => Err(Rejection::WrongPassword),
            None => self.check_token(role, token, server),
        };
        self.logins.lock().expect("logins lock").push(LoginAttempt {
            role: role.to_owned(),
            outcome: outcome.clone(),
            at: std::time::Instant::now(),
        });
        outcome
    }

    /// As Azure matches a token to a role: by object id, or, for a group's role, by the token's
    /// object id being a member of the group.
    fn check_token(&self, role: &str, token: &str, server: AzureServer) -> Result<(), Rejection> {
        let claims = self.issuer.verify_access_token(token, server.audience())?;
        let identity = self
            .identities()
            .into_iter()
            .find(|i| i.role_name == role)
            .ok_or(Rejection::UnknownRole)?;
        // A disabled principal's unexpired tokens still log in, as on Azure (Microsoft Learn:
        // "The deleted Microsoft Entra user can still sign in until the token expires"); the
        // identity provider refuses it new ones.
        let oid = claims.get("oid").and_then(|v| v.as_str());
        match (identity.kind, oid) {
            (IdentityKind::Group, Some(oid)) if identity.members.iter().any(|m| m == oid) => Ok(()),
            (IdentityKind::Group, _) => Err(Rejection::NotAMember),
            (_, Some(oid)) if oid == identity.object_id => Ok(()),
            _ => Err(Rejection::WrongIdentity),
        }
    }

    /// Changes the registered identity whose role is `role`; false if there is none.
    pub(crate) fn update_identity(&self, role: &str, change: impl FnOnce(&mut Identity)) -> bool {
        let mut identities = self.identities.write().expect("identities lock");
        match identities.iter_mut().find(|i| i.role_name == role) {
            Some(identity) => {
                change(identity);
                true
            }
            None => false,
        }
    }
}
