//! The bridge to `azure_core` credentials: any `TokenCredential` (managed identity, workload
//! identity, client secret, developer tools, ...) becomes a [`TokenSource`], and what the identity
//! provider answered (HTTP status, Entra error code and description) is kept in its errors.

use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, RetryOptions};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, TokenError, TokenErrorKind};
use crate::token::{AccessToken, TokenFuture, TokenSource};

/// A [`TokenSource`] over an `azure_identity` credential.
///
/// The constructors build the credentials this library recommends, with azure_core's own retry
/// policy off (`RetryOptions::none()`): the token cache already retries (with backoff while a
/// valid token is still served, every 0.8 s while none is), so a failing identity provider's
/// answer (HTTP status, `AADSTS` code) reaches your logs and errors at once instead of after
/// azure_core's eight retries. On a VM, azure_identity's instance metadata (IMDS) credential keeps
/// Microsoft's IMDS retry guidance whatever is asked. [`AzureTokenSource::new`] takes any other
/// credential as it was built.
///
/// Its identity, shown in errors, logs and metrics, is the credential's kind and, where the
/// credential shows it, its client id (`ClientSecretCredential (client id 3f2b…)`); give one of
/// your own with [`AzureTokenSource::with_identity`].
pub struct AzureTokenSource {
    credential: Arc<dyn TokenCredential>,
    identity: String,
}

/// azure_core's client options without its retry policy.
fn no_retries() -> ClientOptions {
    ClientOptions {
        retry: RetryOptions::none(),
        ..Default::default()
    }
}

fn credential_error(kind: &str, error: azure_core::Error) -> Error {
    Error::config(format!(
        "cannot build the {kind} credential: {}",
        crate::error::flatten(&error)
    ))
}

impl AzureTokenSource {
    /// A source over `credential`, built as you chose, named after the credential's kind and
    /// client id.
    pub fn new(credential: Arc<dyn TokenCredential>) -> Self {
        let identity = describe(credential.as_ref());
        Self {
            credential,
            identity,
        }
    }

    /// A source over `credential` named `identity` (e.g. the managed identity's name).
    #[must_use]
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// The managed identity of the Azure resource this code runs on (App Service, Functions,
    /// Container Apps, a VM, AKS with pod identity): the system-assigned one, or the user-assigned
    /// one `user_assigned` names by client, object or resource id.
    pub fn managed_identity(user_assigned: Option<UserAssignedId>) -> Result<Self, Error> {
        // `..Default::default()` for the fields azure_identity may add.
        #[allow(clippy::needless_update)]
        let options = ManagedIdentityCredentialOptions {
            user_assigned_id: user_assigned,
            client_options: no_retries(),
            ..Default::default()
        };
        ManagedIdentityCredential::new(Some(options))
            .map(|credential| Self::new(credential))
            .map_err(|e| credential_error("managed identity", e))
    }

    /// AKS workload identity: the federated token in `AZURE_FEDERATED_TOKEN_FILE`, for
    /// `AZURE_CLIENT_ID` in `AZURE_TENANT_ID` (the variables the workload identity webhook sets).
    pub fn workload_identity() -> Result<Self, Error> {
        let options = WorkloadIdentityCredentialOptions {
            credential_options: ClientAssertionCredentialOptions {
                client_options: no_retries(),
            },
            ..Default::default()
        };
        WorkloadIdentityCredential::new(Some(options))
            .map(|credential| Self::new(credential))
            .map_err(|e| credential_error("workload identity", e))
    }

    /// An app registration's client secret.
    pub fn client_secret(
        tenant_id: &str,
        client_id: impl Into<String>,
        secret: impl Into<String>,
    ) -> Result<Self, Error> {
        let options = ClientSecretCredentialOptions {
            client_options: no_retries(),
        };
        ClientSecretCredential::new(
            tenant_id,
            client_id.into(),
            secret.into().into(),
            Some(options),
        )
        .map(|credential| Self::new(credential))
        .map_err(|e| credential_error("client secret", e))
    }

    /// A developer's own login: the Azure CLI (`az login`), else the Azure Developer CLI (`azd
    /// auth login`). These run the tool for every token, which the cache makes once per token.
    pub fn developer_tools() -> Result<Self, Error> {
        DeveloperToolsCredential::new(None)
            .map(|credential| Self::new(credential))
            .map_err(|e| credential_error("developer tools", e))
    }
}

/// The credential's kind (the last segment of the type name its `Debug` prints) and its
/// `client_id` field where its `Debug` shows one; azure_identity's `Debug` impls print nothing
/// secret, and only these two pieces are kept.
fn describe(credential: &dyn TokenCredential) -> String {
    let debug = format!("{credential:?}");
    let path = debug.split([' ', '{', '(', '<']).next().unwrap_or_default();
    let kind = path.rsplit("::").next().unwrap_or_default();
    let kind = if !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        kind
    } else {
        "azure credential"
    };
    let client_id = debug
        .split_once("client_id: \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(id, _)| id)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    match client_id {
        Some(id) => format!("{kind} (client id {id})"),
        None => kind.to_owned(),
    }
}

impl fmt::Debug for AzureTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureTokenSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The longest provider description kept in an error: Entra's run to a few hundred bytes.
const MAX_DESCRIPTION: usize = 600;

/// What the provider said, from the first HTTP answer in `error`'s chain (credentials wrap the
/// HTTP error in an authentication error), else the kind of the transport failure; the message is
/// the whole chain, each part once, cut at a readable length.
fn classify(error: &azure_core::Error) -> TokenError {
    let mut message = crate::error::flatten(error);
    if message.len() > MAX_DESCRIPTION {
        let cut = (0..=MAX_DESCRIPTION)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    let mut kind = TokenErrorKind::Other;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(azure) = e.downcast_ref::<azure_core::Error>() {
            match azure.kind() {
                ErrorKind::HttpResponse {
                    status,
                    error_code,
                    raw_response,
                } => {
                    let status = u16::from(*status);
                    let mut result =
                        TokenError::new(TokenErrorKind::from_http_status(status), message)
                            .with_http_status(status);
                    let oauth_error = raw_response.as_deref().and_then(|response| {
                        serde_json::from_slice::<serde_json::Value>(response.body().as_ref())
                            .ok()?
                            .get("error")?
                            .as_str()
                            .map(str::to_owned)
                    });
                    let code = match (oauth_error, error_code) {
                        (Some(error), Some(codes)) => Some(format!("{error} (AADSTS{codes})")),
                        (Some(error), None) => Some(error),
                        (None, Some(codes)) if codes.chars().all(|c| c.is_ascii_digit()) => {
                            Some(format!("AADSTS{codes}"))
                        }
                        (None, codes) => codes.clone(),
                    };
                    if let Some(code) = code {
                        result = result.with_provider_code(code);
                    }
                    if let Some(delay) = raw_response
                        .as_deref()
                        .and_then(|r| retry_after(r.headers()))
                    {
                        result = result.with_retry_after(delay);
                    }
                    return result;
                }
                ErrorKind::Io | ErrorKind::Connection => kind = TokenErrorKind::Unreachable,
                ErrorKind::DataConversion if kind == TokenErrorKind::Other => {
                    kind = TokenErrorKind::InvalidResponse;
                }
                _ => {}
            }
        }
        next = e.source();
    }
    TokenError::new(kind, message)
}

/// How long the provider asked to be left alone: `retry-after-ms`, `x-ms-retry-after-ms`, or
/// `Retry-After` in seconds or as an HTTP date (RFC 9110, section 10.2.3), read by azure_core's own
/// retry policy's function. A date already past is no wait.
fn retry_after(headers: &azure_core::http::headers::Headers) -> Option<Duration> {
    use azure_core::http::headers::{RETRY_AFTER, RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS};
    let delay = azure_core::http::policies::get_retry_after(
        headers,
        azure_core::time::OffsetDateTime::now_utc,
        &[RETRY_AFTER_MS, X_MS_RETRY_AFTER_MS, RETRY_AFTER],
    )?;
    Some(Duration::try_from(delay).unwrap_or(Duration::ZERO))
}

impl TokenSource for AzureTokenSource {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        Box::pin(async move {
            match self.credential.get_token(&[scope], None).await {
                Ok(token) => Ok(AccessToken::new(
                    token.token.secret(),
                    SystemTime::from(token.expires_on),
                )),
                Err(error) => Err(classify(&error)),
            }
        })
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `describe` reads azure_identity's `Debug` output: pinned here against the real types.
    #[test]
    fn credentials_are_described_by_kind_and_client_id_from_their_debug_text() {
        let secret = ClientSecretCredential::new(
            "3f7c9a52-8d1e-4b6a-9c0f-5e2d7a1b4c68",
            "2d97a1b4-0000-4b6a-9c0f-5e2d7a1b4c68".to_owned(),
            "not-a-real-secret".to_owned().into(),
            None,
        )
        .unwrap();
        let debug = format!("{secret:?}");
        assert!(!debug.contains("not-a-real-secret"), "{debug}");
        assert_eq!(
            describe(secret.as_ref()),
            "ClientSecretCredential (client id 2d97a1b4-0000-4b6a-9c0f-5e2d7a1b4c68)"
        );
        let tools = DeveloperToolsCredential::new(None).unwrap();
        assert_eq!(describe(tools.as_ref()), "DeveloperToolsCredential");
    }

    fn headers(pairs: &[(&'static str, String)]) -> azure_core::http::headers::Headers {
        let mut headers = azure_core::http::headers::Headers::new();
        for (name, value) in pairs {
            headers.insert(*name, value.clone());
        }
        headers
    }

    #[test]
    fn retry_after_is_read_in_seconds_milliseconds_or_as_an_http_date() {
        use azure_core::time::{Duration as Span, OffsetDateTime, to_rfc7231};
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7".into())])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500".into())])),
            Some(Duration::from_millis(1500))
        );
        let later = to_rfc7231(&(OffsetDateTime::now_utc() + Span::seconds(120)));
        let wait = retry_after(&headers(&[("retry-after", later)])).unwrap();
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        let past = to_rfc7231(&(OffsetDateTime::now_utc() - Span::seconds(120)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", past)])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "-5".into())])),
            Some(Duration::ZERO),
            "a wait below zero is none"
        );
        for junk in ["", "soon", "Fri, 31 Feb 2026 99:00:00 GMT", "1e9", "\u{0}"] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", junk.to_owned())])),
                None,
                "{junk:?}"
            );
        }
        assert_eq!(retry_after(&headers(&[])), None);
    }

    /// Whatever a provider (or a proxy in between) puts in the header, reading it never panics
    /// and never asks for more than the value says.
    #[test]
    fn any_retry_after_value_is_read_without_a_panic() {
        let alphabet: Vec<char> = "0123456789 ,:-+.eEGMTFriSatJanDec\u{0}\u{7f}é"
            .chars()
            .collect();
        let mut rng = fastrand::Rng::with_seed(18);
        for _ in 0..20_000 {
            let value: String = (0..rng.usize(0..32))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let read = retry_after(&headers(&[("retry-after", value.clone())]));
            if let (Some(read), Ok(seconds)) = (read, value.trim().parse::<u64>()) {
                assert_eq!(read, Duration::from_secs(seconds), "{value:?}");
            }
        }
    }
}
