//! Errors: one enum, a variant per cause a user acts on differently, each saying what to do.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::claims::TokenClaims;
use crate::token::TokenSourceError;

/// Everything that can go wrong getting a token or logging in with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No valid access token could be obtained from the identity provider.
    #[error(transparent)]
    Token(#[from] TokenError),

    /// The server refused the login, and a new token would not help (see [`LoginRejected`]).
    #[error(transparent)]
    LoginRejected(#[from] Box<LoginRejected>),

    /// TLS could not be set up: the server declined it, or its certificate did not verify. No
    /// token was sent.
    #[error("TLS to the PostgreSQL server failed, so no token was sent: {message}")]
    #[non_exhaustive]
    Tls {
        /// What failed, and what to check.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },

    /// The configuration cannot work (plaintext requested, bad scope, no role name, ...).
    #[error("invalid configuration: {message}")]
    #[non_exhaustive]
    Config {
        /// What is wrong and how to fix it.
        message: String,
        /// The underlying error, if another crate reported the problem.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },

    /// The server could not be reached, or the connection broke before the login finished (DNS,
    /// connection refused, timeout, reset).
    #[error(
        "could not reach PostgreSQL at {target}: {reason}; check the host name, the port, firewall rules or the private endpoint, and that the server is running"
    )]
    #[non_exhaustive]
    Connect {
        /// `host:port` (several, comma-separated, when the configuration names several).
        target: String,
        /// What the network said.
        reason: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Any other PostgreSQL failure (the server refused the session for another reason than
    /// the token, a query failed, ...).
    #[error("PostgreSQL: {}", chain(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

impl Error {
    /// A configuration error saying what is wrong and how to fix it (for crates building on this
    /// one, such as the pool adapters).
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
            source: None,
        }
    }

    /// A configuration error that another crate reported, e.g. a pool library's own settings.
    pub fn config_from(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Error::Config {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The server answered the request for TLS with a refusal: the token is never sent. For
    /// adapters whose driver does its own TLS (sqlx); `source` is the driver's error.
    pub fn tls_declined(source: Option<Box<dyn StdError + Send + Sync>>) -> Self {
        Error::Tls {
            message: "the server declined TLS; token login needs a server with TLS enabled"
                .to_owned(),
            source,
        }
    }

    /// Whether retrying later may succeed without a change of configuration: network and server
    /// availability, and identity-provider failures other than a rejected credential. `false`
    /// for configuration, TLS and rejected logins, which only a fix makes work.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Token(e) => !matches!(e.kind(), TokenErrorKind::CredentialRejected),
            Error::Connect { .. } => true,
            Error::Postgres(e) => {
                // Server-side refusals that persist: unknown database, missing privileges.
                !e.code().is_some_and(|code| {
                    code.code().starts_with("3D") || code.code().starts_with("42")
                })
            }
            Error::LoginRejected(_) | Error::Tls { .. } | Error::Config { .. } => false,
        }
    }
}

/// `error` and its sources, as one line: tokio-postgres's own `Display` leaves the cause out.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

/// What kind of failure kept the cache from producing a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// The identity provider could not be reached (DNS, connection refused or reset).
    Unreachable,
    /// No token arrived within the fetch timeout.
    Timeout,
    /// The provider throttled us (HTTP 429).
    Throttled,
    /// The provider refused the request (HTTP 4xx other than 429): a wrong secret or federated
    /// token, an unknown client id, an identity not assigned to this resource, a bad scope.
    CredentialRejected,
    /// The provider failed (HTTP 5xx).
    ServerError,
    /// The provider's answer could not be understood (malformed body).
    InvalidResponse,
    /// The provider returned a token that was already expired (or about to) on arrival: clock skew.
    ExpiredOnArrival,
    /// The fetch was abandoned before it finished (its Tokio runtime shut down).
    Cancelled,
    /// Any other failure the token source reported (e.g. a developer tool that is not logged in).
    Other,
}

impl TokenErrorKind {
    /// A short name, for logs and metrics: `unreachable`, `timeout`, `throttled`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            TokenErrorKind::Unreachable => "unreachable",
            TokenErrorKind::Timeout => "timeout",
            TokenErrorKind::Throttled => "throttled",
            TokenErrorKind::CredentialRejected => "credential_rejected",
            TokenErrorKind::ServerError => "server_error",
            TokenErrorKind::InvalidResponse => "invalid_response",
            TokenErrorKind::ExpiredOnArrival => "expired_on_arrival",
            TokenErrorKind::Cancelled => "cancelled",
            TokenErrorKind::Other => "other",
        }
    }

    /// What to check for this kind of failure, in a sentence.
    pub fn advice(self) -> &'static str {
        match self {
            TokenErrorKind::Unreachable => {
                "check network access to the identity provider (for managed identity: that this \
                 code runs on an Azure resource with an identity assigned)"
            }
            TokenErrorKind::Timeout => {
                "the identity provider is slow or unreachable, or the credential was still \
                 retrying failed requests internally (build it with RetryOptions::none() to see \
                 the provider's own error at once)"
            }
            TokenErrorKind::Throttled => {
                "the identity provider is throttling requests; the cache waits as asked"
            }
            TokenErrorKind::CredentialRejected => {
                "check the credential: tenant id, client id, secret or federated token, and that \
                 the managed identity is assigned to this resource"
            }
            TokenErrorKind::ServerError => {
                "the identity provider failed; the cache retries with backoff"
            }
            TokenErrorKind::InvalidResponse => {
                "the identity provider's answer was not understood; check proxies between here \
                 and the provider"
            }
            TokenErrorKind::ExpiredOnArrival => {
                "check this machine's clock (NTP): the token expired before it could be used"
            }
            TokenErrorKind::Cancelled => {
                "the Tokio runtime running the fetch shut down; the next call fetches again"
            }
            TokenErrorKind::Other => {
                "check the credential's configuration and that the identity provider is reachable"
            }
        }
    }
}

/// No valid token is available, and why: the identity provider's answer (HTTP status, error code
/// and description, never a secret), classified. Cheap to clone: every caller waiting on the same
/// failed fetch receives the same error.
#[derive(Clone)]
pub struct TokenError {
    what: Arc<WhatFailed>,
    retry_in: Option<Duration>,
}

struct WhatFailed {
    kind: TokenErrorKind,
    identity: String,
    scope: String,
    message: String,
    http_status: Option<u16>,
    provider_code: Option<String>,
    source: Option<TokenSourceError>,
}

impl TokenError {
    pub(crate) fn new(
        kind: TokenErrorKind,
        identity: &str,
        scope: &str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            what: Arc::new(WhatFailed {
                kind,
                identity: identity.to_owned(),
                scope: scope.to_owned(),
                message: message.into(),
                http_status: None,
                provider_code: None,
                source: None,
            }),
            retry_in: None,
        }
    }

    pub(crate) fn from_source(identity: &str, scope: &str, error: TokenSourceError) -> Self {
        Self {
            what: Arc::new(WhatFailed {
                kind: error.kind(),
                identity: identity.to_owned(),
                scope: scope.to_owned(),
                message: error.message().to_owned(),
                http_status: error.http_status(),
                provider_code: error.provider_code().map(str::to_owned),
                source: Some(error),
            }),
            retry_in: None,
        }
    }

    pub(crate) fn with_retry_in(mut self, retry_in: Duration) -> Self {
        self.retry_in = Some(retry_in);
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TokenErrorKind {
        self.what.kind
    }

    /// What the provider (or the cache) said went wrong.
    pub fn message(&self) -> &str {
        &self.what.message
    }

    /// The HTTP status the identity provider answered with, if it answered.
    pub fn http_status(&self) -> Option<u16> {
        self.what.http_status
    }

    /// The provider's error code (e.g. `invalid_client (AADSTS7000215)`), if it gave one.
    pub fn provider_code(&self) -> Option<&str> {
        self.what.provider_code.as_deref()
    }

    /// The identity the token was for (the token source's readable name).
    pub fn identity(&self) -> &str {
        &self.what.identity
    }

    /// The scope the token was requested for.
    pub fn scope(&self) -> &str {
        &self.what.scope
    }

    /// When the cache will next ask the provider, if it is backing off.
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_in
    }

    /// The delay the provider asked for (`Retry-After`), if any.
    pub fn provider_retry_after(&self) -> Option<Duration> {
        self.what.source.as_ref().and_then(|s| s.retry_after())
    }
}

impl fmt::Debug for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = &self.what;
        f.debug_struct("TokenError")
            .field("kind", &what.kind)
            .field("identity", &what.identity)
            .field("scope", &what.scope)
            .field("message", &what.message)
            .field("http_status", &what.http_status)
            .field("provider_code", &what.provider_code)
            .field("retry_in", &self.retry_in)
            .finish()
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = &self.what;
        write!(
            f,
            "no valid Entra ID access token for {} (scope {}): ",
            what.identity, what.scope
        )?;
        match (what.http_status, &what.provider_code) {
            (Some(status), Some(code)) => write!(f, "HTTP {status} {code}: ")?,
            (Some(status), None) => write!(f, "HTTP {status}: ")?,
            (None, Some(code)) => write!(f, "{code}: ")?,
            (None, None) => {}
        }
        write!(f, "{}; {}", what.message, what.kind.advice())?;
        if let Some(retry_in) = self.retry_in {
            write!(f, " (next attempt in {:.1}s)", retry_in.as_secs_f64())?;
        }
        Ok(())
    }
}

impl StdError for TokenError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.what
            .source
            .as_ref()
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// Where the role a login asked for came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoleSource {
    /// The connector's `role_name(..)`.
    Connector,
    /// The user in the connection's configuration (`user=`, `PGUSER`, the pool's `user`).
    ConnectionConfig,
    /// The token's claims: the claim it was read from (`xms_mirid`, `upn`, ...).
    TokenClaim(&'static str),
}

impl fmt::Display for RoleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleSource::Connector => f.write_str("set with the connector's role_name"),
            RoleSource::ConnectionConfig => f.write_str("the user in the connection settings"),
            RoleSource::TokenClaim(claim) => write!(f, "read from the token's `{claim}` claim"),
        }
    }
}

/// What became of the one retry after the server refused a token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoginRetry {
    /// A different token, fetched after the first refusal, was refused too.
    FreshTokenRefused,
    /// The identity provider returned the same token again (azure_identity's credentials keep
    /// their token until 5 minutes before it expires), so retrying could not help.
    SameTokenReturned,
    /// A token fetched after a refusal was refused already; no new one was asked for.
    AlreadyReplaced,
    /// No new token could be fetched: the provider's error.
    NoNewToken(String),
}

/// The server refused the login, and the token was not the problem: it was valid for the
/// server's audience as far as this side can tell, and a fresh one was refused too (or the
/// provider would only return the same one). What was asked, what the token says, and the fixes.
#[derive(Debug, Clone)]
pub struct LoginRejected {
    pub(crate) role: String,
    pub(crate) role_source: RoleSource,
    pub(crate) claims: Option<TokenClaims>,
    pub(crate) token_expires_on: SystemTime,
    pub(crate) code: String,
    pub(crate) server_message: String,
    pub(crate) retry: LoginRetry,
}

impl LoginRejected {
    /// The role the login asked for.
    pub fn role(&self) -> &str {
        &self.role
    }
    /// Where that role name came from.
    pub fn role_source(&self) -> &RoleSource {
        &self.role_source
    }
    /// The SQLSTATE the server answered with (28000 or 28P01).
    pub fn code(&self) -> &str {
        &self.code
    }
    /// The server's message.
    pub fn server_message(&self) -> &str {
        &self.server_message
    }
    /// The claims of the refused token (names and ids, never the token).
    pub fn token_claims(&self) -> Option<&TokenClaims> {
        self.claims.as_ref()
    }
    /// What became of the retry.
    pub fn retry(&self) -> &LoginRetry {
        &self.retry
    }
    /// Whether a second, fresh token was refused too.
    pub fn fresh_token_refused(&self) -> bool {
        self.retry == LoginRetry::FreshTokenRefused
    }
}

impl fmt::Display for LoginRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL refused the Entra ID login as role `{}` ({}) with {}: {}; ",
            self.role, self.role_source, self.code, self.server_message
        )?;
        let valid_for = self
            .token_expires_on
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let minutes = valid_for.as_secs().div_ceil(60);
        match &self.retry {
            LoginRetry::FreshTokenRefused | LoginRetry::AlreadyReplaced => write!(
                f,
                "a freshly fetched token, valid for another {minutes} min, was refused too, so the token is not the problem"
            )?,
            LoginRetry::SameTokenReturned => write!(
                f,
                "the token is valid for another {minutes} min and the identity provider returns the same one, so a new token would not help"
            )?,
            LoginRetry::NoNewToken(why) => {
                write!(f, "no fresh token could be fetched to retry ({why})")?
            }
        }
        if let Some(claims) = &self.claims {
            write!(f, "; the token is for {claims}")?;
            if let Ok(name) = claims.role_name()
                && name.name != self.role
            {
                write!(
                    f,
                    " and names the principal `{}` ({})",
                    name.name, name.claim
                )?;
            }
        }
        write!(
            f,
            ". Likely fixes: the role must exist and be mapped to this principal's object id; as an \
             Entra administrator run `select * from pgaadauth_create_principal('<name>', false, false)` \
             with the user principal name (users) or the display name (applications, managed \
             identities, groups); if the role was created under another name \
             (pgaadauth_create_principal_with_oid), log in with that name; to log in through a \
             group role, the principal must be a member of the group"
        )
    }
}

impl StdError for LoginRejected {}
