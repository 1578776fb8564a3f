//! A relayed connection once logged in: bytes both ways, framed only to count the `ReadyForQuery`
//! messages the server owes and to find sqlx's pings, one of which ends a session that is due.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use postgres_entra::__private::Session;

use crate::relay::Link;
use crate::relay::login::Server;

const BUFFER: usize = 32 * 1024;

/// What both directions of a relayed connection share.
struct Flow {
    /// `ReadyForQuery` messages the server still owes (one per simple query, sync or function
    /// call sent).
    owed: AtomicI64,
    /// The client sent extended-protocol messages not yet followed by a sync.
    unsynced: AtomicBool,
}

/// Walks a byte stream of messages, message by message, across reads.
#[derive(Default)]
pub(crate) struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    tag: u8,
}

/// What the framer found at a point of the stream.
pub(crate) enum Found {
    /// A message of type `tag` and body length `length` starts here (its header ends at `at`).
    Start { tag: u8, length: usize, at: usize },
    /// The message in progress ends at `at`.
    End {
        tag: u8,
        #[cfg_attr(not(test), allow(dead_code))]
        at: usize,
    },
}

impl Framer {
    /// Feeds `chunk`, calling `found` for each message start and end.
    pub(crate) fn feed(&mut self, chunk: &[u8], mut found: impl FnMut(Found)) -> io::Result<()> {
        let mut i = 0;
        while i < chunk.len() {
            if self.remaining == 0 && self.have < 5 {
                let take = (5 - self.have).min(chunk.len() - i);
                self.header[self.have..self.have + take].copy_from_slice(&chunk[i..i + take]);
                self.have += take;
                i += take;
                if self.have == 5 {
                    self.tag = self.header[0];
                    let length = i32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    let body = usize::try_from(length)
                        .ok()
                        .and_then(|l| l.checked_sub(4))
                        .ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidData, "a malformed message")
                        })?;
                    found(Found::Start {
                        tag: self.tag,
                        length: body,
                        at: i,
                    });
                    self.remaining = body;
                    if body == 0 {
                        self.have = 0;
                        found(Found::End {
                            tag: self.tag,
                            at: i,
                        });
                    }
                }
            } else {
                let take = self.remaining.min(chunk.len() - i);
                self.remaining -= take;
                i += take;
                if self.remaining == 0 {
                    self.have = 0;
                    found(Found::End {
                        tag: self.tag,
                        at: i,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Bytes both ways until either side closes; the session ends with the connection.
pub(crate) async fn run(client: UnixStream, server: Server, link: &Link, session: Session) {
    let flow = Flow {
        owed: AtomicI64::new(0),
        unsynced: AtomicBool::new(false),
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = tokio::io::split(server);
    tokio::select! {
        _ = upstream(client_read, server_write, &flow, &session, link.retire_at) => {}
        _ = downstream(server_read, client_write, &flow) => {}
    }
    drop(session);
}

/// Which of sqlx's pings (a bare `Sync` on an idle connection) may end a session that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetireAt {
    /// The ping before a checkout (`test_before_acquire`, sqlx's default): the one that follows a
    /// ping (the one made when the connection was given back) or the login. sqlx takes the failed
    /// ping for a dead connection, closes it and hands out another.
    AcquirePing,
    /// Any ping, for a pool that does not ping before a checkout: the one made when a connection
    /// is given back fails (sqlx logs a warning and closes it).
    AnyPing,
}

/// The Terminate message.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Client to server. A ping that may end the session (see [`RetireAt`]), made when it is due,
/// closes the connection instead: the server is told (Terminate) and sqlx's ping fails.
async fn upstream(
    mut client: tokio::net::unix::OwnedReadHalf,
    mut server: tokio::io::WriteHalf<Server>,
    flow: &Flow,
    session: &Session,
    retire_at: RetireAt,
) -> io::Result<()> {
    let mut framer = Framer::default();
    let mut buffer = vec![0u8; BUFFER];
    // The type of the client's last whole message since the login.
    let mut last: Option<u8> = None;
    loop {
        let n = client.read(&mut buffer).await?;
        if n == 0 {
            let _ = server.shutdown().await;
            return Ok(());
        }
        let chunk = &buffer[..n];
        let mut retire_from = None;
        framer.feed(chunk, |found| match found {
            _ if retire_from.is_some() => {}
            Found::Start { tag, length, at } => {
                let ping = tag == b'S'
                    && length == 0
                    // Its header in this chunk (sqlx writes a ping at once).
                    && at >= 5
                    && flow.owed.load(Ordering::SeqCst) == 0
                    && !flow.unsynced.load(Ordering::SeqCst);
                let may_retire = match retire_at {
                    RetireAt::AcquirePing => matches!(last, None | Some(b'S')),
                    RetireAt::AnyPing => true,
                };
                if ping && may_retire && session.is_due() {
                    retire_from = Some(at - 5);
                    return;
                }
                match tag {
                    b'Q' | b'S' | b'F' => {
                        flow.owed.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                match tag {
                    b'S' => flow.unsynced.store(false, Ordering::SeqCst),
                    b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                        flow.unsynced.store(true, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
            Found::End { tag, .. } => last = Some(tag),
        })?;
        if let Some(end) = retire_from {
            server.write_all(&chunk[..end]).await?;
            server.write_all(&TERMINATE).await?;
            let _ = server.shutdown().await;
            session.retired();
            return Ok(());
        }
        server.write_all(chunk).await?;
        server.flush().await?;
    }
}

/// Server to client, counting the `ReadyForQuery` messages owed once written.
async fn downstream(
    mut server: tokio::io::ReadHalf<Server>,
    mut client: tokio::net::unix::OwnedWriteHalf,
    flow: &Flow,
) -> io::Result<()> {
    let mut framer = Framer::default();
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = server.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        let chunk = &buffer[..n];
        let mut ready = 0;
        framer.feed(chunk, |found| {
            if let Found::End { tag: b'Z', .. } = found {
                ready += 1;
            }
        })?;
        client.write_all(chunk).await?;
        if ready > 0 {
            flow.owed.fetch_sub(ready, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framer_finds_messages_across_any_split() {
        // Z (status T), a 3-byte D, and an empty-bodied S, split at every point.
        let stream: Vec<u8> = [
            &[b'Z', 0, 0, 0, 5, b'T'][..],
            &[b'D', 0, 0, 0, 7, 1, 2, 3][..],
            &[b'S', 0, 0, 0, 4][..],
        ]
        .concat();
        for split in 0..=stream.len() {
            let mut framer = Framer::default();
            let mut events = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                let offset = if part.as_ptr() == stream.as_ptr() {
                    0
                } else {
                    split
                };
                framer
                    .feed(part, |found| {
                        events.push(match found {
                            Found::Start { tag, length, at } => (tag, 's', length, offset + at),
                            Found::End { tag, at } => (tag, 'e', 0, offset + at),
                        })
                    })
                    .unwrap();
            }
            assert_eq!(
                events,
                [
                    (b'Z', 's', 1, 5),
                    (b'Z', 'e', 0, 6),
                    (b'D', 's', 3, 11),
                    (b'D', 'e', 0, 14),
                    (b'S', 's', 0, 19),
                    (b'S', 'e', 0, 19),
                ],
                "split at {split}"
            );
        }
        let mut framer = Framer::default();
        assert!(framer.feed(&[b'X', 0, 0, 0, 2], |_| {}).is_err());
    }
}
