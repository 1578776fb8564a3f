//! Errors as text: a chain on one line, each part once, and durations as people read them.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// `error` and its sources as one line, each part once: a part already contained in what came
/// before (libraries often print their source in their own message too) is left out, and
/// multi-line messages are joined.
pub(crate) fn flatten(error: &(dyn StdError + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(e) = next {
        append_part(&mut text, &e.to_string());
        next = e.source();
    }
    text
}

/// `error` and its sources, each part once, on one line: how the library logs an error.
pub(crate) struct Report<'a>(pub(crate) &'a (dyn StdError + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&flatten(self.0))
    }
}

/// Appends `part` (made one line) to `text` after `: `, unless `text` already says it.
fn append_part(text: &mut String, part: &str) {
    let part = part
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if part.is_empty() || text.contains(&part) {
        return;
    }
    if !text.is_empty() {
        text.push_str(": ");
    }
    text.push_str(&part);
}

/// A duration as a person reads it: `42 s`, `3 min`, `2 h 5 min`.
pub(crate) fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 90 {
        format!("{secs} s")
    } else if secs < 90 * 60 {
        format!("{} min", (secs + 30) / 60)
    } else {
        format!("{} h {} min", secs / 3600, (secs % 3600) / 60)
    }
}
