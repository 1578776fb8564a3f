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
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token's claims could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimsError {
    /// The token is not three base64url parts separated by dots.
    #[error("the access token is not a JWT")]
    NotAJwt,
    /// The token is longer than 16 KiB.
    #[error("the access token is implausibly long ({0} bytes)")]
    TooLong(usize),
    /// The claims are not base64url-encoded JSON.
    #[error("the access token's claims are not valid base64url JSON ({0})")]
    BadClaims(String),
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
    pub(crate) fn parse(token: &str) -> Result<Self, ClaimsError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(ClaimsError::TooLong(token.len()));
        }
        let mut parts = token.split('.');
        let (Some(_header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ClaimsError::NotAJwt);
        };
        let json = URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|e| ClaimsError::BadClaims(format!("base64: {e}")))?;
        let claims: Map<String, Value> = serde_json::from_slice(&json)
            .map_err(|e| ClaimsError::BadClaims(format!("JSON: {e}")))?;
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

    /// The role name the token names, and the claim it is read from (`xms_mirid`, `upn`,
    /// `preferred_username` or `unique_name`, in that order: see the module docs); `None` for
    /// an app-only token (a service principal's display name is not in its token, and the
    /// `appid` is not a role name) or one without any of these claims.
    pub fn role_name(&self) -> Option<(&str, &'static str)> {
        if let Some(name) = self.managed_identity_name() {
            return Some((name, "xms_mirid"));
        }
        [
            ("upn", &self.upn),
            ("preferred_username", &self.preferred_username),
            ("unique_name", &self.unique_name),
        ]
        .into_iter()
        .find_map(|(claim, value)| value.as_deref().map(|name| (name, claim)))
    }

    /// Whether this is an app-only token (a service principal's: `idtyp` `app`, or an app id and
    /// no user name), whose role must be configured.
    pub fn is_app_only(&self) -> bool {
        self.role_name().is_none()
            && (self.id_type.as_deref() == Some("app")
                || (self.id_type.is_none() && self.app_id.is_some()))
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
    /// How many group ids the token lists (`groups`); many make a token long.
    pub fn group_count(&self) -> usize {
        self.groups
    }
}

impl TokenClaims {
    /// What identifies the token and its principal without naming a person, for what is logged by
    /// default: the audience, a managed identity's resource name, the app id, the object id
    /// (`aud …, managed identity `orders-mi`, appid …, oid …`).
    pub(crate) fn impersonal(&self) -> String {
        let mut parts: Vec<String> = self.audience.iter().map(|a| format!("aud {a}")).collect();
        if let Some(name) = self.managed_identity_name() {
            parts.push(format!("managed identity `{name}`"));
        }
        for (label, value) in [("appid", &self.app_id), ("oid", &self.object_id)] {
            if let Some(value) = value {
                parts.push(format!("{label} {value}"));
            }
        }
        if parts.is_empty() {
            "no ids".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// The audience, the principal's names and ids, for messages: `aud …, upn alice@contoso.com,
/// oid …, appid …`. It names people (upn): log it at debug.
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

    fn role(token: &str) -> Result<Option<String>, ClaimsError> {
        Ok(TokenClaims::parse(token)?
            .role_name()
            .map(|(name, _)| name.to_owned()))
    }

    #[test]
    fn a_managed_identity_is_named_by_its_resource_id() {
        let token = jwt(json!({
            "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-mi",
            "upn": "ignored@example.com", "appid": "a", "idtyp": "app"
        }));
        let claims = TokenClaims::parse(&token).unwrap();
        assert_eq!(claims.role_name(), Some(("orders-mi", "xms_mirid")));
        assert_eq!(claims.managed_identity_name(), Some("orders-mi"));
        assert!(!claims.is_app_only());
    }

    #[test]
    fn user_names_are_taken_in_order() {
        let all = json!({"upn": "u@x", "preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role(&jwt(all)).unwrap().as_deref(), Some("u@x"));
        let two = json!({"preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role(&jwt(two)).unwrap().as_deref(), Some("p@x"));
        let one = json!({"unique_name": "n@x", "upn": ""});
        let claims = TokenClaims::parse(&jwt(one)).unwrap();
        assert_eq!(claims.role_name(), Some(("n@x", "unique_name")));
    }

    #[test]
    fn an_app_only_token_names_no_role_and_the_appid_is_never_taken_for_one() {
        let token = jwt(
            json!({"appid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001", "idtyp": "app", "oid": "o"}),
        );
        let claims = TokenClaims::parse(&token).unwrap();
        assert_eq!(claims.role_name(), None);
        assert!(claims.is_app_only());
        let nameless_user = TokenClaims::parse(&jwt(json!({"oid": "o", "idtyp": "user"}))).unwrap();
        assert_eq!(nameless_user.role_name(), None);
        assert!(!nameless_user.is_app_only());
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
        assert_eq!(role("opaque"), Err(ClaimsError::NotAJwt));
        assert_eq!(role("a.b.c.d"), Err(ClaimsError::NotAJwt));
        assert!(matches!(role("a.!!!.c"), Err(ClaimsError::BadClaims(_))));
        let not_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1,2"));
        assert!(matches!(role(&not_json), Err(ClaimsError::BadClaims(_))));
        let deep = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[".repeat(5000)));
        assert!(matches!(role(&deep), Err(ClaimsError::BadClaims(_))));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(role(&huge), Err(ClaimsError::TooLong(MAX_TOKEN_LEN + 1)));
        // Claims of unexpected types or ranges are ignored, never a reason to fail.
        let odd = jwt(json!({"exp": 1e300, "nbf": -5, "iat": "x", "upn": 7, "unique_name": "n@x"}));
        let claims = TokenClaims::parse(&odd).unwrap();
        assert_eq!((claims.expires_at, claims.not_before), (None, None));
        assert_eq!(claims.role_name(), Some(("n@x", "unique_name")));
        assert!(matches!(
            role(&format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1]"))),
            Err(ClaimsError::BadClaims(_))
        ));
    }
}
