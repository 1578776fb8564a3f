//! A relayed connection once logged in: bytes both ways, framed only to count the `ReadyForQuery`
//! messages the server owes and to find the pool's question, which the relay answers itself.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
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
    /// The transaction status of the last `ReadyForQuery`.
    status: AtomicU8,
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
    /// A message's body byte at `at` (only the first is reported: the status of `Z`).
    FirstByte { tag: u8, at: usize },
    /// The message in progress ends at `at`.
    End { tag: u8, at: usize },
}

impl Framer {
    /// Feeds `chunk`, calling `found` for each message start, first body byte and end.
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
                if self.have == 5 {
                    found(Found::FirstByte {
                        tag: self.tag,
                        at: i,
                    });
                    self.have = 6;
                }
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
pub(crate) async fn run(
    client: UnixStream,
    server: Server,
    link: &Link,
    session: Session,
    status: u8,
) {
    let flow = Flow {
        owed: AtomicI64::new(0),
        unsynced: AtomicBool::new(false),
        status: AtomicU8::new(status),
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = tokio::io::split(server);
    let client_write = tokio::sync::Mutex::new(client_write);
    let due = due_query(&link.nonce);
    tokio::select! {
        _ = upstream(client_read, server_write, &client_write, &flow, &session, due.as_bytes()) => {}
        _ = downstream(server_read, &client_write, &flow) => {}
    }
    drop(session);
}

/// The question a pool's callback asks, as the simple-query message sqlx sends for it.
fn due_message(due: &[u8]) -> Vec<u8> {
    let mut message = BytesMut::new();
    let query = std::str::from_utf8(due).unwrap_or_default();
    let _ = frontend::query(query, &mut message);
    message.to_vec()
}

/// A stretch of what the client sent: bytes to pass on, or a whole message that is the size of
/// the pool's question.
enum Piece {
    Forward(usize, usize),
    Candidate(Vec<u8>),
}

/// Client to server, except the pool's question, answered here when the connection is idle.
async fn upstream(
    mut client: tokio::net::unix::OwnedReadHalf,
    mut server: tokio::io::WriteHalf<Server>,
    client_write: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    flow: &Flow,
    session: &Session,
    due: &[u8],
) -> io::Result<()> {
    let question = due_message(due);
    let mut framer = Framer::default();
    let mut buffer = vec![0u8; BUFFER];
    // A message that may be the question, held until it is complete.
    let mut held: Option<Vec<u8>> = None;
    loop {
        let n = client.read(&mut buffer).await?;
        if n == 0 {
            let _ = server.shutdown().await;
            return Ok(());
        }
        let chunk = &buffer[..n];
        let mut pieces = Vec::new();
        let mut cursor = 0;
        framer.feed(chunk, |found| match found {
            Found::Start { tag, length, at } => {
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
                // Only a message whose header is in this chunk is held (a header split across
                // reads, which sqlx's single write of the question never makes, is passed on).
                if tag == b'Q' && length + 5 == question.len() && at >= 5 && at - 5 >= cursor {
                    pieces.push(Piece::Forward(cursor, at - 5));
                    held = Some(chunk[at - 5..at].to_vec());
                    cursor = at;
                }
            }
            Found::End { at, .. } => {
                if let Some(mut message) = held.take() {
                    message.extend_from_slice(&chunk[cursor..at]);
                    pieces.push(Piece::Candidate(message));
                    cursor = at;
                }
            }
            Found::FirstByte { .. } => {}
        })?;
        match &mut held {
            Some(message) => message.extend_from_slice(&chunk[cursor..]),
            None => pieces.push(Piece::Forward(cursor, chunk.len())),
        }
        for piece in pieces {
            match piece {
                Piece::Forward(from, to) if from < to => server.write_all(&chunk[from..to]).await?,
                Piece::Forward(..) => {}
                Piece::Candidate(message) => {
                    let question_asked = message == question;
                    // Asked before the client's lock is taken: it may log and start a request.
                    let due = question_asked && session.is_due();
                    let mut writer = client_write.lock().await;
                    // The question itself is owed an answer; nothing else may be.
                    let idle = flow.owed.load(Ordering::SeqCst) == 1
                        && !flow.unsynced.load(Ordering::SeqCst);
                    if question_asked && idle {
                        let status = flow.status.load(Ordering::SeqCst);
                        writer.write_all(&due_answer(due, status)).await?;
                        flow.owed.fetch_sub(1, Ordering::SeqCst);
                        drop(writer);
                        if due {
                            session.retired();
                        }
                    } else {
                        drop(writer);
                        server.write_all(&message).await?;
                    }
                }
            }
        }
        server.flush().await?;
    }
}

/// The answer to the pool's question: `SELECT 1` (due) or `SELECT 0`, then `ReadyForQuery` with
/// the connection's transaction status.
fn due_answer(due: bool, status: u8) -> Vec<u8> {
    let tag: &[u8] = if due { b"SELECT 1\0" } else { b"SELECT 0\0" };
    let mut answer = Vec::with_capacity(32);
    answer.push(b'C');
    answer.extend_from_slice(&(tag.len() as u32 + 4).to_be_bytes());
    answer.extend_from_slice(tag);
    answer.extend_from_slice(&[b'Z', 0, 0, 0, 5, status]);
    answer
}

/// Server to client, counting the `ReadyForQuery` messages owed (under the client's write lock,
/// once written, so that an answer from the relay never overtakes them).
async fn downstream(
    mut server: tokio::io::ReadHalf<Server>,
    client_write: &tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
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
        let mut status = None;
        framer.feed(chunk, |found| match found {
            Found::FirstByte { tag: b'Z', at } => status = Some(chunk[at]),
            Found::End { tag: b'Z', .. } => ready += 1,
            _ => {}
        })?;
        let mut writer = client_write.lock().await;
        writer.write_all(chunk).await?;
        if let Some(status) = status {
            flow.status.store(status, Ordering::SeqCst);
        }
        if ready > 0 {
            flow.owed.fetch_sub(ready, Ordering::SeqCst);
        }
    }
}

/// The query by which a pool's callback asks whether its connection's session is due, with the
/// relay's nonce.
pub(crate) fn due_query(nonce: &str) -> String {
    format!("/* postgres-entra: is this session due for retirement? {nonce} */")
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
                            Found::FirstByte { tag, at } => (tag, 'f', 0, offset + at),
                            Found::End { tag, at } => (tag, 'e', 0, offset + at),
                        })
                    })
                    .unwrap();
            }
            assert_eq!(
                events,
                [
                    (b'Z', 's', 1, 5),
                    (b'Z', 'f', 0, 5),
                    (b'Z', 'e', 0, 6),
                    (b'D', 's', 3, 11),
                    (b'D', 'f', 0, 11),
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
