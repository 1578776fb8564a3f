//! Access tokens and where they come from.

use async_trait::async_trait;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// Why a token source could not produce a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TokenSourceError {
    message: String,
    retry_after: Option<Duration>,
    #[source]
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl TokenSourceError {
    /// An error with a message saying what failed (it must not contain any token).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
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
}

/// Something that can produce access tokens for a scope: an Azure credential, or any other
/// identity provider.
///
/// Implementations should not cache: [`crate::TokenCache`] does, for every pool sharing the
/// source. `identity()` names who the tokens are for; caches are shared per identity and scope,
/// so two sources that return tokens for different principals must have different identities.
#[async_trait]
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// Requests a new token for `scope`.
    async fn get_token(&self, scope: &str) -> Result<AccessToken, TokenSourceError>;

    /// A stable, non-secret name for the principal the tokens are for (e.g. a client id).
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
