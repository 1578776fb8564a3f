//! A process-wide TRACE subscriber that keeps everything it writes, for tests that search the
//! logs for secrets. tracing allows one global subscriber per process, so every test of a binary
//! shares this one.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// Everything the subscriber wrote.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured output of every crate's tracing events and `log` records, at TRACE.
pub struct TraceCapture {
    sink: Sink,
}

impl fmt::Debug for TraceCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceCapture")
            .field("bytes", &self.len())
            .finish()
    }
}

impl TraceCapture {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.sink.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything captured so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// How many bytes were captured so far.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// Whether nothing was captured yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// This process's capture: installed, as the global subscriber, by the first call.
///
/// # Panics
/// If another global subscriber was installed first.
pub fn trace_capture() -> &'static TraceCapture {
    static CAPTURE: OnceLock<TraceCapture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        use tracing_subscriber::util::SubscriberInitExt as _;
        let sink = Sink::default();
        let writer = sink.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
            .with_writer(move || writer.clone())
            .finish()
            .try_init()
            .expect("the TRACE capture is the only global subscriber");
        TraceCapture { sink }
    })
}
