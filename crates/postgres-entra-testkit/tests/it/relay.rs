//! The TCP relay's distance: each direction's bytes arrive the set latency late, in order.

use postgres_entra_testkit::Relay;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn a_relay_with_latency_delays_each_direction_and_keeps_the_order() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = echo.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let latency = Duration::from_millis(20);
    let relay = Relay::with_latency(target, latency).await.unwrap();
    let mut client = TcpStream::connect(("127.0.0.1", relay.port()))
        .await
        .unwrap();

    for round in 0..3u8 {
        let started = Instant::now();
        let sent: Vec<u8> = (0..100).map(|i| i ^ round).collect();
        for piece in sent.chunks(7) {
            client.write_all(piece).await.unwrap();
        }
        let mut echoed = vec![0u8; sent.len()];
        client.read_exact(&mut echoed).await.unwrap();
        let round_trip = started.elapsed();

        assert_eq!(echoed, sent);
        assert!(round_trip >= 2 * latency, "{round_trip:?}");
    }
}
