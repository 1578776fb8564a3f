//! Each connection's login token, for retiring sessions once it has expired.
//!
//! deadpool gives a hook no place to keep data with a connection, and creates the
//! `ClientWrapper` itself after our `Connect` returns. So `Connect` leaves the new connection's
//! [`Session`] for the `post_create` hook, which deadpool runs next in the same task (`try_create`
//! awaits the connect and then the hooks, with no other connect in between), and the hook files it
//! under the connection's statement cache: an `Arc` deadpool makes for each connection and keeps
//! as long as the connection lives.

use deadpool_postgres::{ClientWrapper, Hook, HookError, Pool, StatementCache};
use postgres_entra::{Connection, Session, Sessions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Who is creating a connection: the Tokio task, or the thread outside any task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Creator {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

impl Creator {
    fn current() -> Self {
        tokio::task::try_id().map_or_else(|| Self::Thread(std::thread::current().id()), Self::Task)
    }
}

/// The sessions of one pool.
#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) sessions: Sessions,
    /// Sessions of connections just made, until `post_create` files them.
    arriving: Mutex<HashMap<Creator, Vec<Session>>>,
    /// The session of each open connection, by the address of its statement cache.
    open: Mutex<HashMap<usize, (Weak<StatementCache>, Session)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single insert or remove: the maps stay consistent across a panic.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(client: &ClientWrapper) -> usize {
    Arc::as_ptr(&client.statement_cache) as usize
}

impl Tracker {
    pub(crate) fn new(sessions: Sessions) -> Arc<Self> {
        Arc::new(Self {
            sessions,
            arriving: Mutex::default(),
            open: Mutex::default(),
        })
    }

    /// A connection has logged in (in `Connect`): its session waits for `post_create`.
    pub(crate) fn arrived(&self, connection: &Connection) {
        let session = self.sessions.open(
            connection.token_received_at(),
            connection.token_expires_on(),
        );
        lock(&self.arriving)
            .entry(Creator::current())
            .or_default()
            .push(session);
    }

    /// The `post_create` hook: files the session of the connection just made.
    pub(crate) fn hook_post_create(self: &Arc<Self>) -> Hook {
        let tracker = self.clone();
        Hook::sync_fn(move |client, _| {
            let creator = Creator::current();
            let session = {
                let mut arriving = lock(&tracker.arriving);
                let session = arriving.get_mut(&creator).and_then(Vec::pop);
                if arriving.get(&creator).is_some_and(Vec::is_empty) {
                    arriving.remove(&creator);
                }
                session
            };
            match session {
                Some(session) => {
                    let mut open = lock(&tracker.open);
                    open.retain(|_, (cache, _)| cache.strong_count() > 0);
                    open.insert(
                        key(client),
                        (Arc::downgrade(&client.statement_cache), session),
                    );
                }
                None => {
                    tracing::debug!("a new connection's login token is unknown; it is not bounded")
                }
            }
            Ok(())
        })
    }

    /// The `pre_recycle` hook: an idle connection checked out after its token's bound is
    /// dropped, and deadpool hands out another or opens a new one.
    pub(crate) fn hook_pre_recycle(self: &Arc<Self>) -> Hook {
        let tracker = self.clone();
        Hook::sync_fn(move |client, _| {
            if tracker.retire_if_due(client) {
                Err(HookError::message(
                    "the token this connection logged in with has expired",
                ))
            } else {
                Ok(())
            }
        })
    }

    /// Whether `client` is due for retirement; if so it is counted and forgotten.
    fn retire_if_due(&self, client: &ClientWrapper) -> bool {
        let mut open = lock(&self.open);
        let key = key(client);
        if !open.get(&key).is_some_and(|(_, session)| session.is_due()) {
            return false;
        }
        if let Some((_, session)) = open.remove(&key) {
            session.retired();
        }
        true
    }

    /// Retires idle connections past their token's bound every `interval`, for as long as the
    /// pool lives (deadpool has no reaper of its own). Needs a Tokio runtime; without one,
    /// connections are retired at checkout only.
    pub(crate) fn start_reaper(self: &Arc<Self>, pool: &Pool, interval: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                "no Tokio runtime when the pool was built: idle connections past their login token are retired at checkout only"
            );
            return;
        };
        let (tracker, pool) = (Arc::downgrade(self), pool.weak());
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let (Some(tracker), Some(pool)) = (tracker.upgrade(), pool.upgrade()) else {
                    return;
                };
                let removed = pool.retain(|client, _| !tracker.retire_if_due(client));
                if !removed.removed.is_empty() {
                    tracing::debug!(
                        retired = removed.removed.len(),
                        "retired idle connections whose login token has expired"
                    );
                }
                lock(&tracker.open).retain(|_, (cache, _)| cache.strong_count() > 0);
            }
        });
    }
}
