//! An HTTP/2 server written frame by frame, that answers each new stream
//! with a GOAWAY whose last-stream-id is below it: what a server in a
//! graceful shutdown (nginx reloading, say) tells a client whose request
//! raced the shutdown. An `h2` server cannot be made to do this: its
//! GOAWAY always covers every stream whose headers it has read.

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

/// An HTTP/2 server on `127.0.0.1:0` that processes no stream: the first
/// stream of each connection is answered with `GOAWAY(last-stream-id =
/// that stream - 2, code)`, which tells the client that the server did
/// not process it and will take no more (RFC 9113, 6.8). The connection
/// then stays open until the client closes it, as a draining server's
/// does.
pub struct GoingAwayH2Server {
    pub addr: SocketAddr,
    streams: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl GoingAwayH2Server {
    /// Goes away with `code` (`0`, NO_ERROR, is a graceful shutdown; `2`
    /// is INTERNAL_ERROR).
    pub async fn start(code: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let streams = Arc::new(AtomicUsize::new(0));
        let counter = streams.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, code, counter.clone()));
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

impl Drop for GoingAwayH2Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One connection: the server's SETTINGS, an ACK of the client's, and a
/// GOAWAY for the first stream; every other frame is read and ignored
/// until the client closes the connection.
async fn serve(mut stream: TcpStream, code: u32, streams: Arc<AtomicUsize>) {
    let mut preface = [0; PREFACE.len()];
    if stream.read_exact(&mut preface).await.is_err() || preface != PREFACE {
        return;
    }
    if write_frame(&mut stream, SETTINGS, 0, 0, &[]).await.is_err() {
        return;
    }
    let mut gone = false;
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
                if gone {
                    Ok(())
                } else {
                    gone = true;
                    // Client streams are odd: the one before this one.
                    let last = id.saturating_sub(2);
                    let mut body = last.to_be_bytes().to_vec();
                    body.extend_from_slice(&code.to_be_bytes());
                    write_frame(&mut stream, GOAWAY, 0, 0, &body).await
                }
            }
            _ => Ok(()),
        };
        if reply.is_err() {
            return;
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
