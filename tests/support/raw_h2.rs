//! An HTTP/2 server written frame by frame, for what an `h2` server cannot
//! be made to do: a GOAWAY whose last-stream-id is below a stream it has
//! read (what a server in a graceful shutdown, nginx reloading say, tells
//! a client whose request raced the shutdown; h2's GOAWAY always covers
//! every stream whose headers it has read), or a connection closed in the
//! middle of a call without a GOAWAY.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// What the server does with the first stream of each connection; it
/// processes none.
#[derive(Debug, Clone, Copy)]
pub enum RawH2Behaviour {
    /// Answers with `GOAWAY(last-stream-id = the stream - 2, code)`: the
    /// server did not process the stream and will take no more (RFC 9113,
    /// 6.8). The connection then stays open until the client closes it, as
    /// a draining server's does. Code `0` (NO_ERROR) is a graceful
    /// shutdown; `2` is INTERNAL_ERROR.
    GoAway(u32),
    /// Closes the connection (a FIN, no GOAWAY) before answering.
    Close,
    /// Sends a gRPC answer's headers (`200`, `application/grpc`), then
    /// closes the connection (a FIN, no GOAWAY): the answer breaks off.
    AnswerHeadersThenClose,
}

/// An HTTP/2 server on `127.0.0.1:0` that treats the first stream of each
/// connection as its [`RawH2Behaviour`] says, and ignores the rest.
pub struct RawH2Server {
    pub addr: SocketAddr,
    streams: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl RawH2Server {
    pub async fn start(behaviour: RawH2Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let streams = Arc::new(AtomicUsize::new(0));
        let counter = streams.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, behaviour, counter.clone()));
            }
        });
        Self {
            addr,
            streams,
            accept,
        }
    }

    /// Streams whose headers reached the server (none was processed).
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for RawH2Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One connection: the server's SETTINGS, an ACK of the client's, and the
/// behaviour on the first stream; every other frame is read and ignored
/// until the client closes the connection.
async fn serve(mut stream: TcpStream, behaviour: RawH2Behaviour, streams: Arc<AtomicUsize>) {
    let mut preface = [0; PREFACE.len()];
    if stream.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    if write_frame(&mut stream, SETTINGS, 0, 0, &[]).await.is_err() {
        return;
    }
    let mut first = true;
    loop {
        let mut head = [0; 9];
        if stream.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        if stream.read_exact(&mut payload).await.is_err() {
            return;
        }
        let reply = match kind {
            SETTINGS if flags & ACK == 0 => write_frame(&mut stream, SETTINGS, ACK, 0, &[]).await,
            HEADERS => {
                streams.fetch_add(1, Ordering::SeqCst);
                let reply = if first {
                    act(&mut stream, behaviour, id).await
                } else {
                    Ok(())
                };
                first = false;
                reply
            }
            _ => Ok(()),
        };
        if reply.is_err() {
            return;
        }
    }
}

/// Does what `behaviour` says with stream `id`.
async fn act(stream: &mut TcpStream, behaviour: RawH2Behaviour, id: u32) -> std::io::Result<()> {
    match behaviour {
        RawH2Behaviour::GoAway(code) => {
            // Client streams are odd: the one before this one.
            let last = id.saturating_sub(2);
            let mut body = last.to_be_bytes().to_vec();
            body.extend_from_slice(&code.to_be_bytes());
            write_frame(stream, GOAWAY, 0, 0, &body).await
        }
        // Only the write half: the client's frames are still read (to the
        // client's own close), or the kernel would answer them with a reset.
        RawH2Behaviour::Close => stream.shutdown().await,
        RawH2Behaviour::AnswerHeadersThenClose => {
            // HPACK: `:status: 200` (static index 8), then `content-type`
            // (static name 31) with the literal value, not indexed.
            let mut block = vec![0x88, 0x0f, 0x10, 16];
            block.extend_from_slice(b"application/grpc");
            write_frame(stream, HEADERS, END_HEADERS, id, &block).await?;
            stream.shutdown().await
        }
    }
}

async fn write_frame(
    stream: &mut TcpStream,
    kind: u8,
    flags: u8,
    id: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame).await
}
