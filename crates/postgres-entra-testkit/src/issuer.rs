//! The mock Entra ID token issuer: RS256 signing keys, Entra-shaped access tokens, and the check the
//! emulated server runs on every login.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::identity::{Identity, IdentityKind};
use crate::{Error, TOKEN_AUDIENCE};

/// Issuer of the projected service-account tokens a workload identity presents as client assertion.
pub const FEDERATED_ISSUER: &str = "https://oidc.emulator.postgres-entra.invalid/";
/// Audience Entra expects in a federated client assertion.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// One RS256 signing key with its JWKS identity.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    n: String,
    e: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new RSA 2048 key, as PKCS#8 DER (about 0.2 s of CPU).
    pub(crate) fn generate_pkcs8() -> Result<Vec<u8>, Error> {
        let key = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| Error::Crypto("RSA key generation failed".into()))?;
        Ok(key
            .as_der()
            .map_err(|_| Error::Crypto("RSA key serialisation failed".into()))?
            .as_ref()
            .to_vec())
    }

    pub(crate) fn generate() -> Result<Self, Error> {
        Self::from_pkcs8(&Self::generate_pkcs8()?)
    }

    /// The key in `pkcs8` (DER).
    pub(crate) fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, Error> {
        let key = KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| Error::Crypto("not an RSA key in PKCS#8".into()))?;
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.to_vec()));
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| Error::Crypto(format!("RSA key not accepted by jsonwebtoken: {e}")))?;
        let public = key.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        let decoding = DecodingKey::from_rsa_raw_components(&n, &e);
        // Entra's kid is the base64url SHA-1 thumbprint of the certificate; any stable, unique,
        // similarly shaped string does here.
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &n);
        Ok(Self {
            kid: URL_SAFE_NO_PAD.encode(digest.as_ref()),
            encoding,
            decoding,
            n: URL_SAFE_NO_PAD.encode(&n),
            e: URL_SAFE_NO_PAD.encode(&e),
        })
    }

    pub(crate) fn jwk(&self) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256",
            "kid": self.kid, "x5t": self.kid, "n": self.n, "e": self.e,
            "issuer": "https://login.microsoftonline.com/{tenantid}/v2.0",
        })
    }

    pub(crate) fn sign(&self, kid: &str, claims: &Value) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".into());
        header.kid = Some(kid.to_owned());
        header.x5t = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| Error::Crypto(format!("signing a token failed: {e}")))
    }
}

/// Which key signs a minted token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Signer {
    /// The issuer's published key (what the emulated server trusts).
    #[default]
    Issuer,
    /// A key the server has never seen, presented under the issuer's `kid`: a forgery.
    Rogue,
}

/// How to shape a token minted with [`crate::Emulator::issue_token`]; the defaults give a valid
/// token for the PostgreSQL resource.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TokenOptions {
    /// `aud` claim; defaults to the PostgreSQL resource.
    pub audience: String,
    /// Seconds from now to `exp`; may be negative for an expired token. `None`: the emulator's lifetime.
    pub expires_in: Option<i64>,
    /// Seconds from now to `nbf` (positive: not yet valid).
    pub not_before_in: i64,
    /// Which key signs it.
    pub signer: Signer,
    /// Pad the token with a `groups` claim until it is at least this many bytes long.
    pub min_len: usize,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self {
            audience: TOKEN_AUDIENCE.to_owned(),
            expires_in: None,
            not_before_in: -300,
            signer: Signer::Issuer,
            min_len: 0,
        }
    }
}

impl TokenOptions {
    /// Sets the `aud` claim.
    #[must_use]
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self
    }
    /// Sets `exp` to now + `secs` (negative: already expired).
    #[must_use]
    pub fn expires_in(mut self, secs: i64) -> Self {
        self.expires_in = Some(secs);
        self
    }
    /// Sets `nbf` to now + `secs`.
    #[must_use]
    pub fn not_before_in(mut self, secs: i64) -> Self {
        self.not_before_in = secs;
        self
    }
    /// Chooses the signing key.
    #[must_use]
    pub fn signer(mut self, signer: Signer) -> Self {
        self.signer = signer;
        self
    }
    /// Pads the token to at least `len` bytes.
    #[must_use]
    pub fn min_len(mut self, len: usize) -> Self {
        self.min_len = len;
        self
    }
}

/// Why the emulated server refused a token at login.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// Not a JWT, or claims missing or of the wrong type.
    Malformed,
    /// Signed with an algorithm other than RS256.
    WrongAlgorithm,
    /// `kid` names no key the issuer published.
    UnknownKey,
    /// Signature does not verify against the published key.
    BadSignature,
    /// `aud` is not the PostgreSQL resource.
    WrongAudience,
    /// `iss` is not the tenant's issuer.
    WrongIssuer,
    /// `exp` is in the past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// The role logged in to is not registered as an Entra principal.
    UnknownRole,
    /// The role is a group's, and the token's principal is not (or no longer) a member.
    NotAMember,
    /// The token's `oid` is not the object id registered for the role.
    WrongIdentity,
    /// A password role (see `Emulator::add_password_role`) got the wrong password.
    WrongPassword,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Malformed => "token is not a well-formed JWT",
            Rejection::WrongAlgorithm => "token is not signed with RS256",
            Rejection::UnknownKey => "token's kid is not a published signing key",
            Rejection::BadSignature => "token signature does not verify",
            Rejection::WrongAudience => "token audience is not this server's resource",
            Rejection::WrongIssuer => "token issuer is not the tenant",
            Rejection::Expired => "token has expired",
            Rejection::NotYetValid => "token is not valid yet",
            Rejection::UnknownRole => "role is not an Entra principal",
            Rejection::NotAMember => "token's principal is not a member of the role's group",
            Rejection::WrongIdentity => "token belongs to another identity than the role",
            Rejection::WrongPassword => "wrong password",
        })
    }
}

/// The mock issuer: its tenant, published key, and a rogue key for forgeries.
#[derive(Debug)]
pub(crate) struct Issuer {
    pub(crate) tenant_id: String,
    pub(crate) key: SigningKey,
    rogue: SigningKey,
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A random base64url string of `bytes` random bytes, for opaque claims such as `aio` and `uti`.
fn opaque(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf).expect("system RNG");
    URL_SAFE_NO_PAD.encode(buf)
}

impl Issuer {
    /// An issuer with new keys: one it signs with, one it never publishes.
    pub(crate) fn new(tenant_id: &str) -> Result<Self, Error> {
        Ok(Self::with_keys(
            tenant_id,
            SigningKey::generate()?,
            SigningKey::generate()?,
        ))
    }

    /// An issuer signing with `key`, which never publishes `rogue`.
    pub(crate) fn with_keys(tenant_id: &str, key: SigningKey, rogue: SigningKey) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            key,
            rogue,
        }
    }

    /// `iss` of v1 access tokens, which Azure Database for PostgreSQL receives.
    pub(crate) fn issuer(&self) -> String {
        format!("https://sts.windows.net/{}/", self.tenant_id)
    }

    pub(crate) fn jwks(&self) -> Value {
        json!({ "keys": [self.key.jwk()] })
    }

    /// An access token for `identity` shaped like one Entra issues to that kind of principal.
    pub(crate) fn mint(
        &self,
        identity: &Identity,
        options: &TokenOptions,
        default_lifetime: Duration,
    ) -> Result<String, Error> {
        if identity.kind == IdentityKind::Group {
            return Err(Error::Setup(format!(
                "{} is a group: groups get no tokens; mint one for a member",
                identity.role_name
            )));
        }
        let now = now_secs();
        let exp = now
            + options
                .expires_in
                .unwrap_or(default_lifetime.as_secs() as i64);
        let mut claims = Map::new();
        let mut put = |k: &str, v: Value| {
            claims.insert(k.to_owned(), v);
        };
        put("aud", json!(options.audience));
        put("iss", json!(self.issuer()));
        put("iat", json!(now + options.not_before_in.min(0)));
        put("nbf", json!(now + options.not_before_in));
        put("exp", json!(exp));
        put("aio", json!(opaque(84)));
        put("appid", json!(identity.client_id));
        put("idp", json!(self.issuer()));
        put("oid", json!(identity.object_id));
        put("rh", json!(format!("1.{}.", opaque(48))));
        put("tid", json!(self.tenant_id));
        put("uti", json!(opaque(16)));
        put("ver", json!("1.0"));
        put("xms_ftd", json!(opaque(36)));
        put("xms_idrel", json!("7 24"));
        match identity.kind {
            IdentityKind::User => {
                put("acr", json!("1"));
                put("amr", json!(["pwd", "mfa"]));
                put("app_displayname", json!("Microsoft Azure CLI"));
                put("appidacr", json!("0"));
                put("family_name", json!("Example"));
                put("given_name", json!("Alice"));
                put("idtyp", json!("user"));
                put("ipaddr", json!("127.0.0.1"));
                put("name", json!("Alice Example"));
                put("puid", json!("10032001A1B2C3D4"));
                put("scp", json!("user_impersonation"));
                put("sub", json!(opaque(32)));
                put("unique_name", json!(identity.role_name));
                put("upn", json!(identity.role_name));
            }
            IdentityKind::ServicePrincipal => {
                put("appidacr", json!("1"));
                put("idtyp", json!("app"));
                put("sub", json!(identity.object_id));
            }
            IdentityKind::Group => {}
            IdentityKind::ManagedIdentity => {
                put("appidacr", json!("2"));
                put("idtyp", json!("app"));
                put("sub", json!(identity.object_id));
                put(
                    "xms_mirid",
                    json!(format!(
                        "/subscriptions/00000000-0000-4000-8000-00000000c0de/resourcegroups/emulator-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
                        identity.role_name
                    )),
                );
            }
        }
        let mut claims = Value::Object(claims);
        let (signer, kid) = match options.signer {
            Signer::Issuer => (&self.key, &self.key.kid),
            Signer::Rogue => (&self.rogue, &self.key.kid),
        };
        let mut token = signer.sign(kid, &claims)?;
        if token.len() < options.min_len {
            // Large group memberships are what make real tokens long; each GUID adds ~50 bytes.
            let missing = options.min_len - token.len();
            let groups: Vec<String> = (0..missing.div_ceil(48) + 1)
                .map(|i| format!("{:08x}-0000-4000-8000-{:012x}", i, i))
                .collect();
            claims["groups"] = json!(groups);
            token = signer.sign(kid, &claims)?;
        }
        Ok(token)
    }

    /// A federated service-account token a workload presents as its client assertion.
    pub(crate) fn mint_assertion(
        &self,
        subject: &str,
        lifetime: Duration,
    ) -> Result<String, Error> {
        let now = now_secs();
        let claims = json!({
            "aud": [FEDERATED_AUDIENCE],
            "iss": FEDERATED_ISSUER,
            "sub": subject,
            "iat": now, "nbf": now,
            "exp": now + lifetime.as_secs() as i64,
            "kubernetes.io": { "namespace": "default", "serviceaccount": { "name": "workload" } },
        });
        self.key.sign(&self.key.kid, &claims)
    }

    /// Verifies a client assertion and returns its subject.
    pub(crate) fn verify_assertion(&self, assertion: &str) -> Result<String, Rejection> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[FEDERATED_AUDIENCE]);
        validation.set_issuer(&[FEDERATED_ISSUER]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let claims = self.verify_with(assertion, &validation)?;
        claims
            .get("sub")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(Rejection::Malformed)
    }

    /// The login check: a valid RS256 token from this tenant for `audience` (the server's
    /// resource), inside its validity window (no leeway). Returns the token's claims.
    pub(crate) fn verify_access_token(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Map<String, Value>, Rejection> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[self.issuer()]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss"]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        validation.reject_tokens_expiring_in_less_than = 0;
        self.verify_with(token, &validation)
    }

    fn verify_with(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<Map<String, Value>, Rejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Rejection::Malformed)?;
        if header.alg != Algorithm::RS256 {
            return Err(Rejection::WrongAlgorithm);
        }
        if header.kid.as_deref() != Some(self.key.kid.as_str()) {
            return Err(Rejection::UnknownKey);
        }
        jsonwebtoken::decode::<Map<String, Value>>(token, &self.key.decoding, validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                JwtErrorKind::InvalidSignature => Rejection::BadSignature,
                JwtErrorKind::InvalidAudience => Rejection::WrongAudience,
                JwtErrorKind::InvalidIssuer => Rejection::WrongIssuer,
                JwtErrorKind::ExpiredSignature => Rejection::Expired,
                JwtErrorKind::ImmatureSignature => Rejection::NotYetValid,
                JwtErrorKind::InvalidAlgorithm => Rejection::WrongAlgorithm,
                _ => Rejection::Malformed,
            })
    }
}
