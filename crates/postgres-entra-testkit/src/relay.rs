//! A loopback TCP relay between a client and a server that can cut or stall the connections it
//! carries, or put the server some latency away: network failures and distance on demand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Forwards `127.0.0.1:<port>` to a loopback target. Runs on the caller's Tokio runtime until
/// dropped.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    stalled: watch::Sender<bool>,
    cut: Arc<Notify>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// Carries bytes one way: each chunk is delivered `latency` after it was read (Tokio's timer:
/// to the millisecond above), in order, and none while stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: watch::Receiver<bool>,
    latency: Duration,
) {
    let (chunks, mut delivered) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut read_stalled = stalled.clone();
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if read_stalled.wait_for(|s| !*s).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if chunks
                .send((Instant::now() + latency, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    let mut write_stalled = stalled;
    let write = async move {
        while let Some((due, chunk)) = delivered.recv().await {
            if !latency.is_zero() {
                tokio::time::sleep_until(due).await;
            }
            // A stall that began while these bytes were on their way holds them too.
            if write_stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&chunk).await.is_err()
            {
                return;
            }
        }
    };
    tokio::join!(read, write);
}

impl Relay {
    /// Starts relaying to `target`, which must be a loopback address.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::with_latency(target, Duration::ZERO).await
    }

    /// [`Relay::start`], delivering every chunk `latency` after it was read in each direction:
    /// a server `2 × latency` of round trip away, as across a data center.
    pub async fn with_latency(target: SocketAddr, latency: Duration) -> std::io::Result<Self> {
        assert!(
            target.ip().is_loopback(),
            "the relay only forwards to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stalled, _) = watch::channel(false);
        let cut = Arc::new(Notify::new());
        let accepted = Arc::new(AtomicU64::new(0));
        let (stall_rx, cut_all, count) = (stalled.subscribe(), cut.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (stall_rx, cut_all) = (stall_rx.clone(), cut_all.clone());
                tokio::spawn(async move {
                    let cut = cut_all.notified();
                    tokio::pin!(cut);
                    cut.as_mut().enable();
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    // A wire adds no Nagle delay of its own: what each end writes goes on at once.
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, stall_rx.clone(), latency) => {}
                        _ = pump(server_read, client_write, stall_rx, latency) => {}
                        _ = &mut cut => {}
                    }
                });
            }
        });
        Ok(Self {
            port,
            stalled,
            cut,
            accepted,
            task,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection open now (both sides see the socket close).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// Stops (or resumes) forwarding bytes in both directions on all connections, old and new.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.notify_waiters();
    }
}
