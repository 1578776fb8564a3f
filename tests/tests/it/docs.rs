//! The figures the docs quote from test runs and benchmarks are the ones recorded: each
//! `<!--fig:WHAT-->TEXT<!--/fig-->` in docs/reliability.md and docs/benchmarks.md, every number in
//! TEXT, is printed by the recorded run of the tests whose names contain WHAT (docs/figures.txt,
//! written by `make figures` from the last `make test`), or, for `bench`, by the benchmark run
//! recorded between the `bench:start` and `bench:end` markers of docs/benchmarks.md.

use std::path::Path;

/// The numbers in `text` as written (`1,234` as `1234`, `0.6` as `0.6`).
fn numbers(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut current = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let next_is_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c.is_ascii_digit() || (!current.is_empty() && (*c == ',' || *c == '.') && next_is_digit)
        {
            if *c != ',' {
                current.push(*c);
            }
        } else if !current.is_empty() {
            found.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        found.push(current);
    }
    found
}

/// Whether `quoted` (as the docs write it) is `recorded` at the docs' precision.
fn same(quoted: &str, recorded: &str) -> bool {
    let decimals = quoted.split_once('.').map_or(0, |(_, d)| d.len());
    match recorded.parse::<f64>() {
        Ok(value) => format!("{value:.decimals$}") == quoted,
        Err(_) => false,
    }
}

/// Each `<!--fig:WHAT-->TEXT<!--/fig-->` of `doc`.
fn quoted(doc: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = doc;
    while let Some(start) = rest.find("<!--fig:") {
        let after = &rest[start + "<!--fig:".len()..];
        let (what, after) = after.split_once("-->").expect("a closed <!--fig: marker");
        let (text, after) = after
            .split_once("<!--/fig-->")
            .unwrap_or_else(|| panic!("<!--fig:{what}--> without its <!--/fig-->"));
        found.push((what.trim().to_owned(), text.to_owned()));
        rest = after;
    }
    found
}

#[test]
fn the_figures_the_docs_quote_are_the_recorded_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let recorded = read("docs/figures.txt");
    let benchmarks = read("docs/benchmarks.md");
    let bench = benchmarks
        .split_once("<!-- bench:start -->")
        .and_then(|(_, rest)| rest.split_once("<!-- bench:end -->"))
        .map(|(block, _)| block)
        .expect("the benchmark run's markers");
    let mut checked = 0;
    let mut problems = Vec::new();
    for path in ["docs/reliability.md", "docs/benchmarks.md"] {
        let doc = read(path);
        let figures = quoted(&doc);
        assert!(!figures.is_empty(), "{path} quotes no figure");
        for (what, text) in figures {
            let source: Vec<&str> = if what == "bench" {
                bench.lines().collect()
            } else {
                recorded
                    .lines()
                    .filter(|line| {
                        line.split_once(": ")
                            .is_some_and(|(test, _)| test.contains(&what))
                    })
                    .collect()
            };
            if source.is_empty() {
                problems.push(format!("{path}: nothing recorded for `{what}`"));
                continue;
            }
            let recorded_numbers: Vec<String> = source
                .iter()
                .flat_map(|line| numbers(line.split_once(": ").map_or(*line, |(_, f)| f)))
                .collect();
            for number in numbers(&text) {
                checked += 1;
                if !recorded_numbers.iter().any(|r| same(&number, r)) {
                    problems.push(format!(
                        "{path}: {number} in `{text}` is not in the recorded figures of `{what}`"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!("{checked} quoted numbers found in the recorded figures");
}

#[test]
fn numbers_are_read_as_written_and_compared_at_the_docs_precision() {
    assert_eq!(
        numbers("168-798 ms, 11,196 checkouts (1.0-1.5 a second), v0.6."),
        ["168", "798", "11196", "1.0", "1.5", "0.6"]
    );
    assert!(same("168", "168.245"));
    assert!(same("0.6", "0.61"));
    assert!(!same("0.6", "0.66"));
    assert!(!same("798", "797.4"));
    assert_eq!(
        quoted("a <!--fig:outages-->7-8 requests<!--/fig--> b <!--fig:bench-->1.002<!--/fig-->"),
        [
            ("outages".to_owned(), "7-8 requests".to_owned()),
            ("bench".to_owned(), "1.002".to_owned())
        ]
    );
}
