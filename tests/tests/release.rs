//! What a release promises about its packages: each published crate declares a `rust-version` no
//! lower than any of its dependencies declares (read from `cargo metadata`, the dependencies as
//! `Cargo.lock` resolves them for this platform), since no older toolchain can be installed here
//! to build with; and no crate reaches another's hidden items under a requirement a newer
//! release could meet.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
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

/// `cargo metadata` of the workspace, offline, with `args`.
fn metadata(args: &[&str]) -> Value {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--manifest-path", root])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn every_published_crate_declares_a_rust_version_its_dependencies_allow() {
    let host = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "host-tuple"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let metadata = metadata(&["--locked", "--filter-platform", host.trim()]);
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

// No published crate reaches another's hidden items (`__private`, exempt from semver by its own
// words) under a requirement a newer release could meet: each crate on a path to a `__private`
// module is required exactly (`=`), as serde requires serde_derive, so that the crates are
// released in lockstep and `cargo update` never pairs an adapter with a core whose hidden items
// changed.

/// Every `a::b::__private` path in `source`, as its crate segments (`["a", "b"]`), leaving out
/// the crate's own (`crate::`, `self::`, `super::`).
fn private_paths(source: &str) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("::__private") {
        let before = &source[..at];
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(0, |i| i + 1);
        let segments: Vec<String> = before[start..]
            .split("::")
            .filter(|segment| !segment.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(first) = segments.first()
            && !["crate", "self", "super"].contains(&first.as_str())
        {
            found.insert(segments);
        }
    }
    found
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn every_crate_reaching_a_hidden_item_requires_its_version_exactly() {
    let metadata = metadata(&["--no-deps"]);
    let packages = metadata["packages"].as_array().unwrap();
    // What `package` requires of `dependency` (crate names as Rust writes them), if anything.
    let requirement = |package: &str, dependency: &str| -> Option<String> {
        packages
            .iter()
            .find(|p| p["name"].as_str().unwrap().replace('-', "_") == package)?["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| {
                d["kind"].is_null()
                    && d["rename"]
                        .as_str()
                        .unwrap_or(d["name"].as_str().unwrap())
                        .replace('-', "_")
                        == dependency
            })
            .map(|d| d["req"].as_str().unwrap().to_owned())
    };

    let mut checked = 0;
    let mut problems = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap().replace('-', "_");
        if !PUBLISHED.contains(&package["name"].as_str().unwrap()) {
            continue;
        }
        let dir = Path::new(package["manifest_path"].as_str().unwrap())
            .parent()
            .unwrap()
            .join("src");
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for file in files {
            let source = std::fs::read_to_string(&file).unwrap();
            for path in private_paths(&source) {
                // `name` requires path[0]; path[0] re-exports path[1] and so requires it; ...
                let mut from = name.clone();
                for segment in &path {
                    checked += 1;
                    match requirement(&from, segment) {
                        Some(req) if req.starts_with('=') => {}
                        Some(req) => problems.push(format!(
                            "{}: `{}::__private` while {from} requires {segment} `{req}`, not `=`",
                            file.display(),
                            path.join("::")
                        )),
                        None => problems.push(format!(
                            "{}: `{}::__private`, and {from} has no normal dependency on {segment}",
                            file.display(),
                            path.join("::")
                        )),
                    }
                    from = segment.clone();
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no hidden item reached: the check checks nothing"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn paths_to_hidden_items_are_read_with_every_crate_on_them() {
    let paths = private_paths(
        "use postgres_entra::__private::{A, B};\n\
         let x = postgres_entra_tokio_postgres::postgres_entra::__private::flatten(&e);\n\
         use crate::__private::C; (postgres_entra::__private::human(t))",
    );
    assert_eq!(
        paths.into_iter().collect::<Vec<_>>(),
        [
            vec!["postgres_entra".to_owned()],
            vec![
                "postgres_entra_tokio_postgres".to_owned(),
                "postgres_entra".to_owned()
            ],
        ]
    );
}

/// Names of the standard prelude a path may start with.
const PRELUDE: [&str; 8] = [
    "Box", "Vec", "String", "Option", "Result", "Ok", "Some", "Err",
];

/// Whether a fence's info string makes a Rust block for rustdoc: none, or only `rust` and
/// rustdoc's attributes (`no_run`, `ignore`, ...).
fn is_rust(info: &str) -> bool {
    info.split(',').map(str::trim).all(|word| {
        [
            "",
            "rust",
            "no_run",
            "ignore",
            "should_panic",
            "compile_fail",
            "test_harness",
        ]
        .contains(&word)
            || word.starts_with("edition")
    })
}

/// The Rust blocks of `markdown` (as rustdoc reads fences, with its hidden `# ` lines), string
/// literals blanked.
fn rust_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) if is_rust(info) => current = Some(String::new()),
            (Some(_), Some(_)) => blocks.extend(current.take()),
            (Some(block), None) => {
                let code = line.strip_prefix("# ").unwrap_or(line);
                let code = code.split("//").next().unwrap_or_default();
                // Strings hold SQL, whose casts (`::text`) are not paths.
                let blanked = code
                    .split('"')
                    .enumerate()
                    .map(|(i, part)| if i % 2 == 0 { part } else { "" })
                    .collect::<Vec<_>>()
                    .join("\"\"");
                block.push_str(&blanked);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// The first segment of every path in `code` (`a` of `a::b::c`), and every name a `use` of
/// `krate` or of the standard library brings in (`x` of `use krate::{x, y::z}`, and `z`).
fn path_roots_and_imports(code: &str, krate: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut roots = BTreeSet::new();
    // A `use` names its root first; the paths inside its braces hang off that root.
    let mut rest = String::new();
    for statement in code.split_inclusive(';') {
        match statement.trim().strip_prefix("use ") {
            Some(tree) => {
                roots.insert(
                    tree.split("::")
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                );
            }
            None => rest.push_str(statement),
        }
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = ident(chars[i]) && (i == 0 || !(ident(chars[i - 1]) || chars[i - 1] == ':'));
        if starts {
            let end = (i..chars.len())
                .find(|&j| !ident(chars[j]))
                .unwrap_or(chars.len());
            if chars.get(end) == Some(&':') && chars.get(end + 1) == Some(&':') {
                roots.insert(chars[i..end].iter().collect());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    let mut imported = BTreeSet::new();
    for statement in code.split(';') {
        let Some(tree) = statement.trim().strip_prefix("use ") else {
            continue;
        };
        let from = tree.split("::").next().unwrap_or_default();
        if ![krate, "std", "core", "alloc"].contains(&from) {
            continue;
        }
        for piece in tree.split([',', '{', '}']) {
            let name = piece.rsplit(" as ").next().unwrap_or(piece);
            let name = name.rsplit("::").next().unwrap_or(name).trim();
            if !name.is_empty() && name != "self" {
                imported.insert(name.to_owned());
            }
        }
    }
    (roots, imported)
}

/// Each adapter alone is enough: its README's snippets and its doc comments' examples (compiled as
/// its doc tests, a token source of your own among them) name nothing but the adapter, what they
/// import from it, and the standard library; so a user's one
/// dependency, the adapter, carries every crate they need (its pool, tokio-postgres, the core
/// crate for a token source of their own).
#[test]
fn each_adapters_readme_names_only_what_the_adapter_gives() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for adapter in ["deadpool", "bb8", "sqlx", "diesel"] {
        let krate = format!("postgres_entra_{adapter}");
        let path = root.join(format!("crates/postgres-entra-{adapter}/README.md"));
        let readme = std::fs::read_to_string(&path).unwrap();
        let lib = std::fs::read_to_string(
            root.join(format!("crates/postgres-entra-{adapter}/src/lib.rs")),
        )
        .unwrap();
        assert!(
            lib.starts_with("#![doc = include_str!(\"../README.md\")]"),
            "{adapter}: the README is the crate's doc, its snippets its doc tests"
        );
        // And the examples in the crate's own doc comments (a token source of your own).
        let docs: String = lib
            .lines()
            .filter_map(|l| {
                let l = l.trim_start();
                l.strip_prefix("/// ")
                    .or_else(|| l.strip_prefix("//! "))
                    .or_else(|| (l == "///" || l == "//!").then_some(""))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let (readme_blocks, doc_blocks) = (rust_blocks(&readme), rust_blocks(&docs));
        assert!(
            !readme_blocks.is_empty() && !doc_blocks.is_empty(),
            "{adapter}: a snippet in the README and an example in the docs"
        );
        let blocks: Vec<_> = readme_blocks.into_iter().chain(doc_blocks).collect();
        for block in blocks {
            let (roots, imported) = path_roots_and_imports(&block, &krate);
            let foreign: Vec<_> = roots
                .iter()
                .filter(|root| {
                    !["std", "core", "alloc", "crate", "self", "super", "Self"]
                        .contains(&root.as_str())
                        && !PRELUDE.contains(&root.as_str())
                        && **root != krate
                        && !imported.contains(*root)
                })
                .collect();
            assert!(
                foreign.is_empty(),
                "{adapter}: the README names {foreign:?}, which the adapter does not give:\n{block}"
            );
        }
    }
}

#[test]
fn snippet_paths_are_read_from_code_not_strings_or_comments() {
    let code = r#"use postgres_entra_x::{diesel, tokio_postgres::Config as Pg};
let c: Pg = "host=x".parse()?; // bb8::Pool
let q = diesel::sql::<Text>("current_user::text");
other::thing();"#;
    let (roots, imported) = path_roots_and_imports(
        &rust_blocks(&format!("```rust\n{code}\n```"))[0],
        "postgres_entra_x",
    );
    assert_eq!(
        roots,
        ["diesel", "other", "postgres_entra_x"]
            .map(String::from)
            .into()
    );
    assert_eq!(imported, ["Pg", "diesel"].map(String::from).into());
}
