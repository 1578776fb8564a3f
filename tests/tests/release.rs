//! What a release promises about its packages: each published crate declares a `rust-version` no
//! lower than any of its dependencies declares (read from `cargo metadata`, the dependencies as
//! `Cargo.lock` resolves them for this platform), since no older toolchain can be installed here
//! to build with.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const PUBLISHED: [&str; 6] = [
    "postgres-entra",
    "postgres-entra-tokio-postgres",
    "postgres-entra-deadpool",
    "postgres-entra-bb8",
    "postgres-entra-sqlx",
    "postgres-entra-diesel",
];

/// The language features the code itself uses need at least this: let chains (1.88).
const LANGUAGE_FLOOR: (u64, u64) = (1, 88);

fn version(text: &str) -> (u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn every_published_crate_declares_a_rust_version_its_dependencies_allow() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let host = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "host-tuple"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--manifest-path", root, "--filter-platform", host.trim()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages: BTreeMap<&str, &Value> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p))
        .collect();
    let nodes: BTreeMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();

    let mut report = Vec::new();
    for name in PUBLISHED {
        let (id, package) = packages
            .iter()
            .find(|(_, p)| p["name"] == name && p["source"].is_null())
            .unwrap_or_else(|| panic!("{name} is not in the workspace"));
        let declared = version(
            package["rust_version"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} declares no rust-version")),
        );
        // Every normal and build dependency, transitively.
        let root_id = *id;
        let (mut seen, mut stack) = (BTreeSet::new(), vec![root_id]);
        let mut needed = (LANGUAGE_FLOOR, "the code itself (let chains)".to_owned());
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let dependency = packages[id];
            if let Some(rust_version) = dependency["rust_version"].as_str()
                && id != root_id
                && version(rust_version) > needed.0
            {
                needed = (
                    version(rust_version),
                    format!("{} {}", dependency["name"], dependency["version"]),
                );
            }
            for dep in nodes[id]["deps"].as_array().unwrap() {
                let runtime = dep["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build");
                if runtime {
                    stack.push(dep["pkg"].as_str().unwrap());
                }
            }
        }
        report.push(format!(
            "{name}: declares {}.{}, needs {}.{} ({})",
            declared.0, declared.1, needed.0.0, needed.0.1, needed.1
        ));
        assert!(
            declared >= needed.0,
            "{name} declares rust-version {}.{} but {} needs {}.{}",
            declared.0,
            declared.1,
            needed.1,
            needed.0.0,
            needed.0.1
        );
    }
    println!("{}", report.join("\n"));
}
