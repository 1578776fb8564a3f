//! The bridge to `azure_core` credentials: any `TokenCredential` (managed identity, workload
//! identity, client secret, developer tools, ...) becomes a [`TokenSource`], and what the identity
//! provider answered (HTTP status, Entra error code and description) is kept in its errors.

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::TokenErrorKind;
use crate::token::{AccessToken, TokenSource, TokenSourceError};

/// A [`TokenSource`] over an `azure_core` credential.
///
/// Its identity, shown in errors, logs and metrics, is the credential's kind and, where the
/// credential shows it, its client id (`ClientSecretCredential (client id 3f2b…)`); give one of
/// your own with [`AzureTokenSource::with_identity`].
///
/// azure_identity's credentials retry failed requests on their own (azure_core's retry policy:
/// HTTP 408, 429, 500, 502, 503, 504 and connection errors, 8 retries from 200 ms doubling, up to
/// 60 s), underneath the cache's own backoff. Build them with `RetryOptions::none()` in their
/// `ClientOptions` so that the provider's answer reaches the cache, and you, at once; see the
/// README ("Identity-provider errors").
pub struct AzureTokenSource {
    credential: Arc<dyn TokenCredential>,
    identity: String,
}

impl AzureTokenSource {
    /// A source over `credential`, named after the credential's kind and client id.
    pub fn new(credential: Arc<dyn TokenCredential>) -> Arc<Self> {
        let identity = describe(credential.as_ref());
        Arc::new(Self {
            credential,
            identity,
        })
    }

    /// A source over `credential` named `identity` (e.g. the managed identity's name).
    pub fn with_identity(
        credential: Arc<dyn TokenCredential>,
        identity: impl Into<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            credential,
            identity: identity.into(),
        })
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
const MAX_DESCRIPTION: usize = 400;

/// What the provider said, from the first HTTP answer in `error`'s chain (credentials wrap the
/// HTTP error in an authentication error), else the kind of the transport failure.
fn classify(error: &azure_core::Error) -> TokenSourceError {
    // Entra's messages run over several lines (a troubleshooting link last); keep them on one.
    let mut message = error
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if message.len() > MAX_DESCRIPTION {
        let cut = (0..=MAX_DESCRIPTION)
            .rev()
            .find(|i| message.is_char_boundary(*i))
            .unwrap_or(0);
        message.truncate(cut);
        message.push('…');
    }
    let mut result = TokenSourceError::new(message);
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
                    result = result.with_http_status(status);
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
                    if let Some(delay) = raw_response.as_deref().and_then(|r| {
                        r.headers()
                            .get_optional_str(&azure_core::http::headers::RETRY_AFTER)?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    }) {
                        result = result.with_retry_after(Duration::from_secs(delay));
                    }
                    // The status decides the kind.
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
    result.with_kind(kind)
}

#[async_trait]
impl TokenSource for AzureTokenSource {
    async fn get_token(&self, scope: &str) -> Result<AccessToken, TokenSourceError> {
        match self.credential.get_token(&[scope], None).await {
            Ok(token) => Ok(AccessToken::new(
                token.token.secret(),
                SystemTime::from(token.expires_on),
            )),
            Err(error) => Err(classify(&error).with_source(error)),
        }
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}
