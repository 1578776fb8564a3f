//! The claims parser on arbitrary input: as a whole token, and as the JSON payload of one.
//! Run with `make fuzz` (cargo-fuzz); `make test` replays the corpus in `corpus/claims`.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use postgres_entra::AccessToken;
use std::time::SystemTime;

fn parse(token: &str) {
    if let Ok(claims) = AccessToken::new(token, SystemTime::UNIX_EPOCH).claims() {
        let _ = claims.role_name();
        let _ = claims.to_string();
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        parse(text);
    }
    parse(&format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", URL_SAFE_NO_PAD.encode(data)));
});
