//! The host guard on arbitrary input, as a pool's host and as an allowed-host pattern: no input
//! panics, and a host a token may go to is one DNS name or IP literal. Run with `make fuzz
//! FUZZ_TARGET=hosts`; `make test` replays the corpus in `corpus/hosts`.
#![no_main]

use postgres_entra::{AccessToken, EntraConnector, TokenError, TokenErrorKind, TokenFuture, TokenSource};

#[derive(Debug)]
struct Never;

impl TokenSource for Never {
    fn get_token<'a>(&'a self, _: &'a str) -> TokenFuture<'a> {
        Box::pin(async { Err(TokenError::new(TokenErrorKind::Other, "never asked")) })
    }
    fn identity(&self) -> String {
        "never".to_owned()
    }
}

static PLAIN: std::sync::LazyLock<EntraConnector> =
    std::sync::LazyLock::new(|| EntraConnector::builder(Never).build().unwrap());

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if PLAIN.token_cache_for(text, None).is_ok() {
        assert!(!text.is_empty());
        assert!(!text.contains([',', '/', '@', '?', '#', '%', ' ', '\0']), "{text:?}");
    }
    if let Ok(allowing) = EntraConnector::builder(Never).allow_host(text).build() {
        let _ = allowing.token_cache_for(text.trim_start_matches("*."), None);
    }
    let _ = AccessToken::new(text, std::time::SystemTime::UNIX_EPOCH);
});
