//! Errors: one enum, a variant per cause a user acts on differently.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::token::TokenSourceError;

/// Everything that can go wrong getting a token or logging in with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No valid access token could be obtained from the identity provider.
    #[error(transparent)]
    Token(#[from] TokenError),

    /// The server refused the login even after one retry with a fresh token.
    #[error(
        "PostgreSQL refused the Entra ID login for role `{role}` ({code}: {message}), also with a freshly fetched token; \
         check that the role exists for this principal (pgaadauth_create_principal) and that it is the principal's name \
         (user principal name, or display name for service principals and managed identities)"
    )]
    LoginRejected {
        /// The role the login asked for.
        role: String,
        /// SQLSTATE the server answered with (28000 or 28P01).
        code: String,
        /// The server's message.
        message: String,
    },

    /// TLS could not be set up: the server declined it, or its certificate did not verify.
    #[error("TLS to the PostgreSQL server failed, so no token was sent: {message}")]
    Tls {
        /// What failed, and what to check.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },

    /// The configuration cannot work (plaintext requested, bad scope, no role name, ...).
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// Any other PostgreSQL failure (network, server down, query errors).
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }
}

/// What kind of failure kept the cache from producing a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// The identity provider answered with an error, or could not be reached.
    Provider,
    /// The identity provider did not answer within the fetch timeout.
    Timeout,
    /// The provider returned a token that was already expired (or about to) on arrival: clock skew.
    ExpiredOnArrival,
    /// The fetch was abandoned (its runtime shut down) before it finished.
    Cancelled,
}

/// No valid token is available, and why. Cheap to clone: every caller waiting on the same failed
/// fetch receives the same error.
#[derive(Clone)]
pub struct TokenError {
    kind: TokenErrorKind,
    identity: String,
    scope: String,
    message: String,
    retry_in: Option<Duration>,
    source: Option<Arc<TokenSourceError>>,
}

impl TokenError {
    pub(crate) fn new(
        kind: TokenErrorKind,
        identity: &str,
        scope: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            identity: identity.to_owned(),
            scope: scope.to_owned(),
            message: message.into(),
            retry_in: None,
            source: None,
        }
    }

    pub(crate) fn from_source(identity: &str, scope: &str, error: TokenSourceError) -> Self {
        let mut e = Self::new(
            TokenErrorKind::Provider,
            identity,
            scope,
            error.message().to_owned(),
        );
        e.source = Some(Arc::new(error));
        e
    }

    pub(crate) fn with_retry_in(mut self, retry_in: Duration) -> Self {
        self.retry_in = Some(retry_in);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TokenErrorKind {
        self.kind
    }

    /// What the provider (or the cache) said went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// When the cache will next ask the provider, if it is backing off.
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_in
    }

    /// The delay the provider asked for (`Retry-After`), if any.
    pub fn provider_retry_after(&self) -> Option<Duration> {
        self.source.as_ref().and_then(|s| s.retry_after())
    }
}

impl fmt::Debug for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenError")
            .field("kind", &self.kind)
            .field("identity", &self.identity)
            .field("scope", &self.scope)
            .field("message", &self.message)
            .field("retry_in", &self.retry_in)
            .finish()
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let advice = match self.kind {
            TokenErrorKind::Provider => {
                "check the credential's configuration (tenant, client id, secret or federated token, managed identity assignment) and that the identity provider is reachable"
            }
            TokenErrorKind::Timeout => {
                "the identity provider is slow or unreachable; check network access to it"
            }
            TokenErrorKind::ExpiredOnArrival => {
                "check this machine's clock (NTP): the token expired before it could be used"
            }
            TokenErrorKind::Cancelled => {
                "the runtime running the fetch shut down; retry from a live runtime"
            }
        };
        write!(
            f,
            "no valid Entra ID access token for `{}` (scope {}): {}; {advice}",
            self.identity, self.scope, self.message
        )?;
        if let Some(retry_in) = self.retry_in {
            write!(f, " (next attempt in {:.1}s)", retry_in.as_secs_f64())?;
        }
        Ok(())
    }
}

impl StdError for TokenError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}
