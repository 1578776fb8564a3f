//! Errors: one enum, a variant per cause a user acts on differently, each saying what to do.
//!
//! Every error keeps what another crate reported underneath it as its `source()`, typed: an
//! [`std::io::Error`] for a network failure, the driver's server error (with its SQLSTATE) for a
//! refused session, rustls' error for a certificate, the identity provider's error for a token.
//! An error's own text never repeats its source's, so a report that prints the chain (`{:#}` with
//! anyhow or eyre) shows each fact once; `{e}` alone says what failed and what to do.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::claims::TokenClaims;

/// An error another crate reported, kept as the `source()` of ours.
pub(crate) type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong getting a token or logging in with it.
///
/// Cheap to clone: every caller waiting on one failed fetch or login gets the same error. The
/// error underneath, when there is one, is its [`source()`](StdError::source): downcast it to
/// [`std::io::Error`], `tokio_postgres::error::DbError`, `rustls::Error` or
/// `azure_core::Error`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// No valid access token could be had from the identity provider. Its source is the
    /// provider's error (see [`TokenError`]).
    Token(TokenError),

    /// The server refused the login, and another token would not help (see [`LoginRejected`]).
    LoginRejected(Box<LoginRejected>),

    /// TLS could not be set up: the server declined it, or its certificate did not verify. No
    /// token was sent.
    #[non_exhaustive]
    Tls {
        /// What failed, and what to check.
        message: String,
        /// What rustls (or the network) said, when it said something.
        source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    },

    /// The configuration cannot work (plaintext requested, a bad scope, no role name, a server
    /// in another cloud, ...).
    #[non_exhaustive]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The server could not be reached, or the connection broke before the login finished (DNS,
    /// connection refused, timeout, reset).
    #[non_exhaustive]
    Connect {
        /// `host:port` (several, comma-separated, when the settings name several).
        target: String,
        /// What the network said: an [`std::io::Error`] (its `kind()` is e.g. `ConnectionRefused`
        /// or, for the pool's create limit, `TimedOut`).
        source: Arc<std::io::Error>,
    },

    /// The server refused the session for another reason than the token (an unknown database,
    /// too many connections, ...).
    #[non_exhaustive]
    Postgres {
        /// The SQLSTATE, when the server sent one.
        code: Option<String>,
        /// The server's message (or the driver's, when the server sent none).
        message: String,
        /// The driver's error for it, when there is one (tokio-postgres's `DbError`).
        source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Token(error) => error.fmt(f),
            Error::LoginRejected(rejected) => rejected.fmt(f),
            Error::Tls { message, .. } => write!(
                f,
                "TLS to the PostgreSQL server failed, so no token was sent: {message}"
            ),
            Error::Config { message } => write!(f, "invalid configuration: {message}"),
            Error::Connect { target, .. } => write!(
                f,
                "could not reach PostgreSQL at {target} (check the host name, the port, firewall \
                 rules or the private endpoint, and that the server is running)"
            ),
            Error::Postgres {
                code,
                message,
                source,
            } => {
                f.write_str("PostgreSQL refused the session")?;
                if let Some(code) = code {
                    write!(f, " with SQLSTATE {code}")?;
                }
                match source {
                    Some(_) => Ok(()),
                    None => write!(f, ": {message}"),
                }
            }
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Token(error) => error.source(),
            Error::LoginRejected(_) | Error::Config { .. } => None,
            Error::Tls { source, .. } | Error::Postgres { source, .. } => {
                source.as_deref().map(|e| e as &(dyn StdError + 'static))
            }
            Error::Connect { source, .. } => Some(source.as_ref()),
        }
    }
}

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config {
            message: message.into(),
        }
    }

    pub(crate) fn tls(message: impl Into<String>, source: Option<Cause>) -> Self {
        Error::Tls {
            message: message.into(),
            source,
        }
    }

    pub(crate) fn connect(target: impl Into<String>, source: std::io::Error) -> Self {
        Error::Connect {
            target: target.into(),
            source: Arc::new(source),
        }
    }

    pub(crate) fn postgres(
        code: Option<&str>,
        message: impl Into<String>,
        source: Option<Cause>,
    ) -> Self {
        Error::Postgres {
            message: message.into(),
            code: code.map(str::to_owned),
            source,
        }
    }

    /// The server declined TLS: the token was never sent.
    pub(crate) fn tls_declined() -> Self {
        Self::tls(
            "the server declined TLS; token login needs a server with TLS enabled",
            None,
        )
    }

    /// Whether retrying later may succeed without a change of configuration: network and server
    /// availability, and identity-provider failures other than a rejected credential. `false`
    /// for configuration, TLS and refused logins, which only a fix makes work.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Token(e) => e.kind().is_transient(),
            Error::Connect { .. } => true,
            // Refusals that persist: no such database, missing privileges, authorization; and a
            // failure nothing classified (no SQLSTATE: a protocol or driver error), which nothing
            // says will pass.
            Error::Postgres { code: None, .. } => false,
            Error::Postgres { code: Some(c), .. } => {
                !(c.starts_with("3D") || c.starts_with("42") || c.starts_with("28"))
            }
            Error::LoginRejected(_) | Error::Tls { .. } | Error::Config { .. } => false,
        }
    }

    /// The SQLSTATE the server answered with, for a refused login or session.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::LoginRejected(rejected) => Some(rejected.code()),
            Error::Postgres { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

impl From<TokenError> for Error {
    fn from(error: TokenError) -> Self {
        Error::Token(error)
    }
}

impl From<LoginRejected> for Error {
    fn from(rejected: LoginRejected) -> Self {
        Error::LoginRejected(Box::new(rejected))
    }
}

/// `error` and its sources as one line, each part once: a part already contained in what came
/// before (libraries often print their source in their own message too) is left out, and
/// multi-line messages are joined.
pub(crate) fn flatten(error: &(dyn StdError + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        append_part(&mut text, &e.to_string());
        next = e.source();
    }
    text
}

/// `error` and its sources, each part once, on one line: how the library logs an error.
pub(crate) struct Report<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&flatten(self.0))
    }
}

/// Appends `part` (made one line) to `text` after `: `, unless `text` already says it.
fn append_part(text: &mut String, part: &str) {
    let part = part
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if part.is_empty() || text.contains(&part) {
        return;
    }
    if !text.is_empty() {
        text.push_str(": ");
    }
    text.push_str(&part);
}

/// A duration as a person reads it: `42 s`, `3 min`, `2 h 5 min`.
pub(crate) fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 90 {
        format!("{secs} s")
    } else if secs < 90 * 60 {
        format!("{} min", (secs + 30) / 60)
    } else {
        format!("{} h {} min", secs / 3600, (secs % 3600) / 60)
    }
}

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
    /// source panicked).
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
                 source panicked); the next call fetches again"
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

/// Where the role a login asked for came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoleSource {
    /// The connector's `role_name(..)`.
    Connector,
    /// The user in the pool's connection settings (`user=`, the URL, the pool's `user`).
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
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LoginRetry {
    /// A different token, fetched after the first refusal, was refused too.
    FreshTokenRefused,
    /// The token source answered with the same token again from a cache of its own (a
    /// credential passed to `AzureTokenSource::new` keeps its token until 5 minutes before it
    /// expires; Azure caches managed identities' tokens on its side; the Azure CLI has its own
    /// cache), so retrying could not help.
    SameTokenReturned,
    /// A token fetched after a refusal was refused already; no new one was asked for.
    AlreadyReplaced,
    /// No retry was made: the driver opens its connections itself (sqlx), or refused logins
    /// were backing off and this login was the one attempt let through.
    NotRetried,
    /// No new token could be had to retry with: the provider's error.
    NoNewToken(TokenError),
}

/// The server refused the login, and the token was not the problem: it was valid for the
/// server's audience as far as this side can tell, and a fresh one was refused too (or the
/// provider would only return the same one). What was asked, what the token says, and the fixes.
#[derive(Debug, Clone)]
pub struct LoginRejected {
    pub(crate) role: String,
    pub(crate) role_source: RoleSource,
    pub(crate) claims: Option<TokenClaims>,
    /// How long the refused token was still valid for, when it was refused.
    pub(crate) token_valid_for: Duration,
    pub(crate) code: String,
    pub(crate) server_message: String,
    pub(crate) retry: LoginRetry,
    /// The pool does not log in again before this (refused logins back off).
    pub(crate) next_attempt_in: Option<Duration>,
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
    /// When the pool logs in again: refused logins back off, so that a revoked principal does not
    /// flood the server with refused logins.
    pub fn next_attempt_in(&self) -> Option<Duration> {
        self.next_attempt_in
    }
}

impl fmt::Display for LoginRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL refused the Entra ID login as role `{}` ({}) with {}: {}; ",
            self.role, self.role_source, self.code, self.server_message
        )?;
        let valid_for = human(self.token_valid_for);
        match &self.retry {
            LoginRetry::FreshTokenRefused | LoginRetry::AlreadyReplaced => write!(
                f,
                "a freshly fetched token, valid for another {valid_for}, was refused too, so the token is not the problem"
            )?,
            LoginRetry::SameTokenReturned => write!(
                f,
                "the token is valid for another {valid_for} and the identity provider returns the same one, so a new token would not help"
            )?,
            LoginRetry::NotRetried => write!(f, "the token was valid for another {valid_for}")?,
            LoginRetry::NoNewToken(why) => write!(
                f,
                "no fresh token could be had to retry with ({})",
                flatten(why)
            )?,
        }
        // Ids and resource names only: a person's names (upn and the like) stay out of what is
        // logged at warn; `token_claims()` has them, and the pool logs them at debug.
        if let Some(claims) = &self.claims {
            write!(f, "; the token is for {}", claims.impersonal())?;
            if let Some((name, claim @ "xms_mirid")) = claims.role_name()
                && name != self.role
            {
                write!(f, " and names the principal `{name}` ({claim})")?;
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
        )?;
        if let Some(next) = self.next_attempt_in {
            write!(f, " (this pool logs in again in {})", human(next))?;
        }
        Ok(())
    }
}

impl StdError for LoginRejected {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn StdError + 'static))
        }
    }

    #[test]
    fn a_flattened_chain_says_each_part_once_on_one_line() {
        // azure_core's shape: a message that contains its source's, then the source twice.
        let chain = Layer(
            "ClientSecretCredential authentication failed. AADSTS7000215: bad secret\nTo troubleshoot, visit https://aka.ms/x",
            Some(Box::new(Layer(
                "AADSTS7000215: bad secret",
                Some(Box::new(Layer(
                    "AADSTS7000215: bad secret",
                    Some(Box::new(Layer("connection reset", None))),
                ))),
            ))),
        );
        assert_eq!(
            flatten(&chain),
            "ClientSecretCredential authentication failed. AADSTS7000215: bad secret To troubleshoot, visit https://aka.ms/x: connection reset"
        );
    }

    #[test]
    fn a_token_error_names_status_and_code_once_and_keeps_its_source() {
        let error = TokenError::new(TokenErrorKind::CredentialRejected, "")
            .with_http_status(401)
            .with_provider_code("invalid_client (AADSTS7000215)")
            .with_source(Layer("AADSTS7000215: Invalid client secret provided", None))
            .for_cache(
                "ClientSecretCredential (client id 2d97)",
                "https://x/.default",
            );
        assert_eq!(
            error.to_string(),
            "could not get an Entra ID access token for ClientSecretCredential (client id 2d97) (scope https://x/.default): \
             HTTP 401 invalid_client; check the credential: tenant id, \
             client id, secret or federated token, that the principal is enabled, and that the managed identity is \
             assigned to this resource"
        );
        let source = error.source().expect("the source is kept");
        assert!(source.downcast_ref::<Layer>().is_some());
        let text = flatten(&error);
        assert!(
            text.ends_with(": AADSTS7000215: Invalid client secret provided"),
            "{text}"
        );
        assert_eq!(text.matches("AADSTS7000215").count(), 1);
        let bare = TokenError::new(TokenErrorKind::ServerError, "").with_http_status(500);
        assert!(bare.to_string().contains(": HTTP 500; "), "{bare}");
    }

    /// A token with these claims, unsigned (only its claims are read).
    fn claims(payload: &str) -> TokenClaims {
        use base64::Engine as _;
        let encode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", encode(r#"{"alg":"RS256"}"#), encode(payload));
        TokenClaims::parse(&token).unwrap()
    }

    fn refused(role: &str, claims: TokenClaims) -> String {
        LoginRejected {
            role: role.to_owned(),
            role_source: RoleSource::ConnectionConfig,
            claims: Some(claims),
            token_valid_for: Duration::from_secs(60),
            code: "28000".to_owned(),
            server_message: "LDAP authentication failed".to_owned(),
            retry: LoginRetry::FreshTokenRefused,
            next_attempt_in: None,
        }
        .to_string()
    }

    #[test]
    fn a_refused_login_names_no_person_only_ids_and_resource_names() {
        let user = claims(
            r#"{"upn":"alice@contoso.com","preferred_username":"alice@contoso.com","unique_name":"Alice Smith","oid":"o-1","tid":"t-1","appid":"a-1"}"#,
        );
        let text = refused("app-readers", user);
        assert!(text.contains("oid o-1"), "{text}");
        for personal in ["alice", "Alice", "t-1"] {
            assert!(!text.contains(personal), "{personal} in {text}");
        }
        let managed = claims(
            r#"{"xms_mirid":"/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders-mi","oid":"o-2","idtyp":"app","appid":"a-2"}"#,
        );
        let text = refused("orders-api", managed);
        assert!(text.contains("managed identity `orders-mi`"), "{text}");
        assert!(
            text.contains("names the principal `orders-mi` (xms_mirid)"),
            "{text}"
        );
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(89)), "89 s");
        assert_eq!(human(Duration::from_secs(300)), "5 min");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 600)), "3 h 10 min");
    }

    #[test]
    fn only_failures_that_may_pass_are_transient() {
        assert!(!TokenErrorKind::Other.is_transient());
        assert!(!TokenErrorKind::CredentialRejected.is_transient());
        assert!(TokenErrorKind::ServerError.is_transient());
        assert!(!Error::config("x").is_transient());
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(Error::connect("h:5432", refused).is_transient());
        assert!(!Error::postgres(Some("3D000"), "no such database", None).is_transient());
        assert!(Error::postgres(Some("53300"), "too many connections", None).is_transient());
        assert!(!Error::postgres(None, "unexpected message from server", None).is_transient());
    }
}
