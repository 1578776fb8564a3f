//! A token source backed by a closure: for tests of the library against the emulator.

use postgres_entra::{AccessToken, TokenError, TokenFuture, TokenSource};
use std::fmt;
use std::future::Future;

/// A [`TokenSource`] that calls a closure for each token.
pub struct FnTokenSource {
    identity: String,
    fetch: Box<dyn Fn(&str) -> TokenFuture<'static> + Send + Sync>,
}

impl FnTokenSource {
    /// A source named `identity` that calls `fetch(scope)` for each token.
    pub fn new<F, Fut>(identity: impl Into<String>, fetch: F) -> Self
    where
        F: Fn(&str) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<AccessToken, TokenError>> + Send + 'static,
    {
        Self {
            identity: identity.into(),
            fetch: Box::new(move |scope| Box::pin(fetch(scope))),
        }
    }

    /// A source that always returns the same token.
    pub fn fixed(identity: impl Into<String>, token: AccessToken) -> Self {
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

impl TokenSource for FnTokenSource {
    fn get_token<'a>(&'a self, scope: &'a str) -> TokenFuture<'a> {
        (self.fetch)(scope)
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }
}
