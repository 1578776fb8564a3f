//! Access tokens and where they come from.

use async_trait::async_trait;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::TokenErrorKind;

/// An access token as a token source returns it: the secret and when it expires.
///
/// `Debug` never shows the secret.
#[derive(Clone)]
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
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"<redacted>")
            .field("expires_on", &self.expires_on)
            .finish()
    }
}

/// Why a token source could not produce a token: what the identity provider said, classified.
///
/// The message and the provider's error description must never contain a token or a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TokenSourceError {
    message: String,
    kind: Option<TokenErrorKind>,
    http_status: Option<u16>,
    provider_code: Option<String>,
    retry_after: Option<Duration>,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl TokenSourceError {
    /// An error with a message saying what failed (it must not contain any token).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: None,
            http_status: None,
            provider_code: None,
            retry_after: None,
            source: None,
        }
    }

    /// Keeps the underlying error as `source()`.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// What kind of failure this is. Without it, the kind follows from the HTTP status (429:
    /// throttled, other 4xx: credential rejected, 5xx: server error), else [`TokenErrorKind::Other`].
    #[must_use]
    pub fn with_kind(mut self, kind: TokenErrorKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// The HTTP status the identity provider answered with.
    #[must_use]
    pub fn with_http_status(mut self, status: u16) -> Self {
        self.http_status = Some(status);
        self
    }

    /// The provider's error code (OAuth `error`, e.g. `invalid_client`, or Entra's `AADSTS` number).
    #[must_use]
    pub fn with_provider_code(mut self, code: impl Into<String>) -> Self {
        self.provider_code = Some(code.into());
        self
    }

    /// The provider asked not to be called again before this delay (HTTP `Retry-After`).
    #[must_use]
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// The delay the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status the provider answered with, if it answered.
    pub fn http_status(&self) -> Option<u16> {
        self.http_status
    }

    /// The provider's error code, if it gave one.
    pub fn provider_code(&self) -> Option<&str> {
        self.provider_code.as_deref()
    }

    /// The kind of failure: as set, or from the HTTP status.
    pub fn kind(&self) -> TokenErrorKind {
        if let Some(kind) = self.kind {
            return kind;
        }
        match self.http_status {
            Some(429) => TokenErrorKind::Throttled,
            Some(s) if (400..500).contains(&s) => TokenErrorKind::CredentialRejected,
            Some(s) if s >= 500 => TokenErrorKind::ServerError,
            _ => TokenErrorKind::Other,
        }
    }
}

/// Something that can produce access tokens for a scope: an Azure credential, or any other
/// identity provider.
///
/// Implementations need not cache: [`crate::TokenCache`] does, for every pool that shares it.
#[async_trait]
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// Requests a new token for `scope`.
    async fn get_token(&self, scope: &str) -> Result<AccessToken, TokenSourceError>;

    /// A readable, non-secret name for the principal the tokens are for (e.g. the credential's
    /// kind and client id), used in errors, logs and metrics.
    fn identity(&self) -> String;
}

type TokenFuture = Pin<Box<dyn Future<Output = Result<AccessToken, TokenSourceError>> + Send>>;

/// A token source backed by a closure: for tests, and for identity providers other than Azure.
pub struct FnTokenSource {
    identity: String,
    fetch: Box<dyn Fn(&str) -> TokenFuture + Send + Sync>,
}

impl FnTokenSource {
    /// A source named `identity` that calls `fetch(scope)` for each token.
    pub fn new<F, Fut>(identity: impl Into<String>, fetch: F) -> Arc<Self>
    where
        F: Fn(&str) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<AccessToken, TokenSourceError>> + Send + 'static,
    {
        Arc::new(Self {
            identity: identity.into(),
            fetch: Box::new(move |scope| Box::pin(fetch(scope))),
        })
    }

    /// A source that always returns the same token (useful against a server that accepts it).
    pub fn fixed(identity: impl Into<String>, token: AccessToken) -> Arc<Self> {
        Self::new(identity, move |_| {
            let token = token.clone();
            async move { Ok(token) }
        })
    }
}

impl fmt::Debug for FnTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnTokenSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl TokenSource for FnTokenSource {
    async fn get_token(&self, scope: &str) -> Result<AccessToken, TokenSourceError> {
        (self.fetch)(scope).await
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}
