//! One HTTP/2 connection over the `h2` crate itself: the handshake, the
//! task that drives the connection (and its keep-alive pings), a call's
//! request body, and its response body ([`Http2Body`]).
//!
//! Why not hyper's HTTP/2 client, which tower-lb used before: hyper hands
//! each request to its connection task through a channel, and that task
//! spawns a task of its own per request to wait for the response and hand
//! it back through a oneshot, so every call costs two hops between tasks,
//! a spawn and two channels. A call here opens its stream from the
//! caller's own task (h2's streams are shared under one lock) and waits
//! for its response there; the connection's task only reads and writes.
//! Measured in `benches/clients.rs`: a tonic client over four such
//! connections costs 2.9 µs less client CPU per call than over four bare
//! hyper HTTP/2 connections (6.1 against 8.9 µs, same run).
//!
//! What hyper did for the caller is done here as hyper does it: its
//! default settings, the connection-specific headers taken out, a body
//! sent no faster than the peer's window allows, received data given back
//! to the window as it is read, calls beyond the server's stream limit
//! kept in a queue of the connection's own (where they provably never
//! left), and the same keep-alive rule.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{
    HeaderMap, HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::Http2KeepAlive;
use crate::error::{BoxError, NeverSent};

/// hyper's client defaults, so that moving off hyper changed no setting a
/// server sees: a 2 MiB window per stream and 5 MiB per connection, 16 KiB
/// frames and header lists, 1 MiB buffered per stream, 100 streams until
/// the server says otherwise, no push.
fn builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(INITIAL_MAX_STREAMS)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    builder
}

/// When a connection pings its server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepAliveRule {
    pub(crate) keep_alive: Http2KeepAlive,
    /// Whether pings go on while no call is open.
    pub(crate) while_idle: bool,
}

/// The streams a connection may open before the server's `SETTINGS` say
/// how many it takes (h2's and hyper's default).
const INITIAL_MAX_STREAMS: usize = 100;

/// What the connection's task and its calls share.
#[derive(Debug)]
struct Shared {
    /// The connection takes no new calls: the server said `GOAWAY`, or
    /// the connection ended.
    unusable: AtomicBool,
    /// Calls open on the connection, from before their `HEADERS` are queued
    /// to the end of their response (the keep-alive reads it), and calls
    /// being let in (see `OpenCall::admit`).
    calls: AtomicUsize,
    /// The server's limit on open streams, as h2 last read it.
    max_streams: AtomicUsize,
    /// Calls waiting for the number of open calls to fall below the limit.
    /// Locked only when calls wait (a server's limit reached) or leave
    /// while some do.
    queued: Mutex<VecDeque<Waker>>,
    /// How many wakers `queued` holds, read without the lock.
    queued_len: AtomicUsize,
    /// Why the connection's task ended it, when the task did (its
    /// keep-alive): h2 tells the calls still open only that their
    /// connection went, as a broken pipe.
    ended_by: OnceLock<Arc<str>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            unusable: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            max_streams: AtomicUsize::new(INITIAL_MAX_STREAMS),
            queued: Mutex::new(VecDeque::new()),
            queued_len: AtomicUsize::new(0),
            ended_by: OnceLock::new(),
        }
    }
}

impl Shared {
    fn is_usable(&self) -> bool {
        !self.unusable.load(Ordering::Acquire)
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Waker>> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the call that has waited longest, if any waits.
    fn wake_one(&self) {
        if self.queued_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let waker = self.queue().pop_front();
        if let Some(waker) = waker {
            self.queued_len.fetch_sub(1, Ordering::AcqRel);
            waker.wake();
        }
    }

    /// Wakes every waiting call: the limit rose, or the connection takes
    /// no more calls.
    fn wake_all(&self) {
        if self.queued_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let wakers = std::mem::take(&mut *self.queue());
        self.queued_len.fetch_sub(wakers.len(), Ordering::AcqRel);
        wakers.into_iter().for_each(Waker::wake);
    }

    /// A call's error, with the reason its connection's task ended the
    /// connection when that is why h2 gave it (an I/O error of h2's own
    /// making: the socket is gone); the error stays in the chain, so it is
    /// classified as before (the connection lost).
    fn explain(&self, error: h2::Error) -> BoxError {
        match self.ended_by.get() {
            Some(why) if error.is_io() => Box::new(EndedByClient {
                why: Arc::clone(why),
                source: error,
            }),
            _ => Box::new(error),
        }
    }

    /// Lets a call in once the connection has room for its stream, or fails
    /// it, never sent, once the connection takes no more calls.
    fn poll_admit(self: &Arc<Self>, cx: &mut Context<'_>) -> Poll<Result<OpenCall, BoxError>> {
        // Twice: again after queueing, so that a call leaving in between
        // is not missed.
        for queued in [false, true] {
            if !self.is_usable() {
                return Poll::Ready(Err(Box::new(NeverSent::new(
                    "the connection closed while the call waited for a stream of its own",
                ))));
            }
            if let Some(call) = OpenCall::admit(self) {
                return Poll::Ready(Ok(call));
            }
            if !queued {
                self.queue().push_back(cx.waker().clone());
                self.queued_len.fetch_add(1, Ordering::AcqRel);
            }
        }
        Poll::Pending
    }
}

/// Shakes hands over `io`: the open connection's handle, and the task that
/// drives it, for the caller to spawn.
pub(crate) async fn handshake(
    io: TcpStream,
    keep_alive: Option<KeepAliveRule>,
) -> Result<(Http2Open, Driver), h2::Error> {
    let last_read = keep_alive.map(|_| Arc::new(LastRead::new()));
    let io = Stamped {
        io,
        last_read: last_read.clone(),
    };
    let (sender, mut connection) = builder().handshake::<_, Bytes>(io).await?;
    let keep_alive = match (keep_alive, last_read) {
        (Some(rule), Some(last_read)) => connection
            .ping_pong()
            .map(|ping_pong| KeepAlive::new(rule, ping_pong, last_read)),
        _ => None,
    };
    let shared = Arc::new(Shared::default());
    let (dropped_tx, dropped) = oneshot::channel();
    let open = Http2Open {
        sender: sender.clone(),
        shared: Arc::clone(&shared),
        _dropped: dropped_tx,
    };
    let driver = Driver {
        connection,
        sender: Some(sender),
        dropped,
        shared,
        keep_alive,
    };
    Ok((open, driver))
}

/// An open HTTP/2 connection's handle: calls are sent through it.
pub(crate) struct Http2Open {
    sender: SendRequest<Bytes>,
    shared: Arc<Shared>,
    /// Dropped with the handle, which tells the driver that no new call
    /// will come: the connection closes once its calls have ended.
    _dropped: oneshot::Sender<()>,
}

impl fmt::Debug for Http2Open {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Open")
            .field("usable", &self.is_usable())
            .finish_non_exhaustive()
    }
}

/// The response future of [`Http2Open::send`]. Boxed: the endpoints'
/// response futures are not generic over the request body.
pub(crate) type Http2SendFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Http2Body>, BoxError>> + Send>>;

impl Http2Open {
    /// Whether the connection takes new calls (an atomic load).
    pub(crate) fn is_usable(&self) -> bool {
        self.shared.is_usable()
    }

    /// Opens a stream for `req` (once the server's limit on streams leaves
    /// room) and sends its body. A request that cannot have a stream (the
    /// connection has ended, or the server said `GOAWAY`) fails marked
    /// [`NeverSent`]: no byte of it was queued.
    pub(crate) fn send<B>(&self, req: http::Request<B>) -> Http2SendFuture
    where
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();
        strip_connection_headers(&mut parts.headers);
        if let Some(len) = body.size_hint().exact() {
            if len != 0 || method_has_payload_semantics(&parts.method) {
                parts
                    .headers
                    .entry(CONTENT_LENGTH)
                    .or_insert_with(|| HeaderValue::from(len));
            }
        }
        let sender = self.sender.clone();
        // Counted before its HEADERS are queued: the connection's task may
        // run as soon as they are, and must see the call open to keep
        // pinging (hyper 1.12 counts it after, and can miss it).
        match OpenCall::admit(&self.shared) {
            Some(call) => match start(sender, parts, body, call) {
                Ok(call) => Box::pin(call),
                Err(error) => Box::pin(std::future::ready(Err(error))),
            },
            // The server's limit on streams is reached. h2 would queue the
            // stream itself, but a stream it queued and one it had just
            // opened fail alike when the connection ends, so a call waits
            // here instead, where it provably never left: if the
            // connection ends first, it fails as never sent and a retry
            // may send it elsewhere, POST or not (hyper's client keeps
            // such calls in its own queue for the same reason).
            None => {
                let shared = Arc::clone(&self.shared);
                Box::pin(async move {
                    let call = std::future::poll_fn(|cx| shared.poll_admit(cx)).await?;
                    start(sender, parts, body, call)?.await
                })
            }
        }
    }
}

/// Opens the call's stream and queues its `HEADERS`. A request h2 refuses
/// to open a stream for (the connection has ended, or the server said
/// `GOAWAY`) fails marked [`NeverSent`]: no byte of it was queued.
fn start<B>(
    mut sender: SendRequest<Bytes>,
    parts: http::request::Parts,
    body: B,
    call: OpenCall,
) -> Result<Call<B>, BoxError>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let end_of_stream = body.is_end_stream();
    match sender.send_request(http::Request::from_parts(parts, ()), end_of_stream) {
        Ok((response, stream)) => Ok(Call {
            response,
            pipe: (!end_of_stream).then(|| BodyPipe::new(stream, body)),
            call: Some(call),
        }),
        Err(error) => Err(Box::new(NeverSent::new(error))),
    }
}

/// Whether a request of this method means something by its body (RFC 9110),
/// so that an empty one is still given a `content-length`, as hyper does.
fn method_has_payload_semantics(method: &http::Method) -> bool {
    !matches!(
        *method,
        http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::CONNECT
    )
}

/// Takes out the headers HTTP/2 forbids (RFC 9113, 8.2.2), as hyper does,
/// rather than have h2 refuse the request: `connection` and the headers it
/// names, `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`,
/// and a `te` other than `trailers`. One pass over the names first: most
/// requests have none of them.
fn strip_connection_headers(headers: &mut HeaderMap) {
    let forbidden = |name: &HeaderName, value: &HeaderValue| {
        *name == CONNECTION
            || *name == TRANSFER_ENCODING
            || *name == UPGRADE
            || (*name == TE && value != "trailers")
            || name == "keep-alive"
            || name == "proxy-connection"
    };
    if !headers.iter().any(|(name, value)| forbidden(name, value)) {
        return;
    }
    tracing::debug!("headers that HTTP/2 forbids were taken out of a request");
    if let Some(connection) = headers.remove(CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// A call counted open on its connection until dropped.
struct OpenCall(Arc<Shared>);

impl OpenCall {
    /// Counts a new call in if the server's limit on streams leaves room
    /// for it. A call's count lasts at least as long as h2's count of its
    /// stream, so a call let in here is never one h2 has to queue.
    fn admit(shared: &Arc<Shared>) -> Option<Self> {
        let before = shared.calls.fetch_add(1, Ordering::AcqRel);
        let call = Self(Arc::clone(shared));
        // Dropped if over the limit: the count goes back down (see `drop`).
        (before < shared.max_streams.load(Ordering::Acquire)).then_some(call)
    }

    /// One more count, for a part of the call that lives on its own.
    fn again(&self) -> Self {
        self.0.calls.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(&self.0))
    }

    /// A stream's `error`, explained by its connection (see
    /// `Shared::explain`) while its call is open.
    fn explain(call: Option<&Self>, error: h2::Error) -> BoxError {
        match call {
            Some(call) => call.0.explain(error),
            None => Box::new(error),
        }
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let shared = &self.0;
        let left = shared
            .calls
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        // Whoever brings the count below the limit lets a waiting call try:
        // a call that leaves while the count stays at the limit (the server
        // full, or calls being turned away) wakes nobody, so waiting calls
        // do not wake each other in a loop.
        if left < shared.max_streams.load(Ordering::Acquire) {
            shared.wake_one();
        }
    }
}

/// A call on its way: its request body being sent, its response awaited,
/// both from the caller's task.
struct Call<B> {
    response: ResponseFuture,
    pipe: Option<BodyPipe<B>>,
    call: Option<OpenCall>,
}

impl<B> Future for Call<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Http2Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(pipe) = this.pipe.as_mut() {
            match pipe.poll_send(cx) {
                Poll::Ready(Ok(())) => this.pipe = None,
                // The body's own error: the stream is reset, and the caller
                // is told what the body said rather than h2's "reset".
                Poll::Ready(Err(PipeError::Body(error))) => {
                    this.pipe = None;
                    return Poll::Ready(Err(error));
                }
                // The stream's end (a reset, the connection gone) is the
                // response's to report.
                Poll::Ready(Err(PipeError::Stream(error))) => {
                    tracing::debug!(%error, "the request body could not be sent");
                    this.pipe = None;
                }
                Poll::Pending => {}
            }
        }
        let response = ready!(Pin::new(&mut this.response).poll(cx))
            .map_err(|error| OpenCall::explain(this.call.as_ref(), error))?;
        if let Some(mut pipe) = this.pipe.take() {
            // The server answered before the request's body was all sent
            // (a stream both ways): the rest goes on in a task of its own,
            // as it does under hyper, counted open for the keep-alive.
            let sending = this.call.as_ref().map(OpenCall::again);
            tokio::spawn(std::future::poll_fn(move |cx| {
                let _sending = &sending;
                pipe.poll_send(cx).map(|sent| {
                    if let Err(error) = sent {
                        tracing::debug!(error = %error.report(), "the request body could not be sent");
                    }
                })
            }));
        }
        // Walked, not hashed: nearly every answer has a few headers and no
        // `content-length` (see `crate::header`).
        let content_length = crate::header::get(response.headers(), &CONTENT_LENGTH)
            .and_then(|len| len.to_str().ok()?.parse::<u64>().ok());
        // An answer that ended with its head leaves nothing open: the
        // keep-alive need not wait for its body to be read or dropped.
        let call = this
            .call
            .take()
            .filter(|_| !response.body().is_end_stream());
        Poll::Ready(Ok(response.map(|recv| Http2Body {
            recv,
            data_done: false,
            remaining: content_length,
            call,
        })))
    }
}

/// A request body on its way to its stream.
struct BodyPipe<B> {
    stream: SendStream<Bytes>,
    body: B,
    /// A chunk read from the body, waiting for room in the stream's window,
    /// and whether it is the body's last.
    buffered: Option<(Bytes, bool)>,
}

impl<B> BodyPipe<B> {
    fn new(stream: SendStream<Bytes>, body: B) -> Self {
        Self {
            stream,
            body,
            buffered: None,
        }
    }
}

/// Why a request body stopped short.
enum PipeError {
    /// The body failed: its error.
    Body(BoxError),
    /// The stream could take no more (reset, or its connection gone).
    Stream(h2::Error),
}

impl PipeError {
    fn report(&self) -> String {
        match self {
            PipeError::Body(error) => crate::error::report(&**error).to_string(),
            PipeError::Stream(error) => error.to_string(),
        }
    }
}

impl<B> BodyPipe<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Sends the body's frames as the stream's window allows, its end
    /// included; ready when all is queued.
    ///
    /// The order is hyper's (since hyper#4003): a chunk is read from the
    /// body first, and window is reserved for it only then. Reserving
    /// before reading would pin a byte of the connection's window to a
    /// stream whose body is idle, and a server that grants window only
    /// once all of it is used would stall every other stream.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError>> {
        loop {
            // A reset ends the sending whatever else waits: without this, a
            // body with nothing to send would keep the stream (and its
            // connection) open after the server has reset it.
            if let Poll::Ready(reset) = self.stream.poll_reset(cx) {
                let error = match reset {
                    Ok(reason) => h2::Error::from(reason),
                    Err(error) => error,
                };
                return Poll::Ready(Err(PipeError::Stream(error)));
            }
            if self.buffered.is_some() {
                if let Err(error) = ready!(self.poll_room(cx)) {
                    return Poll::Ready(Err(PipeError::Stream(error)));
                }
                let Some((chunk, last)) = self.buffered.take() else {
                    unreachable!("checked above");
                };
                if self.send(chunk, last)? {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    self.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(PipeError::Body(error.into())));
                }
                None => {
                    return Poll::Ready(
                        self.stream
                            .send_data(Bytes::new(), true)
                            .map_err(|error| self.fail(error)),
                    )
                }
            };
            match frame.into_data() {
                Ok(mut data) => {
                    let chunk = data.copy_to_bytes(data.remaining());
                    let last = self.body.is_end_stream();
                    if chunk.is_empty() {
                        // Needs no window.
                        if self.send(chunk, last)? {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // A claim of one byte, not the chunk's length: every
                    // stream waiting with a whole chunk's claim would ask
                    // for more than the server's window as a whole.
                    self.stream.reserve_capacity(1);
                    self.buffered = Some((chunk, last));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        // Trailers take no window: give back what is held.
                        self.stream.reserve_capacity(0);
                        return Poll::Ready(
                            self.stream
                                .send_trailers(trailers)
                                .map_err(|error| self.fail(error)),
                        );
                    }
                }
            }
        }
    }

    /// Ready once the stream has room for at least a byte of the buffered
    /// chunk (h2 holds the rest until the window opens, and raises the
    /// claim to the chunk's length itself).
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        while self.stream.capacity() == 0 {
            match ready!(self.stream.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Poll::Ready(Err(error)),
                None => return Poll::Ready(Err(h2::Error::from(Reason::CANCEL))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Queues `chunk`; true when it was the last.
    fn send(&mut self, chunk: Bytes, last: bool) -> Result<bool, PipeError> {
        self.stream
            .send_data(chunk, last)
            .map_err(|error| self.fail(error))?;
        Ok(last)
    }

    /// A frame h2 would not queue (trailers naming a header HTTP/2 forbids,
    /// say): the stream is reset rather than left half open until the
    /// deadline.
    fn fail(&mut self, error: h2::Error) -> PipeError {
        self.stream.send_reset(Reason::INTERNAL_ERROR);
        PipeError::Stream(error)
    }
}

/// The body of a response on an HTTP/2 connection of tower-lb's own: its
/// data, then its trailers. Each chunk read is given back to the stream's
/// window at once, as hyper's body does.
pub(crate) struct Http2Body {
    recv: RecvStream,
    data_done: bool,
    /// What `content-length` said is left, if the server gave one.
    remaining: Option<u64>,
    /// The call stays open on its connection until its body is read or
    /// dropped.
    call: Option<OpenCall>,
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, which the next
                    // read reports.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(remaining) = this.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(this.fail(error)))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => {
                this.call = None;
                Poll::Ready(trailers.map(|trailers| Ok(Frame::trailers(trailers))))
            }
            Err(error) => Poll::Ready(Some(Err(this.fail(error)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}

impl Http2Body {
    /// The stream failed: the call is no longer open on its connection.
    fn fail(&mut self, error: h2::Error) -> BoxError {
        OpenCall::explain(self.call.take().as_ref(), error)
    }
}

/// A call failed because its connection's task ended the connection (an
/// unanswered keep-alive ping): prints that reason, with h2's error (a
/// broken pipe) as its source.
#[derive(Debug)]
struct EndedByClient {
    why: Arc<str>,
    source: h2::Error,
}

impl fmt::Display for EndedByClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tower-lb closed the connection: {}", self.why)
    }
}

impl std::error::Error for EndedByClient {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl fmt::Debug for Http2Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http2Body")
            .field("end_stream", &self.recv.is_end_stream())
            .finish_non_exhaustive()
    }
}

/// The task of one connection: reads and writes its frames, pings its
/// server, and tells when it takes no new calls.
pub(crate) struct Driver {
    connection: Connection<Stamped, Bytes>,
    /// A handle of its own, to learn of a `GOAWAY` (h2 tells a handle, not
    /// the connection); dropped once the calls' handle is, so that the
    /// connection can close.
    sender: Option<SendRequest<Bytes>>,
    dropped: oneshot::Receiver<()>,
    shared: Arc<Shared>,
    keep_alive: Option<KeepAlive>,
}

impl Driver {
    /// Drives the connection to its end. `on_unusable` is called once, as
    /// soon as the connection takes no new calls: at a `GOAWAY`, whose
    /// calls under way go on, or at the end.
    pub(crate) fn run(
        mut self,
        on_unusable: impl FnOnce(),
    ) -> impl Future<Output = Result<(), BoxError>> {
        // Told from a guard, made before the future is first polled: a task
        // that panics, or is dropped with its runtime (even unstarted), must
        // still say so, or its endpoint would wait for ever on a connection
        // marked usable.
        let mut unusable = Unusable {
            shared: Arc::clone(&self.shared),
            tell: Some(on_unusable),
        };
        std::future::poll_fn(move |cx| self.poll_drive(cx, &mut unusable))
    }

    fn poll_drive(
        &mut self,
        cx: &mut Context<'_>,
        unusable: &mut Unusable<impl FnOnce()>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            if let Poll::Ready(ended) = Pin::new(&mut self.connection).poll(cx) {
                return Poll::Ready(ended.map_err(Into::into));
            }
            if self.sender.is_some() {
                if Pin::new(&mut self.dropped).poll(cx).is_ready() {
                    // No new call will come. h2 is not woken by its last
                    // handle going, so the connection is polled again here
                    // to close once its calls end.
                    self.sender = None;
                    continue;
                }
                let going_away = self
                    .sender
                    .as_mut()
                    .is_some_and(|sender| matches!(sender.poll_ready(cx), Poll::Ready(Err(_))));
                if going_away {
                    self.sender = None;
                    unusable.tell();
                    continue;
                }
                // The server's limit, from its SETTINGS: calls wait for a
                // stream below it (see `OpenCall::admit`).
                if let Some(sender) = &self.sender {
                    let max = sender.current_max_send_streams();
                    let before = self.shared.max_streams.swap(max, Ordering::AcqRel);
                    if max > before {
                        self.shared.wake_all();
                    }
                }
            }
            if let Some(keep_alive) = self.keep_alive.as_mut() {
                let idle = self.shared.calls.load(Ordering::Acquire) == 0;
                if let Poll::Ready(error) = keep_alive.poll(cx, idle) {
                    // Set before the connection is dropped, which is what
                    // fails the calls still open.
                    let _ = self.shared.ended_by.set(error.to_string().into());
                    return Poll::Ready(Err(error));
                }
            }
            return Poll::Pending;
        }
    }
}

/// Marks the connection unusable and tells its endpoint, once: at a
/// `GOAWAY`, or when the driver ends, however it ends.
struct Unusable<F: FnOnce()> {
    shared: Arc<Shared>,
    tell: Option<F>,
}

impl<F: FnOnce()> Unusable<F> {
    fn tell(&mut self) {
        self.shared.unusable.store(true, Ordering::Release);
        // Calls waiting for a stream fail, never sent.
        self.shared.wake_all();
        if let Some(tell) = self.tell.take() {
            tell();
        }
    }
}

impl<F: FnOnce()> Drop for Unusable<F> {
    fn drop(&mut self) {
        self.tell();
    }
}

/// The keep-alive's timer: a ping once the connection has read nothing for
/// the interval (while a call is open, or always when `while_idle`), and
/// the connection closed if its answer takes longer than the timeout.
/// hyper's rule, with the last read seen at the socket.
struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    while_idle: bool,
    ping_pong: PingPong,
    last_read: Arc<LastRead>,
    sleep: Pin<Box<Sleep>>,
    state: KeepAliveState,
}

#[derive(Debug, Clone, Copy)]
enum KeepAliveState {
    /// Nothing scheduled: idle, or a pong just came.
    Waiting,
    /// A ping is due at the instant, unless something is read before.
    Scheduled(Instant),
    /// A ping is out; the timer is its timeout.
    PingSent,
}

impl KeepAlive {
    fn new(rule: KeepAliveRule, ping_pong: PingPong, last_read: Arc<LastRead>) -> Self {
        Self {
            interval: rule.keep_alive.interval(),
            timeout: rule.keep_alive.timeout(),
            while_idle: rule.while_idle,
            ping_pong,
            last_read,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            state: KeepAliveState::Waiting,
        }
    }

    /// Ready with an error when the server has not answered a ping in time.
    fn poll(&mut self, cx: &mut Context<'_>, idle: bool) -> Poll<BoxError> {
        loop {
            match self.state {
                KeepAliveState::Waiting => {
                    if idle && !self.while_idle {
                        return Poll::Pending;
                    }
                    let at = later(self.last_read.at(), self.interval);
                    self.sleep.as_mut().reset(at);
                    self.state = KeepAliveState::Scheduled(at);
                }
                KeepAliveState::Scheduled(at) => {
                    if self.sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let next = later(self.last_read.at(), self.interval);
                    if next > at {
                        // Something was read meanwhile: no ping needed yet.
                        self.sleep.as_mut().reset(next);
                        self.state = KeepAliveState::Scheduled(next);
                        continue;
                    }
                    if idle && !self.while_idle {
                        self.state = KeepAliveState::Waiting;
                        return Poll::Pending;
                    }
                    if let Err(error) = self.ping_pong.send_ping(Ping::opaque()) {
                        return Poll::Ready(error.into());
                    }
                    self.sleep
                        .as_mut()
                        .reset(later(Instant::now(), self.timeout));
                    self.state = KeepAliveState::PingSent;
                }
                KeepAliveState::PingSent => match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => self.state = KeepAliveState::Waiting,
                    Poll::Ready(Err(error)) => return Poll::Ready(error.into()),
                    Poll::Pending => {
                        ready!(self.sleep.as_mut().poll(cx));
                        return Poll::Ready(
                            format!(
                                "keep-alive timed out: no answer to a ping within {}",
                                crate::error::duration(&self.timeout)
                            )
                            .into(),
                        );
                    }
                },
            }
        }
    }
}

/// `duration` after `instant`, or the crate's far future when that cannot
/// be told (`Http2KeepAlive` takes any duration).
fn later(instant: Instant, duration: Duration) -> Instant {
    instant
        .checked_add(duration)
        .unwrap_or_else(crate::request::far_future)
}

/// When the connection last read a byte, in milliseconds since `epoch`.
#[derive(Debug)]
struct LastRead {
    epoch: Instant,
    millis: AtomicU64,
}

impl LastRead {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn stamp(&self) {
        let millis = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.epoch + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }
}

/// The connection's socket, noting when it last read something (for the
/// keep-alive, when there is one).
pub(crate) struct Stamped {
    io: TcpStream,
    last_read: Option<Arc<LastRead>>,
}

impl AsyncRead for Stamped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            if let Some(last_read) = &self.last_read {
                last_read.stamp();
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How the test server treats pings.
    #[derive(Clone, Copy, PartialEq)]
    enum Pongs {
        Answer,
        Ignore,
        /// Answered, and the first request's HEADERS answered with a
        /// `GOAWAY` (`NO_ERROR`) that still takes that request.
        AnswerAndGoAway,
        /// Answered; one stream at a time (`SETTINGS_MAX_CONCURRENT_STREAMS`
        /// 1), and the connection dropped 300 ms after the first request's
        /// HEADERS, unanswered.
        OneStreamThenHangUp,
        /// Pings ignored; each request answered with a `200` head and then
        /// nothing, its body left open.
        HeadThenIgnore,
    }

    /// A server that speaks just enough HTTP/2 to count the client's pings:
    /// its settings, their acknowledgement, and a pong per ping unless
    /// told to ignore them. It answers no request.
    async fn ping_counting_server(pongs: Pongs) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&pings);
        tokio::spawn(async move {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut preface = [0u8; 24];
            if stream.read_exact(&mut preface).await.is_err() {
                return;
            }
            let settings: &[u8] = if pongs == Pongs::OneStreamThenHangUp {
                // SETTINGS_MAX_CONCURRENT_STREAMS (3) = 1.
                &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1]
            } else {
                &[0, 0, 0, 4, 0, 0, 0, 0, 0]
            };
            let _ = stream.write_all(settings).await;
            loop {
                let mut head = [0u8; 9];
                if stream.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len =
                    usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                if stream.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let (kind, flags) = (head[3], head[4]);
                let answer = match (kind, flags & 1) {
                    // SETTINGS: acknowledged.
                    (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                    // PING: counted, and answered with the same payload.
                    (6, 0) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        if matches!(pongs, Pongs::Ignore | Pongs::HeadThenIgnore) {
                            continue;
                        }
                        let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                        pong.extend_from_slice(&payload);
                        pong
                    }
                    (1, _) if pongs == Pongs::OneStreamThenHangUp => {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        return;
                    }
                    // HEADERS: the stream is taken, and no later one.
                    (1, _) if pongs == Pongs::AnswerAndGoAway => {
                        let mut go_away = vec![0, 0, 8, 7, 0, 0, 0, 0, 0];
                        go_away.extend_from_slice(&head[5..9]);
                        go_away.extend_from_slice(&[0, 0, 0, 0]);
                        go_away
                    }
                    // HEADERS: answered with HEADERS (END_HEADERS, not
                    // END_STREAM) holding `:status: 200` (HPACK index 8).
                    (1, _) if pongs == Pongs::HeadThenIgnore => {
                        let mut head_frame = vec![0, 0, 1, 1, 4];
                        head_frame.extend_from_slice(&head[5..9]);
                        head_frame.push(0x88);
                        head_frame
                    }
                    _ => continue,
                };
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        });
        (addr, pings)
    }

    fn rule(while_idle: bool) -> KeepAliveRule {
        KeepAliveRule {
            keep_alive: Http2KeepAlive::new(Duration::from_millis(50), Duration::from_millis(200))
                .unwrap_or_else(|e| panic!("{e}")),
            while_idle,
        }
    }

    /// A connection to `addr`, its driver running; the driver's end and
    /// whether it said the connection became unusable.
    async fn connect(
        addr: std::net::SocketAddr,
        rule: KeepAliveRule,
    ) -> (
        Http2Open,
        tokio::task::JoinHandle<Result<(), BoxError>>,
        Arc<AtomicBool>,
    ) {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        let (open, driver) = handshake(stream, Some(rule))
            .await
            .unwrap_or_else(|e| panic!("handshake: {e}"));
        let told = Arc::new(AtomicBool::new(false));
        let tell = Arc::clone(&told);
        let running = tokio::spawn(driver.run(move || tell.store(true, Ordering::SeqCst)));
        (open, running, told)
    }

    fn get() -> http::Request<http_body_util::Empty<Bytes>> {
        http::Request::get("http://test.invalid/")
            .body(http_body_util::Empty::new())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn with_no_call_open_it_does_not_ping_unless_told_to_while_idle() {
        let (addr, pings) = ping_counting_server(Pongs::Answer).await;
        let (_open, _driver, _) = connect(addr, rule(false)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(pings.load(Ordering::SeqCst), 0);

        let (addr, pings) = ping_counting_server(Pongs::Answer).await;
        let (_open, _driver, _) = connect(addr, rule(true)).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(pings.load(Ordering::SeqCst) >= 2, "{pings:?}");
    }

    #[tokio::test]
    async fn with_a_call_open_and_nothing_read_it_pings_every_interval() {
        let (addr, pings) = ping_counting_server(Pongs::Answer).await;
        let (open, _driver, told) = connect(addr, rule(false)).await;
        // The server never answers: the call stays open.
        let call = open.send(get());
        let waiting = tokio::spawn(call);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(pings.load(Ordering::SeqCst) >= 2, "{pings:?}");
        // Answered pings keep the connection.
        assert!(open.is_usable());
        assert!(!told.load(Ordering::SeqCst));
        waiting.abort();
    }

    #[tokio::test]
    async fn a_goaway_makes_the_connection_take_no_new_call_while_its_calls_go_on() {
        let (addr, _) = ping_counting_server(Pongs::AnswerAndGoAway).await;
        let (open, driver, told) = connect(addr, rule(false)).await;
        let taken = tokio::spawn(open.send(get()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !told.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the GOAWAY was not noticed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!open.is_usable());
        // The call the server took is still under way, and so is its
        // connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!taken.is_finished());
        assert!(!driver.is_finished());
        // A new call is refused, never sent.
        let refused = open
            .send(get())
            .await
            .err()
            .unwrap_or_else(|| panic!("sent"));
        assert!(crate::error::is_never_sent(&*refused), "{refused}");
        taken.abort();
    }

    #[tokio::test]
    async fn a_keep_alive_beyond_any_timer_neither_panics_nor_pings() {
        let (addr, pings) = ping_counting_server(Pongs::Answer).await;
        let rule = KeepAliveRule {
            keep_alive: Http2KeepAlive::new(Duration::MAX, Duration::MAX)
                .unwrap_or_else(|e| panic!("{e}")),
            while_idle: true,
        };
        let (open, driver, told) = connect(addr, rule).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!driver.is_finished());
        assert!(open.is_usable() && !told.load(Ordering::SeqCst));
        assert_eq!(pings.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_driver_stopped_from_outside_still_marks_its_connection_unusable() {
        let (addr, _) = ping_counting_server(Pongs::Answer).await;
        let (open, driver, told) = connect(addr, rule(false)).await;
        driver.abort();
        let _ = driver.await;
        assert!(told.load(Ordering::SeqCst));
        assert!(!open.is_usable());
    }

    #[tokio::test]
    async fn a_call_waiting_for_a_stream_when_the_connection_dies_fails_never_sent() {
        let (addr, _) = ping_counting_server(Pongs::OneStreamThenHangUp).await;
        let (open, _driver, _) = connect(addr, rule(false)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.shared.max_streams.load(Ordering::SeqCst) != 1 {
            assert!(Instant::now() < deadline, "the server's limit was not read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = tokio::spawn(open.send(get()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let post = http::Request::post("http://test.invalid/")
            .body(http_body_util::Full::new(Bytes::from_static(b"once")))
            .unwrap_or_else(|e| panic!("{e}"));
        let waiting = tokio::spawn(open.send(post));
        let outcome = |call: tokio::task::JoinHandle<Result<_, BoxError>>| async move {
            tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .unwrap_or_else(|_| panic!("a call outlived its connection"))
                .unwrap_or_else(|e| panic!("{e}"))
                .err()
                .unwrap_or_else(|| panic!("a call was answered by a server that answers none"))
        };
        // The first was on the wire when the connection died: nobody can
        // say whether the server acted on it.
        let lost = outcome(sent).await;
        assert!(!crate::error::is_never_sent(&*lost), "{lost}");
        // The second waited for the first's stream and never left.
        let unsent = outcome(waiting).await;
        assert!(crate::error::is_never_sent(&*unsent), "{unsent}");
    }

    #[tokio::test]
    async fn a_ping_left_unanswered_past_the_timeout_ends_the_connection_and_its_calls() {
        let (addr, pings) = ping_counting_server(Pongs::Ignore).await;
        let (open, driver, told) = connect(addr, rule(false)).await;
        let call = tokio::spawn(open.send(get()));
        let ended = tokio::time::timeout(Duration::from_secs(5), driver)
            .await
            .unwrap_or_else(|_| panic!("the connection outlived an unanswered ping"))
            .unwrap_or_else(|e| panic!("{e}"));
        let error = ended.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("keep-alive timed out"), "{error}");
        assert_eq!(pings.load(Ordering::SeqCst), 1);
        assert!(told.load(Ordering::SeqCst));
        assert!(!open.is_usable());
        let failed = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| panic!("the call outlived its connection"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(failed.is_err());
    }

    #[tokio::test]
    async fn a_call_waiting_for_its_answer_is_told_the_keep_alive_ended_its_connection() {
        let (addr, _pings) = ping_counting_server(Pongs::Ignore).await;
        let (open, _driver, _told) = connect(addr, rule(false)).await;
        let error = tokio::time::timeout(Duration::from_secs(5), open.send(get()))
            .await
            .unwrap_or_else(|_| panic!("the call outlived its connection"))
            .err()
            .unwrap_or_else(|| panic!("a server that answers nothing answered"));
        let report = crate::error::report(&*error).to_string();
        assert!(
            report.contains("keep-alive timed out: no answer to a ping within 200ms"),
            "{report}"
        );
        // Still the connection lost, as h2's broken pipe alone was.
        assert!(crate::error::is_connection_lost(&*error), "{report}");
        assert!(!crate::error::is_never_sent(&*error), "{report}");
    }

    #[tokio::test]
    async fn a_body_being_read_is_told_the_keep_alive_ended_its_connection() {
        let (addr, _pings) = ping_counting_server(Pongs::HeadThenIgnore).await;
        let (open, _driver, _told) = connect(addr, rule(false)).await;
        let response = tokio::time::timeout(Duration::from_secs(5), open.send(get()))
            .await
            .unwrap_or_else(|_| panic!("no answer's head"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(response.status(), http::StatusCode::OK);
        let read = http_body_util::BodyExt::collect(response.into_body());
        let error = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("the body outlived its connection"))
            .err()
            .unwrap_or_else(|| panic!("a body the server never ended ended"));
        let report = crate::error::report(&*error).to_string();
        assert!(report.contains("keep-alive timed out"), "{report}");
        assert!(crate::error::is_connection_lost(&*error), "{report}");
    }
}
