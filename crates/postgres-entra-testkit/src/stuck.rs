//! Faulty log sinks: a slow one (once armed, every thread writing a line that contains a given
//! text is held there until the sink is released), and one that panics on such a line. For tests
//! that no caller of the library waits on another's log line, and that a failing sink leaves
//! nothing of the library's stuck.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the sink's writers and its owner share.
struct Shared {
    needle: &'static str,
    armed: AtomicBool,
    stuck: SyncSender<()>,
    released: Mutex<bool>,
    wake: Condvar,
}

/// A log sink that holds up the writers of lines containing its text, once armed, until
/// released. Dropping it releases them: a failing assertion must not leave a runtime's thread
/// held, or the runtime's shutdown would wait for it for ever.
pub struct StuckSink {
    shared: Arc<Shared>,
    stuck: Receiver<()>,
}

impl fmt::Debug for StuckSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StuckSink")
            .field("needle", &self.shared.needle)
            .finish_non_exhaustive()
    }
}

/// One writer of the sink.
#[derive(Clone)]
struct Writer(Arc<Shared>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let shared = &*self.0;
        if shared.armed.load(Ordering::SeqCst)
            && String::from_utf8_lossy(buf).contains(shared.needle)
        {
            let _ = shared.stuck.try_send(());
            let mut released = shared.released.lock().unwrap_or_else(|e| e.into_inner());
            while !*released {
                released = shared
                    .wake
                    .wait(released)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl StuckSink {
    /// A sink, not armed yet, for the lines containing `needle`.
    pub fn new(needle: &'static str) -> Self {
        let (stuck, receiver) = sync_channel(1);
        Self {
            shared: Arc::new(Shared {
                needle,
                armed: AtomicBool::new(false),
                stuck,
                released: Mutex::new(false),
                wake: Condvar::new(),
            }),
            stuck: receiver,
        }
    }

    /// A multi-thread runtime (3 workers) whose threads log at `level` and below into this sink.
    /// Dropping it releases the sink first, whichever is dropped first.
    pub fn runtime(&self, level: tracing::Level) -> StuckRuntime {
        let writer = Writer(self.shared.clone());
        StuckRuntime {
            runtime: Some(logging_runtime(move || writer.clone(), level)),
            shared: self.shared.clone(),
        }
    }

    /// From now on, writers of the line are held.
    pub fn arm(&self) {
        self.shared.armed.store(true, Ordering::SeqCst);
    }

    /// Waits up to `timeout` for a writer to be held; whether one was.
    pub fn wait_stuck(&self, timeout: Duration) -> bool {
        !matches!(
            self.stuck.recv_timeout(timeout),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected)
        )
    }

    /// Lets every held writer go, and those to come.
    pub fn release(&self) {
        self.shared.release();
    }
}

impl Shared {
    fn release(&self) {
        *self.released.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }
}

impl Drop for StuckSink {
    fn drop(&mut self) {
        self.release();
    }
}

/// A runtime logging into a [`StuckSink`], which it releases before it shuts down (a held worker
/// would make the shutdown wait for ever).
pub struct StuckRuntime {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

impl fmt::Debug for StuckRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StuckRuntime").finish_non_exhaustive()
    }
}

impl std::ops::Deref for StuckRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.runtime
            .as_ref()
            .expect("the runtime lives until dropped")
    }
}

impl Drop for StuckRuntime {
    fn drop(&mut self) {
        self.shared.release();
        drop(self.runtime.take());
    }
}

/// A multi-thread runtime (3 workers) whose threads log at `level` and below to `writer`.
fn logging_runtime<W>(writer: W, level: tracing::Level) -> tokio::runtime::Runtime
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_writer(writer)
            .with_max_level(level)
            .finish(),
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .on_thread_start(move || std::mem::forget(tracing::dispatcher::set_default(&dispatch)))
        .build()
        .expect("a runtime")
}

/// A log writer that panics on the lines containing its text.
#[derive(Clone)]
struct Panicking(&'static str);

impl std::io::Write for Panicking {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if String::from_utf8_lossy(buf).contains(self.0) {
            panic!("the log sink failed on purpose");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A multi-thread runtime (3 workers) whose threads log at `level` and below into a sink that
/// panics on every line containing `needle`: a faulty layer or writer of the application's.
pub fn panicking_log_runtime(
    needle: &'static str,
    level: tracing::Level,
) -> tokio::runtime::Runtime {
    let writer = Panicking(needle);
    logging_runtime(move || writer.clone(), level)
}
