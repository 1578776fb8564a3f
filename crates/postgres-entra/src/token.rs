//! Access tokens and where they come from.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use crate::claims::{ClaimsError, TokenClaims};
use crate::error::TokenError;

/// An access token: the secret, sent as the PostgreSQL password, and when it expires.
///
/// `Debug` never shows the secret.
// Aligned to a cache line pair: the token cache hands out one copy per thread (see `HIT_SHARDS`
// in the cache), and copies in lines of their own keep their reference counts apart.
#[derive(Clone)]
#[repr(align(128))]
pub struct AccessToken {
    secret: String,
    expires_on: SystemTime,
}

impl AccessToken {
    /// A token `secret` that expires at `expires_on`.
    pub fn new(secret: impl Into<String>, expires_on: SystemTime) -> Self {
        Self {
            secret: secret.into(),
            expires_on,
        }
    }

    /// The token itself: what is sent as the PostgreSQL password. Treat it as a password.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// When the token expires.
    pub fn expires_on(&self) -> SystemTime {
        self.expires_on
    }

    /// What the token says about its principal (names, ids, audience), read without checking
    /// its signature: the server does that.
    pub fn claims(&self) -> Result<TokenClaims, ClaimsError> {
        TokenClaims::parse(&self.secret)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// The future a [`TokenSource`] returns.
pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, TokenError>> + Send + 'a>>;

/// Something that can produce access tokens for a scope: an Azure credential
/// ([`crate::AzureTokenSource`]), or any other identity provider.
///
/// Implementations need not cache: [`crate::TokenCache`] does, for every pool that shares it. A
/// failure is a [`TokenError`] saying what the provider answered ([`TokenError::new`] and its
/// `with_*` methods); the cache adds the identity and the scope.
///
/// ```
/// use postgres_entra::{AccessToken, TokenError, TokenErrorKind, TokenFuture, TokenSource};
/// use std::time::{Duration, SystemTime};
///
/// #[derive(Debug)]
/// struct Vault;
///
/// impl TokenSource for Vault {
///     fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
///         Box::pin(async move {
///             if scope.is_empty() {
///                 return Err(TokenError::new(TokenErrorKind::Other, "no scope"));
///             }
///             Ok(AccessToken::new("eyJ...", SystemTime::now() + Duration::from_secs(3600)))
///         })
///     }
///
///     fn identity(&self) -> String {
///         "vault (orders-api)".to_owned()
///     }
/// }
/// ```
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// Requests a new token for `scope`.
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a>;

    /// A readable, non-secret name for the principal the tokens are for (e.g. the credential's
    /// kind and client id), used in errors, logs and metrics.
    fn identity(&self) -> String;
}

/// A shared source is a source: `Arc<dyn TokenSource>` and `Arc<YourSource>` work wherever a
/// source is taken.
impl<T: TokenSource + ?Sized> TokenSource for std::sync::Arc<T> {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        (**self).get_token(scope)
    }

    fn identity(&self) -> String {
        (**self).identity()
    }
}
