//! A connector whose token cache a test can read.

use postgres_entra::{EntraConnector, EntraConnectorBuilder, TokenCache};
use std::ops::Deref;

/// A connector over a token cache the test can read.
#[derive(Debug, Clone)]
pub struct TestConnector {
    connector: EntraConnector,
    cache: TokenCache,
}

impl TestConnector {
    /// `builder`'s connector, over `cache` (the builder must have been made with it:
    /// `EntraConnector::builder_with_cache(cache.clone())`).
    ///
    /// # Panics
    /// If the connector cannot be built.
    pub fn over(builder: EntraConnectorBuilder, cache: TokenCache) -> Self {
        Self {
            connector: builder.build().expect("the test's connector builds"),
            cache,
        }
    }

    /// The cache the connector's logins take their tokens from.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }
}

impl Deref for TestConnector {
    type Target = EntraConnector;
    fn deref(&self) -> &EntraConnector {
        &self.connector
    }
}

impl From<TestConnector> for EntraConnector {
    fn from(test: TestConnector) -> Self {
        test.connector
    }
}
