//! The PostgreSQL role name an access token logs in as, read from its claims.
//!
//! Azure Database for PostgreSQL names a principal's role after its user principal name (users)
//! or its display name (service principals, managed identities). Only some of those names travel in
//! the token, so the role is taken, in this order, from:
//!
//! 1. `xms_mirid`: a managed identity's resource id; its last segment is the identity's name;
//! 2. `upn`, 3. `preferred_username`, 4. `unique_name`: a user's principal name.
//!
//! An app-only token (service principal) carries none of these: its display name is not in the
//! token, and the `appid` GUID is not the role's name, so the role must be configured.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

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

#[derive(Deserialize)]
struct NameClaims {
    xms_mirid: Option<String>,
    upn: Option<String>,
    preferred_username: Option<String>,
    unique_name: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
    idtyp: Option<String>,
}

/// Reads the role name from `token`'s claims in the documented order. The signature is not
/// checked: the server does that; this only decides which role to ask for.
pub fn role_name_from_token(token: &str) -> Result<String, RoleNameError> {
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
    let claims: NameClaims = serde_json::from_slice(&json)
        .map_err(|e| RoleNameError::BadClaims(format!("JSON: {e}")))?;

    let non_empty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    if let Some(mirid) = non_empty(&claims.xms_mirid)
        && let Some(name) = mirid.rsplit('/').next().filter(|n| !n.is_empty())
    {
        return Ok(name.to_owned());
    }
    for name in [&claims.upn, &claims.preferred_username, &claims.unique_name] {
        if let Some(name) = non_empty(name) {
            return Ok(name);
        }
    }
    let appid = non_empty(&claims.appid).or_else(|| non_empty(&claims.azp));
    match (claims.idtyp.as_deref(), appid) {
        (Some("app") | None, Some(appid)) => Err(RoleNameError::AppOnly { appid }),
        _ => Err(RoleNameError::NoNameClaim),
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

    #[test]
    fn a_managed_identity_is_named_by_its_resource_id() {
        let token = jwt(json!({
            "xms_mirid": "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-mi",
            "upn": "ignored@example.com", "appid": "a", "idtyp": "app"
        }));
        assert_eq!(role_name_from_token(&token).unwrap(), "orders-mi");
    }

    #[test]
    fn user_names_are_taken_in_order() {
        let all = json!({"upn": "u@x", "preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role_name_from_token(&jwt(all)).unwrap(), "u@x");
        let two = json!({"preferred_username": "p@x", "unique_name": "n@x"});
        assert_eq!(role_name_from_token(&jwt(two)).unwrap(), "p@x");
        let one = json!({"unique_name": "n@x", "upn": ""});
        assert_eq!(role_name_from_token(&jwt(one)).unwrap(), "n@x");
    }

    #[test]
    fn an_app_only_token_asks_for_the_role_name_and_never_guesses_the_appid() {
        let token = jwt(
            json!({"appid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001", "idtyp": "app", "oid": "o"}),
        );
        let error = role_name_from_token(&token).unwrap_err();
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
    fn malformed_tokens_are_errors_not_panics() {
        assert_eq!(role_name_from_token("opaque"), Err(RoleNameError::NotAJwt));
        assert_eq!(role_name_from_token("a.b.c.d"), Err(RoleNameError::NotAJwt));
        assert!(matches!(
            role_name_from_token("a.!!!.c"),
            Err(RoleNameError::BadClaims(_))
        ));
        let not_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1,2"));
        assert!(matches!(
            role_name_from_token(&not_json),
            Err(RoleNameError::BadClaims(_))
        ));
        let deep = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[".repeat(5000)));
        assert!(matches!(
            role_name_from_token(&deep),
            Err(RoleNameError::BadClaims(_))
        ));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            role_name_from_token(&huge),
            Err(RoleNameError::TooLong(MAX_TOKEN_LEN + 1))
        );
        assert_eq!(
            role_name_from_token(&jwt(json!({"oid": "o", "idtyp": "user"}))),
            Err(RoleNameError::NoNameClaim)
        );
    }

    /// Both ways the fuzz target feeds an input: as a whole token, and as a token's payload.
    fn feed(input: &[u8]) -> usize {
        let mut checked = 0;
        if let Ok(text) = std::str::from_utf8(input) {
            if let Ok(name) = role_name_from_token(text) {
                assert!(!name.is_empty() && name.len() <= text.len());
            }
            checked += 1;
        }
        let token = format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(input)
        );
        if let Ok(name) = role_name_from_token(&token) {
            assert!(!name.is_empty());
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
