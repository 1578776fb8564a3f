//! The bridge to `azure_core` credentials: any `TokenCredential` (managed identity, workload
//! identity, client secret, developer tools, ...) becomes a [`TokenSource`].

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::token::{AccessToken, TokenSource, TokenSourceError};

/// A [`TokenSource`] over an `azure_core` credential.
///
/// Its identity (which decides cache sharing) is, unless given, unique to the credential object:
/// pools built from the same `Arc` share one cache; credentials built separately do not, unless
/// they are given the same identity with [`AzureTokenSource::with_identity`].
pub struct AzureTokenSource {
    credential: Arc<dyn TokenCredential>,
    identity: String,
}

impl AzureTokenSource {
    /// A source over `credential`, identified by the credential object itself.
    pub fn new(credential: Arc<dyn TokenCredential>) -> Arc<Self> {
        let identity = format!(
            "azure-credential@{:p}",
            Arc::as_ptr(&credential).cast::<()>()
        );
        Arc::new(Self {
            credential,
            identity,
        })
    }

    /// A source over `credential` for the principal named `identity` (e.g. its client id); sources
    /// with the same identity share one cache per scope.
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

impl fmt::Debug for AzureTokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureTokenSource")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// `Retry-After` in seconds from a throttled or failed HTTP answer, if the error (or one it wraps:
/// credentials wrap the HTTP error in an authentication error) carries one.
fn retry_after(error: &azure_core::Error) -> Option<Duration> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        if let Some(ErrorKind::HttpResponse {
            raw_response: Some(response),
            ..
        }) = e
            .downcast_ref::<azure_core::Error>()
            .map(azure_core::Error::kind)
            && let Some(value) = response
                .headers()
                .get_optional_str(&azure_core::http::headers::RETRY_AFTER)
        {
            return value.trim().parse::<u64>().ok().map(Duration::from_secs);
        }
        next = e.source();
    }
    None
}

#[async_trait]
impl TokenSource for AzureTokenSource {
    async fn get_token(&self, scope: &str) -> Result<AccessToken, TokenSourceError> {
        match self.credential.get_token(&[scope], None).await {
            Ok(token) => Ok(AccessToken::new(
                token.token.secret(),
                SystemTime::from(token.expires_on),
            )),
            Err(error) => {
                let mut e = TokenSourceError::new(error.to_string());
                if let Some(delay) = retry_after(&error) {
                    e = e.with_retry_after(delay);
                }
                Err(e.with_source(error))
            }
        }
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}
