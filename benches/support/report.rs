//! The summary at the end of `cargo bench`: printed, written to `target/postgres-entra-bench.md`,
//! and, with `POSTGRES_ENTRA_BENCH_DOCS=<file>` (`make bench` sets it to `docs/benchmarks.md`),
//! put between that file's `<!-- bench:start -->` and `<!-- bench:end -->` markers.

use std::path::{Path, PathBuf};

const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

/// "2 core(s) of <CPU model>, linux x86_64".
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} core(s) of {cpu}, {} {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// `target/`, found from the running bench executable (`target/release/deps/churn-…`).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_owned))
        .unwrap_or_else(|| "target".into())
}

/// `document` with the text between the markers replaced by `report`.
fn replace_between_markers(document: &str, report: &str) -> Option<String> {
    let start = document.find(START)? + START.len();
    let end = document[start..].find(END)? + start;
    Some(format!(
        "{}\n{}\n{}",
        &document[..start],
        report.trim_end(),
        &document[end..]
    ))
}

/// Prints `report` and writes it where the module docs say.
pub(crate) fn publish(report: &str) {
    println!("\n{report}");
    let path = target_dir().join("postgres-entra-bench.md");
    match std::fs::write(&path, report) {
        Ok(()) => println!("summary written to {}", path.display()),
        Err(e) => eprintln!("could not write {}: {e}", path.display()),
    }
    let Some(docs) = std::env::var_os("POSTGRES_ENTRA_BENCH_DOCS") else {
        return;
    };
    let docs = PathBuf::from(docs);
    let updated = std::fs::read_to_string(&docs)
        .map_err(|e| e.to_string())
        .and_then(|document| {
            replace_between_markers(&document, report)
                .ok_or_else(|| format!("no {START} … {END} markers"))
        })
        .and_then(|document| std::fs::write(&docs, document).map_err(|e| e.to_string()));
    match updated {
        Ok(()) => println!("summary written to {}", docs.display()),
        Err(e) => eprintln!("could not update {}: {e}", docs.display()),
    }
}
