//! The state a pool's share of the library keeps: what [`super::PoolCore`] and each
//! [`super::Session`] read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

use super::options::SessionOptions;
use crate::cache::TokenCache;
use crate::connector::EntraConnector;
use crate::error::{Error, LoginRejected};
use crate::log::FailureLog;

pub(super) struct CoreInner {
    pub(super) connector: EntraConnector,
    pub(super) cache: TokenCache,
    pub(super) configured_user: Option<String>,
    pub(super) options: SessionOptions,
    pub(super) name: String,
    /// `host:port` of each host, for messages.
    pub(super) targets: String,
    pub(super) create_limit: Mutex<Option<Duration>>,
    pub(super) open: Mutex<HashMap<u64, SystemTime>>,
    pub(super) next_id: AtomicU64,
    pub(super) retired: AtomicU64,
    pub(super) keeping_logged: AtomicBool,
    pub(super) refusals: Mutex<Refusals>,
    pub(super) log: FailureLog,
    pub(super) last_failure: Mutex<Option<Error>>,
    #[cfg(feature = "opentelemetry_0_33")]
    pub(super) observed: crate::metrics::Observed,
}

/// Refused logins back off: after a refusal, the pool does not log in again until the wait is
/// over, and then one login at a time probes whether the refusal still holds.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    pub(super) last: Option<LoginRejected>,
    pub(super) until: Option<Instant>,
    pub(super) step: u32,
    /// The login let through to probe, by its number, while it runs.
    pub(super) probe: Option<u64>,
    pub(super) probes: u64,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single assignment, insert or remove: consistent across a panic elsewhere.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
