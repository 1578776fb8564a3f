//! A step of the doctor: its outcome, time, cause and fix, and the report they make.

use postgres_entra::{EntraConnector, TokenClaims};
use serde::Serialize;
use std::time::Instant;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It worked.
    Pass,
    /// It worked, with something to look at.
    Warn,
    /// It failed: see the cause and the fix.
    Fail,
    /// It needs a step that failed.
    Skipped,
}

/// One step of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// 1 to 8.
    pub number: u8,
    /// `credential`, `token`, `claims`, `role`, `network`, `tls`, `login`, `query`.
    pub name: &'static str,
    /// How it ended.
    pub status: Status,
    /// How long it took, in milliseconds.
    pub millis: u64,
    /// What it found.
    pub details: Vec<String>,
    /// Why it failed (or what the warning is about).
    pub cause: Option<String>,
    /// What to do about it.
    pub fix: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// One line: what works, or the first failure.
    pub summary: String,
}

impl Report {
    /// Whether no step failed.
    pub fn ok(&self) -> bool {
        self.steps
            .iter()
            .all(|s| matches!(s.status, Status::Pass | Status::Warn))
    }

    /// The first failed step, if any.
    pub fn first_failure(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.status == Status::Fail)
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::from("postgres-entra doctor\n");
        for step in &self.steps {
            let status = match step.status {
                Status::Pass => "pass",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            out.push_str(&format!(
                "{}. {:<10} {status}  {:>6} ms\n",
                step.number, step.name, step.millis
            ));
            for line in &step.details {
                out.push_str(&format!("     {line}\n"));
            }
            if let Some(cause) = &step.cause {
                out.push_str(&format!("     cause: {cause}\n"));
            }
            if let Some(fix) = &step.fix {
                out.push_str(&format!("     fix:   {fix}\n"));
            }
        }
        out.push_str(&format!("\n{}\n", self.summary));
        out
    }
}

/// A step in progress.
pub(super) struct Timed {
    number: u8,
    name: &'static str,
    started: Instant,
    details: Vec<String>,
}

impl Timed {
    pub(super) fn start(number: u8, name: &'static str) -> Self {
        Self {
            number,
            name,
            started: Instant::now(),
            details: Vec::new(),
        }
    }

    pub(super) fn detail(&mut self, line: impl Into<String>) {
        self.details.push(line.into());
    }

    pub(super) fn end(self, status: Status, cause: Option<String>, fix: Option<String>) -> Step {
        Step {
            number: self.number,
            name: self.name,
            status,
            millis: self.started.elapsed().as_millis() as u64,
            details: self.details,
            cause,
            fix,
        }
    }

    pub(super) fn pass(self) -> Step {
        self.end(Status::Pass, None, None)
    }

    pub(super) fn warn(self, cause: impl Into<String>, fix: impl Into<String>) -> Step {
        self.end(Status::Warn, Some(cause.into()), Some(fix.into()))
    }

    pub(super) fn fail(self, cause: impl Into<String>, fix: impl Into<String>) -> Step {
        self.end(Status::Fail, Some(cause.into()), Some(fix.into()))
    }
}

pub(super) fn skipped(number: u8, name: &'static str, needs: &str) -> Step {
    Step {
        number,
        name,
        status: Status::Skipped,
        millis: 0,
        details: vec![format!("needs {needs}")],
        cause: None,
        fix: None,
    }
}

/// What the first steps established, for the later ones.
pub(super) struct Found {
    pub(super) host: String,
    /// The connector the library logs in with: the credential's tokens, the allowed hosts, the
    /// roots.
    pub(super) connector: Option<EntraConnector>,
    pub(super) claims: Option<TokenClaims>,
    /// The token is usable for this server (audience, expiry).
    pub(super) claims_ok: bool,
    pub(super) role_ok: bool,
}
