//! A plaintext "PostgreSQL server" that declines TLS and asks for a cleartext password anyway,
//! recording every byte it receives: the trap a token must never fall into.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Listens on loopback, answers `N` to an SSL request and `AuthenticationCleartextPassword` to
/// anything else, and keeps what clients send. Runs on the caller's Tokio runtime until dropped.
#[derive(Debug)]
pub struct PlaintextListener {
    port: u16,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl PlaintextListener {
    /// Starts listening on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (record, count) = (received.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut first = true;
                    // Bounded: a client gets three seconds, then the trap closes.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                    while let Ok(Ok(n)) =
                        tokio::time::timeout_at(deadline, stream.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                        record
                            .lock()
                            .expect("record lock")
                            .extend_from_slice(&buf[..n]);
                        let ssl_request = first && n == 8 && buf[4..8] == [0x04, 0xd2, 0x16, 0x2f];
                        first = false;
                        let reply: &[u8] = if ssl_request {
                            b"N"
                        } else {
                            &[b'R', 0, 0, 0, 8, 0, 0, 0, 3]
                        };
                        if stream.write_all(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            received,
            connections,
            task,
        })
    }

    /// The port to point a client at (host `localhost` or `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every byte received so far, from all connections.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().expect("record lock").clone()
    }

    /// Whether `needle` appears in what was received.
    pub fn received_contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.received().windows(needle.len()).any(|w| w == needle)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for PlaintextListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
