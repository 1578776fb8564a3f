//! A login the server refused: [`LoginRejected`], where its role came from, and what became of
//! the retry.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use super::text::{flatten, human};
use super::token::TokenError;
use crate::claims::TokenClaims;

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
