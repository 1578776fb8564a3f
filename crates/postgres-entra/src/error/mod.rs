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

mod login;
mod text;
mod token;

pub use login::{LoginRejected, LoginRetry, RoleSource};
pub(crate) use text::{Report, flatten, human};
pub use token::{TokenError, TokenErrorKind};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::TokenClaims;
    use std::time::Duration;

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
