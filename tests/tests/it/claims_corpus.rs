//! The claims parser on the fuzz corpus (`fuzz/corpus/claims`) and 20,000 mutations of it: no input
//! panics, and a name, when found, is never empty. `make fuzz` runs the coverage-guided fuzzer
//! itself; this replays what it found, in `make test`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use postgres_entra::AccessToken;
use std::time::SystemTime;

/// Both ways the fuzz target feeds an input: as a whole token, and as a token's payload.
fn feed(input: &[u8]) -> usize {
    let mut checked = 0;
    let parse = |token: &str| {
        if let Ok(claims) = AccessToken::new(token, SystemTime::UNIX_EPOCH).claims() {
            let _ = claims.to_string();
            if let Some((name, _)) = claims.role_name() {
                assert!(!name.is_empty());
            }
        }
    };
    if let Ok(text) = std::str::from_utf8(input) {
        parse(text);
        checked += 1;
    }
    parse(&format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(input)
    ));
    checked + 1
}

#[test]
fn the_fuzz_corpus_and_its_mutations_never_panic() {
    // Claims' JSON syntax, and bytes that are not UTF-8 (the whole-token feed then skips them).
    let syntax = b"[{}\\\":,.0aZu\xff\xc3";
    let inputs = crate::fuzz_corpus_and_mutations("claims", 0x5eed, syntax, 20_000);
    let inputs = inputs.iter().map(|input| feed(input)).sum::<usize>();
    figure!("claims parser: {inputs} inputs, no panic");
}
