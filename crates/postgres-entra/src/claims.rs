//! What an access token says about its principal, read from its claims without checking the
//! signature (the server does that): the role name to log in as, and the names and ids that
//! explain a refused login.
//!
//! Azure Database for PostgreSQL names a principal's role after its user principal name (users)
//! or its display name (service principals, managed identities, groups), and matches the token to
//! the role by object id (Microsoft Learn: "Manage Microsoft Entra roles", `pgaadauth_create_principal`).
//! Only some of those names travel in the token, so the role is taken, in this order, from:
//!
//! 1. `xms_mirid`: a managed identity's resource id; its last segment is the identity's name;
//! 2. `upn`, 3. `preferred_username`, 4. `unique_name`: a user's principal name.
//!
//! An app-only token (service principal) carries none of these: its display name is not in the
//! token, and the `appid` GUID is not the role's name, so the role must be configured.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Tokens longer than this are refused without parsing; real Entra tokens stay well under 8 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why no role name could be read from a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoleNameError {
    /// The token is not three base64url parts separated by dots.
    #[error(
        "the access token is not a JWT, so no role name can be read from it; set the role name explicitly"
    )]
    NotAJwt,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("the access token is implausibly long ({0} bytes); set the role name explicitly")]
    TooLong(usize),
    /// The claims are not base64url-encoded JSON.
    #[error(
        "the access token's claims are not valid base64url JSON ({0}); set the role name explicitly"
    )]
    BadClaims(String),
    /// An app-only token (service principal): its display name is not in the token.
    #[error(
        "the access token is app-only (service principal, appid {appid}) and carries no role name; \
         set the role name to the service principal's display name, as created in PostgreSQL"
    )]
    AppOnly {
        /// The application id in the token, to help find the principal.
        appid: String,
    },
    /// No claim that names a role.
    #[error(
        "the access token has no xms_mirid, upn, preferred_username or unique_name claim; set the role name explicitly"
    )]
    NoNameClaim,
}

/// Where a role name read from a token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleFromToken {
    /// The role name.
    pub name: String,
    /// The claim it was read from: `xms_mirid`, `upn`, `preferred_username` or `unique_name`.
    pub claim: &'static str,
}

/// The claims of an access token that matter for logging in, decoded without verifying the
/// signature. Holds no part of the token itself: safe to print.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClaims {
    audience: Vec<String>,
    issuer: Option<String>,
    tenant_id: Option<String>,
    object_id: Option<String>,
    app_id: Option<String>,
    id_type: Option<String>,
    upn: Option<String>,
    preferred_username: Option<String>,
    unique_name: Option<String>,
    name: Option<String>,
    managed_identity_resource_id: Option<String>,
    expires_at: Option<SystemTime>,
    not_before: Option<SystemTime>,
    issued_at: Option<SystemTime>,
    groups: usize,
}

/// A string claim, trimmed; absent, empty or not a string: `None`.
fn text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims
        .get(name)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A NumericDate claim; absent, not a number or out of range: `None`.
fn instant(claims: &Map<String, Value>, name: &str) -> Option<SystemTime> {
    claims
        .get(name)?
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e11)
        .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s))
}

impl TokenClaims {
    /// Decodes the claims of `token` (a JWT). The signature is not checked.
    pub fn parse(token: &str) -> Result<Self, RoleNameError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(RoleNameError::TooLong(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RoleNameError::NotAJwt);
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|e| RoleNameError::BadClaims(format!("base64: {e}")))?;
        let claims: Map<String, Value> = serde_json::from_slice(&json)
            .map_err(|e| RoleNameError::BadClaims(format!("JSON: {e}")))?;
        // `aud` is a string in Entra access tokens, but JWT allows an array.
        let audience = match claims.get("aud") {
            Some(Value::String(aud)) => vec![aud.clone()],
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            audience,
            issuer: text(&claims, "iss"),
            tenant_id: text(&claims, "tid"),
            object_id: text(&claims, "oid"),
            app_id: text(&claims, "appid").or_else(|| text(&claims, "azp")),
            id_type: text(&claims, "idtyp"),
            upn: text(&claims, "upn"),
            preferred_username: text(&claims, "preferred_username"),
            unique_name: text(&claims, "unique_name"),
            name: text(&claims, "name"),
            managed_identity_resource_id: text(&claims, "xms_mirid"),
            expires_at: instant(&claims, "exp"),
            not_before: instant(&claims, "nbf"),
            issued_at: instant(&claims, "iat"),
            groups: claims
                .get("groups")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
        })
    }

    /// The role name to log in as, read from the claims in the documented order (see the module
    /// docs); an app-only token is an error that asks for the role name, never a guess.
    pub fn role_name(&self) -> Result<RoleFromToken, RoleNameError> {
        if let Some(name) = self.managed_identity_name() {
            return Ok(RoleFromToken {
                name: name.to_owned(),
                claim: "xms_mirid",
            });
        }
        for (claim, value) in [
            ("upn", &self.upn),
            ("preferred_username", &self.preferred_username),
            ("unique_name", &self.unique_name),
        ] {
            if let Some(name) = value {
                return Ok(RoleFromToken {
                    name: name.clone(),
                    claim,
                });
            }
        }
        match (self.id_type.as_deref(), &self.app_id) {
            (Some("app") | None, Some(appid)) => Err(RoleNameError::AppOnly {
                appid: appid.clone(),
            }),
            _ => Err(RoleNameError::NoNameClaim),
        }
    }

    /// `aud`: the resource the token is for (e.g. `https://ossrdbms-aad.database.windows.net`).
    pub fn audience(&self) -> &[String] {
        &self.audience
    }
    /// `iss`: who issued the token.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }
    /// `tid`: the tenant (directory) id.
    pub fn tenant_id(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }
    /// `oid`: the principal's object id, which Azure matches to the role.
    pub fn object_id(&self) -> Option<&str> {
        self.object_id.as_deref()
    }
    /// `appid` (or `azp`): the application (client) id the token was issued to.
    pub fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }
    /// `idtyp`: `user` or `app`, when present.
    pub fn id_type(&self) -> Option<&str> {
        self.id_type.as_deref()
    }
    /// `upn`: a user's principal name.
    pub fn upn(&self) -> Option<&str> {
        self.upn.as_deref()
    }
    /// `preferred_username`.
    pub fn preferred_username(&self) -> Option<&str> {
        self.preferred_username.as_deref()
    }
    /// `unique_name`.
    pub fn unique_name(&self) -> Option<&str> {
        self.unique_name.as_deref()
    }
    /// `name`: a user's display name (not a role name).
    pub fn display_name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// `xms_mirid`: a managed identity's Azure resource id.
    pub fn managed_identity_resource_id(&self) -> Option<&str> {
        self.managed_identity_resource_id.as_deref()
    }
    /// The managed identity's name: the last segment of `xms_mirid`.
    pub fn managed_identity_name(&self) -> Option<&str> {
        self.managed_identity_resource_id
            .as_deref()?
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
    }
    /// `exp`: when the token expires.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }
    /// `nbf`: when the token becomes valid.
    pub fn not_before(&self) -> Option<SystemTime> {
        self.not_before
    }
    /// `iat`: when the token was issued.
    pub fn issued_at(&self) -> Option<SystemTime> {
        self.issued_at
    }
    /// How many group ids the token lists (`groups`); many make a token long.
    pub fn group_count(&self) -> usize {
        self.groups
    }
}

/// The audience, the principal's names and ids, for messages: `aud …, upn alice@contoso.com,
/// oid …, appid …`.
impl fmt::Display for TokenClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.audience.iter().map(|a| format!("aud {a}")).collect();
        if let Some(name) = self.managed_identity_name() {
            parts.push(format!("managed identity `{name}`"));
        }
        for (label, value) in [
            ("upn", &self.upn),
            ("preferred_username", &self.preferred_username),
            ("unique_name", &self.unique_name),
            ("appid", &self.app_id),
            ("oid", &self.object_id),
            ("tid", &self.tenant_id),
        ] {
            if let Some(value) = value {
                // unique_name and preferred_username usually repeat the upn.
                if label != "upn" && self.upn.as_ref() == Some(value) {
                    continue;
                }
                parts.push(format!("{label} {value}"));
            }
        }
        if parts.is_empty() {
            f.write_str("no names or ids")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(claims: serde_json::Value) -> String {
        let enc = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(&json!({"alg": "RS256", "kid": "k"})),
            enc(&claims)
        )
    }

    fn role(token: &str) -> Result<String, RoleNameError> {
        TokenClaims::parse(token)?.role_name().map(|r| r.name)
    }

    #[test]
    fn a_managed_identity_is_named_by_its_resource_id() {
        let token = jwt(json!({
            "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-mi",
            "upn": "ignored@example.com", "appid": "a", "idtyp": "app"
        }));
        let claims = TokenClaims::parse(&token).unwrap();
        assert_eq!(
            claims.role_name().unwrap(),
            RoleFromToken {
                name: "orders-mi".into(),
                claim: "xms_mirid"
            }
        );
        assert_eq!(claims.managed_identity_name(), Some("orders-mi"));
    }

    #[test]
    fn user_names_are_taken_in_order() {
        let all = json!({"upn": "u@x", "preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role(&jwt(all)).unwrap(), "u@x");
        let two = json!({"preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role(&jwt(two)).unwrap(), "p@x");
        let one = json!({"unique_name": "n@x", "upn": ""});
        let claims = TokenClaims::parse(&jwt(one)).unwrap();
        assert_eq!(claims.role_name().unwrap().claim, "unique_name");
    }

    #[test]
    fn an_app_only_token_asks_for_the_role_name_and_never_guesses_the_appid() {
        let token = jwt(
            json!({"appid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001", "idtyp": "app", "oid": "o"}),
        );
        let error = role(&token).unwrap_err();
        assert_eq!(
            error,
            RoleNameError::AppOnly {
                appid: "0f1e2d3c-aaaa-bbbb-cccc-000000000001".into()
            }
        );
        assert!(
            error
                .to_string()
                .contains("set the role name to the service principal's display name")
        );
    }

    #[test]
    fn the_claims_that_explain_a_login_are_read_and_printed_without_the_token() {
        let token = jwt(json!({
            "aud": "https://ossrdbms-aad.database.windows.net", "tid": "t-1", "oid": "o-1",
            "appid": "a-1", "upn": "alice@x", "unique_name": "alice@x", "exp": 2000000000,
            "iat": 1999996400, "nbf": 1999996400, "groups": ["g1", "g2"], "idtyp": "user"
        }));
        let claims = TokenClaims::parse(&token).unwrap();
        assert_eq!(
            claims.audience(),
            ["https://ossrdbms-aad.database.windows.net"]
        );
        assert_eq!(
            claims.expires_at(),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(claims.group_count(), 2);
        assert_eq!(
            claims.to_string(),
            "aud https://ossrdbms-aad.database.windows.net, upn alice@x, appid a-1, oid o-1, tid t-1"
        );
        let multi = jwt(json!({"aud": ["a", "b"]}));
        assert_eq!(TokenClaims::parse(&multi).unwrap().audience(), ["a", "b"]);
    }

    #[test]
    fn malformed_tokens_are_errors_not_panics() {
        assert_eq!(role("opaque"), Err(RoleNameError::NotAJwt));
        assert_eq!(role("a.b.c.d"), Err(RoleNameError::NotAJwt));
        assert!(matches!(role("a.!!!.c"), Err(RoleNameError::BadClaims(_))));
        let not_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1,2"));
        assert!(matches!(role(&not_json), Err(RoleNameError::BadClaims(_))));
        let deep = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[".repeat(5000)));
        assert!(matches!(role(&deep), Err(RoleNameError::BadClaims(_))));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(role(&huge), Err(RoleNameError::TooLong(MAX_TOKEN_LEN + 1)));
        assert_eq!(
            role(&jwt(json!({"oid": "o", "idtyp": "user"}))),
            Err(RoleNameError::NoNameClaim)
        );
        // Claims of unexpected types or ranges are ignored, never a reason to fail.
        let odd = jwt(json!({"exp": 1e300, "nbf": -5, "iat": "x", "upn": 7, "unique_name": "n@x"}));
        let claims = TokenClaims::parse(&odd).unwrap();
        assert_eq!((claims.expires_at(), claims.not_before()), (None, None));
        assert_eq!(claims.role_name().unwrap().name, "n@x");
        assert!(matches!(
            role(&format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1]"))),
            Err(RoleNameError::BadClaims(_))
        ));
    }

    /// Both ways the fuzz target feeds an input: as a whole token, and as a token's payload.
    fn feed(input: &[u8]) -> usize {
        let mut checked = 0;
        if let Ok(text) = std::str::from_utf8(input) {
            if let Ok(name) = role(text) {
                assert!(!name.is_empty() && name.len() <= text.len());
            }
            checked += 1;
        }
        let token = format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(input)
        );
        if let Ok(claims) = TokenClaims::parse(&token) {
            let _ = claims.to_string();
            if let Ok(name) = claims.role_name() {
                assert!(!name.name.is_empty());
            }
        }
        checked + 1
    }

    /// Replays the fuzz corpus (`fuzz/corpus/claims`) and 20,000 mutations of it: no input panics,
    /// and a name, when found, is never empty. `make fuzz` runs the coverage-guided fuzzer itself.
    #[test]
    fn the_fuzz_corpus_and_its_mutations_never_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/claims");
        let corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus at {}: {e}", dir.display()))
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect();
        assert!(corpus.len() >= 10, "corpus has {} inputs", corpus.len());
        let mut inputs = corpus.iter().map(|input| feed(input)).sum::<usize>();

        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..20_000 {
            let mut input = corpus[rng.usize(..corpus.len())].clone();
            for _ in 0..rng.usize(1..8) {
                match rng.u8(..4) {
                    0 if !input.is_empty() => {
                        let i = rng.usize(..input.len());
                        input[i] = rng.u8(..);
                    }
                    1 => {
                        let i = rng.usize(..=input.len());
                        const SYNTAX: &[u8] = b"{}[]\\\":,.0aZu";
                        input.insert(i, SYNTAX[rng.usize(..SYNTAX.len())]);
                    }
                    2 if !input.is_empty() => input.truncate(rng.usize(..input.len())),
                    _ => input.extend(std::iter::repeat_n(b'[', rng.usize(..300))),
                }
            }
            inputs += feed(&input);
        }
        println!("claims parser: {inputs} inputs, no panic");
    }
}
