//! The identity provider's failures: [`TokenError`] and its kinds.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::text::flatten;

/// What kind of failure kept the cache from producing a valid token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// The identity provider could not be reached (DNS, connection refused or reset).
    Unreachable,
    /// No token arrived in time.
    Timeout,
    /// The provider throttled us (HTTP 429).
    Throttled,
    /// The provider refused the request (HTTP 4xx other than 429): a wrong secret or federated
    /// token, an unknown client id, a disabled or deleted principal, an identity not assigned to
    /// this resource, a bad scope.
    CredentialRejected,
    /// The provider failed (HTTP 5xx).
    ServerError,
    /// The provider's answer could not be understood (malformed body).
    InvalidResponse,
    /// The provider returned a token that was already expired (or about to) on arrival: clock skew.
    ExpiredOnArrival,
    /// The fetch was abandoned before it finished (its Tokio runtime shut down, or the token
    /// source, or a log sink or meter it wrote to, panicked).
    Cancelled,
    /// Any other failure the token source reported (e.g. a developer tool that is not logged in).
    Other,
}

impl TokenErrorKind {
    /// The kind an HTTP status from the identity provider means: 429 throttled, other 4xx
    /// credential rejected, 5xx server error.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            429 => TokenErrorKind::Throttled,
            400..=499 => TokenErrorKind::CredentialRejected,
            500..=599 => TokenErrorKind::ServerError,
            _ => TokenErrorKind::Other,
        }
    }

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

    /// Whether asking again later may succeed without a fix: not for a rejected credential, nor
    /// for a failure the source could not classify (such as a developer tool that is not logged
    /// in), which need a person.
    pub fn is_transient(self) -> bool {
        !matches!(
            self,
            TokenErrorKind::CredentialRejected | TokenErrorKind::Other
        )
    }

    /// Whether the provider is unavailable (rather than refusing): nothing could replace a
    /// session whose token has run out, so pools keep their sessions (see `SessionOptions`).
    pub(crate) fn is_unavailability(self) -> bool {
        matches!(
            self,
            TokenErrorKind::Unreachable
                | TokenErrorKind::Timeout
                | TokenErrorKind::Throttled
                | TokenErrorKind::ServerError
                | TokenErrorKind::InvalidResponse
                | TokenErrorKind::ExpiredOnArrival
        )
    }

    /// What to do about this kind of failure, in a sentence a person can act on.
    pub fn advice(self) -> &'static str {
        match self {
            TokenErrorKind::Unreachable => {
                "check network access to the identity provider (for managed identity: that this \
                 code runs on an Azure resource with an identity assigned)"
            }
            TokenErrorKind::Timeout => {
                "check network access to the identity provider and its latency from here; \
                 new logins resume once it answers"
            }
            TokenErrorKind::Throttled => {
                "the identity provider is throttling this identity: share one connector between \
                 pools, and look for other clients using the same identity"
            }
            TokenErrorKind::CredentialRejected => {
                "check the credential: tenant id, client id, secret or federated token, that the \
                 principal is enabled, and that the managed identity is assigned to this resource"
            }
            TokenErrorKind::ServerError => {
                "the identity provider is failing: check Azure status for Microsoft Entra ID; \
                 new logins resume once it answers"
            }
            TokenErrorKind::InvalidResponse => {
                "the identity provider's answer was not understood: check proxies between here \
                 and the provider"
            }
            TokenErrorKind::ExpiredOnArrival => {
                "check this machine's clock (NTP): the token expired before it could be used"
            }
            TokenErrorKind::Cancelled => {
                "the fetch ended before it finished (its Tokio runtime shut down, or the token \
                 source, a log sink or a meter panicked); the next call fetches again"
            }
            TokenErrorKind::Other => {
                "check the credential's configuration (for developer tools: `az login`)"
            }
        }
    }
}

/// No valid token could be had, and why: what the identity provider answered (HTTP status,
/// error code and description, never a secret), classified.
///
/// A [`crate::TokenSource`] reports its failures with [`TokenError::new`] and the `with_*`
/// methods; the cache adds the identity and scope. Cheap to clone.
#[derive(Clone)]
pub struct TokenError {
    what: Arc<WhatFailed>,
}

#[derive(Clone)]
struct WhatFailed {
    kind: TokenErrorKind,
    identity: String,
    scope: String,
    message: String,
    http_status: Option<u16>,
    provider_code: Option<String>,
    retry_after: Option<Duration>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
    retry_in: Option<Duration>,
}

impl TokenError {
    /// A failure of `kind`, with a message saying what failed (it must not contain any token
    /// or secret).
    pub fn new(kind: TokenErrorKind, message: impl Into<String>) -> Self {
        Self {
            what: Arc::new(WhatFailed {
                kind,
                identity: String::new(),
                scope: String::new(),
                message: message.into(),
                http_status: None,
                provider_code: None,
                retry_after: None,
                source: None,
                retry_in: None,
            }),
        }
    }

    fn edit(mut self, change: impl FnOnce(&mut WhatFailed)) -> Self {
        change(Arc::make_mut(&mut self.what));
        self
    }

    /// The HTTP status the identity provider answered with.
    #[must_use]
    pub fn with_http_status(self, status: u16) -> Self {
        self.edit(|w| w.http_status = Some(status))
    }

    /// The provider's error code (OAuth `error`, e.g. `invalid_client`, and Entra's `AADSTS`
    /// number: `invalid_client (AADSTS7000215)`).
    #[must_use]
    pub fn with_provider_code(self, code: impl Into<String>) -> Self {
        let code = code.into();
        self.edit(|w| w.provider_code = Some(code))
    }

    /// The provider asked not to be called again before this delay (HTTP `Retry-After`).
    #[must_use]
    pub fn with_retry_after(self, retry_after: Duration) -> Self {
        self.edit(|w| w.retry_after = Some(retry_after))
    }

    /// The underlying error: this error's [`source()`](StdError::source) (see there), printed
    /// after this error's own text by reports that print the chain, and
    /// [`provider_error`](TokenError::provider_error).
    #[must_use]
    pub fn with_source(self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.edit(|w| w.source = Some(Arc::new(source)))
    }

    pub(crate) fn for_cache(self, identity: &str, scope: &str) -> Self {
        self.edit(|w| {
            w.identity = identity.to_owned();
            w.scope = scope.to_owned();
        })
    }

    pub(crate) fn with_retry_in(self, retry_in: Duration) -> Self {
        self.edit(|w| w.retry_in = Some(retry_in))
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TokenErrorKind {
        self.what.kind
    }

    /// What the token source (or the cache) said went wrong, without the underlying error's
    /// text (that is [`source()`](StdError::source)).
    pub fn message(&self) -> &str {
        &self.what.message
    }

    /// The underlying error as the token source gave it ([`TokenError::with_source`]): for
    /// `AzureTokenSource`, the `azure_core::Error` its credential returned, to downcast.
    pub fn provider_error(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.what.source.as_deref()
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

    /// How long until the cache next asks the provider, when it said so.
    pub fn retry_in(&self) -> Option<Duration> {
        self.what.retry_in
    }

    /// The delay the provider asked for (`Retry-After`), if any.
    pub fn provider_retry_after(&self) -> Option<Duration> {
        self.what.retry_after
    }

    /// `HTTP 401 invalid_client: <the message>`, each fact once (a part of the provider code that
    /// the message or the source already says is left out).
    fn what_failed(&self) -> String {
        let what = &self.what;
        let text = what.message.as_str();
        let mut said = text.to_owned();
        if let Some(source) = &what.source {
            said.push_str(&flatten(source.as_ref()));
        }
        let mut head = Vec::new();
        if let Some(status) = what.http_status {
            head.push(format!("HTTP {status}"));
        }
        if let Some(code) = &what.provider_code {
            // Entra's description usually repeats its AADSTS number: print what it does not say.
            head.extend(
                code.split_whitespace()
                    .filter(|part| !said.contains(part.trim_matches(|c| c == '(' || c == ')')))
                    .map(str::to_owned),
            );
        }
        match (head.is_empty(), text.is_empty()) {
            (true, _) => text.to_owned(),
            (false, true) => head.join(" "),
            (false, false) => format!("{}: {text}", head.join(" ")),
        }
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
            .field("source", &what.source.as_deref().map(|e| flatten(e)))
            .field("http_status", &what.http_status)
            .field("provider_code", &what.provider_code)
            .field("retry_in", &what.retry_in)
            .finish()
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = &self.what;
        f.write_str("could not get an Entra ID access token")?;
        if !what.identity.is_empty() {
            write!(f, " for {}", what.identity)?;
        }
        if !what.scope.is_empty() {
            write!(f, " (scope {})", what.scope)?;
        }
        let what_failed = self.what_failed();
        if !what_failed.is_empty() {
            write!(f, ": {what_failed}")?;
        }
        write!(f, "; {}", what.kind.advice())?;
        if let Some(retry_in) = what.retry_in {
            write!(f, " (next attempt in {:.1} s)", retry_in.as_secs_f64())?;
        }
        Ok(())
    }
}

impl StdError for TokenError {
    /// The underlying error, less the errors at the top of its chain that print their own source
    /// too (azure_core's errors print their inner error and return it as their source), so that a
    /// report of the chain says each part once. [`TokenError::provider_error`] is the error as
    /// given.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        let mut error: &(dyn StdError + 'static) = self.what.source.as_deref()?;
        while let Some(inner) = error.source()
            && error.to_string().contains(inner.to_string().trim())
        {
            error = inner;
        }
        Some(error)
    }
}
