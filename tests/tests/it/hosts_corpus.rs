//! The host guard on the fuzz corpus (`fuzz/corpus/hosts`) and 20,000 mutations of it, as the fuzz
//! target feeds it: as a pool's host and as an allowed-host pattern. No input panics, and a host a
//! token may go to is one DNS name or IP literal. `make fuzz FUZZ_TARGET=hosts` runs the fuzzer.

use postgres_entra::EntraConnector;
use postgres_entra_testkit::FnTokenSource;

fn connector(allowing: Option<&str>) -> Option<EntraConnector> {
    let source = FnTokenSource::new("never", |_| async {
        Err(postgres_entra::TokenError::new(
            postgres_entra::TokenErrorKind::Other,
            "never asked",
        ))
    });
    let mut builder = EntraConnector::builder(source);
    if let Some(pattern) = allowing {
        builder = builder.allow_host(pattern);
    }
    builder.build().ok()
}

fn feed(input: &[u8], plain: &EntraConnector) -> bool {
    let Ok(text) = std::str::from_utf8(input) else {
        return false;
    };
    if plain.token_cache_for(text, None).is_ok() {
        assert!(!text.is_empty());
        assert!(
            !text.contains([',', '/', '@', '?', '#', '%', ' ', '\0', '\n']),
            "a token could go to {text:?}"
        );
    }
    if let Some(allowing) = connector(Some(text)) {
        let host = text.trim().trim_start_matches("*.");
        let _ = allowing.token_cache_for(host, None);
    }
    true
}

#[tokio::test]
async fn the_fuzz_corpus_and_its_mutations_never_panic_nor_let_a_non_host_through() {
    let plain = connector(None).unwrap();
    let syntax = b".-_:,/@?#%*[] \0az09";
    let inputs = crate::fuzz_corpus_and_mutations("hosts", 0x4057, syntax, 20_000);
    let inputs = inputs.iter().filter(|input| feed(input, &plain)).count();
    figure!("host guard: {inputs} inputs, no panic, no non-host let through");
}
