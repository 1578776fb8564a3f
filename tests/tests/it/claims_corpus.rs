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
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/claims");
    let corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus at {}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(corpus.len() >= 10, "corpus has {} inputs", corpus.len());
    let mut inputs = corpus.iter().map(|input| feed(input)).sum::<usize>();

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for _ in 0..20_000 {
        let mut input = corpus[rng.usize(..corpus.len())].clone();
        for _ in 0..rng.usize(1..8) {
            match rng.u8(..4) {
                0 if !input.is_empty() => {
                    let i = rng.usize(..input.len());
                    input[i] = rng.u8(..);
                }
                1 => {
                    let i = rng.usize(..=input.len());
                    const SYNTAX: &[u8] = b"{}[]\\\":,.0aZu";
                    input.insert(i, SYNTAX[rng.usize(..SYNTAX.len())]);
                }
                2 if !input.is_empty() => input.truncate(rng.usize(..input.len())),
                _ => input.extend(std::iter::repeat_n(b'[', rng.usize(..300))),
            }
        }
        inputs += feed(&input);
    }
    figure!("claims parser: {inputs} inputs, no panic");
}
