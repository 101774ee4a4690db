//! Request bodies that can be sent more than once.
//!
//! A request body is a stream: once an attempt has sent it, it is gone. To
//! retry or hedge an HTTP request, [`ReplayBody`] keeps a copy of what was
//! sent (up to a cap), so that a later attempt can send the same bytes again.
//! [`ReplayLayer`] wraps every request's body in one, which is what makes
//! `http::Request`s [`Replayable`].

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use crate::error::BoxError;
use crate::request::{HasCallContext, NotReplayable, Replayable, Safety};

/// The replay buffer's default size: 64 KiB.
///
/// Large enough for the JSON and protobuf bodies of ordinary RPCs; an upload
/// larger than this is sent once and not retried, rather than held in memory.
pub const DEFAULT_REPLAY_CAP: usize = 64 * 1024;

/// A request body that can be sent more than once.
///
/// It keeps a copy of each frame as the body is sent (up to `cap` bytes of
/// data), so that a clone sends the same body again: first the frames kept so
/// far, then the rest as it is read from the original body. Every clone shares
/// that one copy, so cloning costs no more memory, and two clones may be sent
/// at once (a hedge and the attempt it races): whichever gets ahead reads the
/// original body, and the other follows from the copy.
///
/// A body larger than `cap` is still sent whole by the attempt that is
/// reading it when it outgrows the cap, but from then on nothing is kept:
/// [`is_capped`](Self::is_capped) turns true, [`try_clone`](Self::try_clone)
/// fails, and any other clone that still needs the lost data ends with an
/// error rather than sending a truncated body.
///
/// An error from the original body ends every clone that reaches it with an
/// error (after which a clone yields no more frames).
///
/// An empty body (one whose [`Body::is_end_stream`] is already true, as for
/// nearly every GET) keeps no shared state at all.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower_lb::retry::{ReplayBody, DEFAULT_REPLAY_CAP};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::BoxError> {
/// let body = ReplayBody::new(Full::new(Bytes::from("order #7")), DEFAULT_REPLAY_CAP);
/// let retry = body.try_clone()?;
///
/// // The first attempt sends the body...
/// assert_eq!(body.collect().await?.to_bytes(), "order #7");
/// // ...and the retry sends it again.
/// assert_eq!(retry.collect().await?.to_bytes(), "order #7");
/// # Ok(())
/// # }
/// ```
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// The body was over before it started: there is nothing to share.
    /// `fn() -> B` because no `B` is held, so it should not affect `Send` or
    /// `Sync`.
    Empty {
        cap: usize,
        _body: PhantomData<fn() -> B>,
    },
    /// The body was read whole when it was wrapped (every frame was ready
    /// at once, within the cap): every clone yields the same frames, with
    /// no lock and no state to share but the frames themselves.
    ///
    /// Behind an `Arc` (and the shared state behind a `Box`) to keep the
    /// body small: hyper moves a request a few dozen times on its way out,
    /// and every byte of the body is copied each time.
    Whole {
        whole: Arc<Whole>,
        /// The next frame this clone yields (at most [`READ_AT_ONCE`]).
        pos: u32,
        _body: PhantomData<fn() -> B>,
    },
    Shared(Box<Handle<B>>),
}

/// A body read whole, and the cap it was read under.
struct Whole {
    cap: usize,
    frames: WholeFrames,
    /// The original body promised its exact size when it was wrapped. Only
    /// then is the size hint exact: the copies report what the original
    /// would have, so the request is framed on the wire as it would be
    /// without this wrapper. (An exact hint makes hyper add a
    /// `content-length`; a gRPC message tonic encodes promises no size, and
    /// tonic's channel sends none: one header value allocated, encoded and
    /// checked per call for nothing. An HTTP/1.1 `Full` body keeps its
    /// `Content-Length`; a body that promised nothing is sent chunked, as
    /// hyper sends it unwrapped.)
    exact: bool,
}

/// The frames of a body read whole (shared through the `Arc<Whole>`).
enum WholeFrames {
    /// One data frame, the common case (a `Full` body, a unary gRPC
    /// message): no vector.
    One(Bytes),
    Many(Box<[Buffered]>),
}

impl WholeFrames {
    fn get(&self, pos: usize) -> Option<Frame<Bytes>> {
        match self {
            WholeFrames::One(data) => (pos == 0).then(|| Frame::data(data.clone())),
            WholeFrames::Many(frames) => frames.get(pos).map(|f| f.clone().into_frame()),
        }
    }

    fn len(&self) -> usize {
        match self {
            WholeFrames::One(_) => 1,
            WholeFrames::Many(frames) => frames.len(),
        }
    }

    /// Data bytes from frame `pos` on.
    fn data_from(&self, pos: usize) -> usize {
        match self {
            WholeFrames::One(data) if pos == 0 => data.len(),
            WholeFrames::One(_) => 0,
            WholeFrames::Many(frames) => frames
                .get(pos..)
                .unwrap_or_default()
                .iter()
                .map(Buffered::data_len)
                .sum(),
        }
    }
}

/// How many times [`ReplayBody::new`] polls a body for frames that are
/// ready at once before it goes on as a shared stream: enough for the
/// bodies that come whole (one or two frames), bounded for a stream that
/// keeps producing.
const READ_AT_ONCE: usize = 8;

/// One clone's view of the shared copy.
struct Handle<B> {
    shared: Arc<Shared<B>>,
    cursor: Cursor,
}

/// Where one clone is in the body. Apart from `shared` so that a poll can
/// move it while holding the shared state's lock.
struct Cursor {
    /// Tells this clone apart from the others, so that after the cap only the
    /// clone that was reading the original goes on.
    id: u64,
    /// The next buffered frame this clone yields.
    pos: usize,
    /// Data bytes this clone has yielded from `frames[..pos]`, for `size_hint`.
    read: usize,
    /// This clone has yielded an error; it yields nothing more.
    done: bool,
}

struct Shared<B> {
    cap: usize,
    // A std mutex: the state belongs to one request, is locked only for the
    // length of one poll (never across an await), and is contended only when
    // a hedge polls its body at the same moment as the original attempt.
    state: Mutex<State<B>>,
    waiters: Arc<Waiters>,
    /// Wakes every waiting clone. The original body is polled with this one
    /// rather than with the polling clone's waker: many bodies keep only the
    /// last waker they were given, and the clone that gave it may be dropped
    /// (a hedge that lost) or stop polling, leaving the others asleep.
    waker: Waker,
}

struct State<B> {
    /// The original body, until it ends or fails.
    body: Option<Pin<Box<B>>>,
    /// Every frame read from the original so far, unless capped.
    frames: Vec<Buffered>,
    /// Data bytes in `frames`.
    buffered: usize,
    /// The data outgrew the cap and `frames` was freed.
    capped: bool,
    /// After the cap, the only clone that may go on reading the original.
    streamer: Option<u64>,
    /// The original body ended without error.
    ended: bool,
    /// The original body failed with this error; its message is all that
    /// other clones get, since the error itself went to the clone that read it.
    failed: Option<String>,
    /// What was read from the original body as it was wrapped and no clone
    /// has taken yet: the body's next frames (and its end or error), taken
    /// before the body itself is polled again.
    ahead: VecDeque<Ahead>,
    next_id: u64,
}

impl<B: Body> State<B> {
    /// Whether the original body has nothing more to give: nothing read
    /// ahead is left but its end, and the body itself (if still held) says
    /// it is at its end.
    fn source_at_end(&self) -> bool {
        match self.ahead.front() {
            Some(Ahead::End) => true,
            Some(Ahead::Frame(_) | Ahead::Error(_)) => false,
            None => self.body.as_ref().is_none_or(|body| body.is_end_stream()),
        }
    }
}

/// A frame, the end or an error read from the original body ahead of any
/// clone (see `State::ahead`).
enum Ahead {
    Frame(Buffered),
    End,
    Error(BoxError),
}

/// What polling a [`ReplayBody`] for a frame gives.
type PolledFrame = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

/// A frame as kept: `Frame` is not `Clone`.
#[derive(Clone)]
enum Buffered {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Buffered {
    fn from_frame<D: Buf>(frame: Frame<D>) -> Option<Self> {
        match frame.into_data() {
            Ok(mut data) => Some(Buffered::Data(data.copy_to_bytes(data.remaining()))),
            Err(frame) => frame.into_trailers().ok().map(Buffered::Trailers),
        }
    }

    /// Only data counts towards the cap: trailers are bounded by the
    /// transport's header limits anyway.
    fn data_len(&self) -> usize {
        match self {
            Buffered::Data(data) => data.len(),
            Buffered::Trailers(_) => 0,
        }
    }

    fn into_frame(self) -> Frame<Bytes> {
        match self {
            Buffered::Data(data) => Frame::data(data),
            Buffered::Trailers(trailers) => Frame::trailers(trailers),
        }
    }
}

/// The wakers of clones waiting for the original body.
#[derive(Default)]
struct Waiters {
    wakers: Mutex<Vec<Waker>>,
}

impl Waiters {
    fn register(&self, waker: &Waker) {
        let mut wakers = lock(&self.wakers);
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Wakes every waiter but `except`: the clone that just got a frame is
    /// awake already, and waking it again would poll its task for nothing on
    /// every frame of an upload.
    fn wake_all(&self, except: Option<&Waker>) {
        let mut waiting = lock(&self.wakers);
        // Nearly always the only clone waiting is the one that just got the
        // frame (a body with no retry or hedge reading it yet): forget it in
        // place, keeping the list's room for the next frame. Dropping its
        // waker here is safe: it is the running task's, which holds another.
        if waiting
            .iter()
            .all(|waker| except.is_some_and(|e| waker.will_wake(e)))
        {
            waiting.clear();
            return;
        }
        // Woken outside the lock, so a waker that runs code synchronously
        // cannot come back here and deadlock.
        let wakers = std::mem::take(&mut *waiting);
        drop(waiting);
        for waker in wakers {
            if !except.is_some_and(|e| waker.will_wake(e)) {
                waker.wake();
            }
        }
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_all(None);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all(None);
    }
}

/// A poisoned lock only means a body panicked mid-poll; the state it guards
/// is still a valid state, so go on rather than spread the panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a clone yields when another clone read the original body's error.
#[derive(Debug)]
struct BodyFailed(String);

impl fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body failed: {}", self.0)
    }
}

impl StdError for BodyFailed {}

impl<B> ReplayBody<B> {
    /// Wraps `body`, keeping up to `cap` bytes of its data for copies
    /// ([`DEFAULT_REPLAY_CAP`] is the crate's default).
    ///
    /// Frames the body has ready at once (all of a `Full` body, a unary
    /// gRPC message tonic has just encoded) are read now: a body read whole
    /// within the cap is kept as plain frames that every copy shares, with
    /// no lock. Anything else read now (a body that stopped being ready,
    /// outgrew the cap or failed) stays the body's first frames for
    /// whichever copy reads first, so the cap and errors work as if it had
    /// been read then. (It is polled with a waker that does nothing; a
    /// body that is not ready then is polled again, with the sender's
    /// waker, when the request is sent.)
    pub fn new(body: B, cap: usize) -> Self
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        if body.is_end_stream() {
            return Self::empty(cap);
        }
        // Read before any frame is: what the caller's body promised.
        let exact = body.size_hint().exact().is_some();
        let mut body = Box::pin(body);
        let mut cx = Context::from_waker(Waker::noop());
        // The first frame apart, so that a body of one frame (the common
        // case) needs no vector.
        let mut first: Option<Buffered> = None;
        let mut rest: Vec<Buffered> = Vec::new();
        // How the reading stopped, when the body had no more to give.
        let mut last: Option<Ahead> = None;
        let mut buffered = 0usize;
        for _ in 0..READ_AT_ONCE {
            let frame = match body.as_mut().poll_frame(&mut cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    last = Some(Ahead::End);
                    break;
                }
                Poll::Ready(Some(Err(error))) => {
                    last = Some(Ahead::Error(error.into()));
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            // A frame kind this crate does not know cannot be kept: skipped,
            // as a shared stream skips it.
            let Some(frame) = Buffered::from_frame(frame) else {
                continue;
            };
            buffered = buffered.saturating_add(frame.data_len());
            match first {
                None => first = Some(frame),
                Some(_) => rest.push(frame),
            }
            if buffered > cap {
                break;
            }
            if body.is_end_stream() {
                last = Some(Ahead::End);
                break;
            }
        }
        if matches!(last, Some(Ahead::End)) && buffered <= cap {
            let whole = match (first, rest.is_empty()) {
                (None, _) => return Self::empty(cap),
                (Some(Buffered::Data(data)), true) => WholeFrames::One(data),
                (Some(first), _) => {
                    rest.insert(0, first);
                    WholeFrames::Many(rest.into_boxed_slice())
                }
            };
            return ReplayBody {
                kind: Kind::Whole {
                    whole: Arc::new(Whole {
                        cap,
                        frames: whole,
                        exact,
                    }),
                    pos: 0,
                    _body: PhantomData,
                },
            };
        }
        let source_done = last.is_some();
        let ahead: VecDeque<Ahead> = first
            .into_iter()
            .chain(rest)
            .map(Ahead::Frame)
            .chain(last)
            .collect();
        // Not whole within the cap (it stopped being ready, outgrew the cap
        // or failed): a shared stream, for which what was read is the
        // original body's first frames. The first clone to need them takes
        // them as it would from the body, cap and errors included, so a
        // copy made before any attempt sent the body (a retry after a
        // connection that was never made) still sends all of it.
        let waiters = Arc::new(Waiters::default());
        let shared = Shared {
            cap,
            state: Mutex::new(State {
                body: (!source_done).then_some(body),
                ahead,
                frames: Vec::new(),
                buffered: 0,
                capped: false,
                streamer: None,
                ended: false,
                failed: None,
                next_id: 1,
            }),
            waker: Waker::from(Arc::clone(&waiters)),
            waiters,
        };
        ReplayBody {
            kind: Kind::Shared(Box::new(Handle {
                shared: Arc::new(shared),
                cursor: Cursor::start(0),
            })),
        }
    }

    /// A body with nothing in it.
    fn empty(cap: usize) -> Self {
        ReplayBody {
            kind: Kind::Empty {
                cap,
                _body: PhantomData,
            },
        }
    }

    /// The replay buffer's size in bytes.
    pub fn cap(&self) -> usize {
        match &self.kind {
            Kind::Empty { cap, .. } => *cap,
            Kind::Whole { whole, .. } => whole.cap,
            Kind::Shared(handle) => handle.shared.cap,
        }
    }

    /// True once the body outgrew the replay buffer: only the attempt that
    /// was reading it then can send it whole, and no copy can be made.
    pub fn is_capped(&self) -> bool {
        match &self.kind {
            Kind::Empty { .. } | Kind::Whole { .. } => false,
            Kind::Shared(handle) => lock(&handle.shared.state).capped,
        }
    }

    /// True when the original body has ended without error and all of it is
    /// kept, so a copy is a full, independent copy (always true for an empty
    /// body).
    pub fn is_complete(&self) -> bool {
        match &self.kind {
            Kind::Empty { .. } | Kind::Whole { .. } => true,
            Kind::Shared(handle) => {
                let state = lock(&handle.shared.state);
                state.ended && !state.capped
            }
        }
    }

    /// A copy that sends the body again from its start.
    ///
    /// It succeeds while the body is still being read: a copy made for a
    /// retry replays what the previous attempt sent and then goes on reading
    /// the original body where that attempt stopped. It fails once the body
    /// has outgrown the replay buffer.
    ///
    /// A copy of a body whose original failed replays what was kept and then
    /// ends with the same error.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower_lb::request::NotReplayable;
    /// use tower_lb::retry::ReplayBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_lb::BoxError> {
    /// let mut upload = ReplayBody::new(Full::new(Bytes::from(vec![0u8; 100])), 10);
    /// assert_eq!((&mut upload).collect().await?.to_bytes().len(), 100);
    /// assert!(upload.is_capped());
    /// assert_eq!(upload.try_clone().err(), Some(NotReplayable::BodyOverCap { cap: 10 }));
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_clone(&self) -> Result<Self, NotReplayable> {
        self.copy(false)
    }

    /// A copy, only if it can be sent whole without reading any more of the
    /// original body: the body was empty, or has been read to its end and
    /// kept whole.
    ///
    /// Hedges use this: a hedge races the attempt that is still sending the
    /// body, and a copy that had to wait for that attempt to read the rest
    /// would gain nothing, or fail if the body then outgrew the buffer.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::channel::Channel;
    /// use http_body_util::{BodyExt, Full};
    /// use tower_lb::request::NotReplayable;
    /// use tower_lb::retry::{ReplayBody, DEFAULT_REPLAY_CAP};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_lb::BoxError> {
    /// // A body ready whole (a `Full`) is complete as soon as it is wrapped.
    /// let small = ReplayBody::new(Full::new(Bytes::from("abc")), DEFAULT_REPLAY_CAP);
    /// assert!(small.try_clone_complete().is_ok());
    ///
    /// // A body that streams in is complete once read to its end.
    /// let (mut tx, upload) = Channel::<Bytes>::new(1);
    /// let mut body = ReplayBody::new(upload, DEFAULT_REPLAY_CAP);
    /// assert_eq!(body.try_clone_complete().err(), Some(NotReplayable::BodyIncomplete));
    /// tx.send_data(Bytes::from("abc")).await?;
    /// drop(tx);
    /// (&mut body).collect().await?;
    /// let hedge = body.try_clone_complete()?;
    /// assert_eq!(hedge.collect().await?.to_bytes(), "abc");
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_clone_complete(&self) -> Result<Self, NotReplayable> {
        self.copy(true)
    }

    /// A clone, unless the body outgrew the buffer or (if `complete`) has
    /// not been read to its end.
    fn copy(&self, complete: bool) -> Result<Self, NotReplayable> {
        match &self.kind {
            Kind::Empty { .. } | Kind::Whole { .. } => Ok(self.clone()),
            Kind::Shared(handle) => {
                let mut state = lock(&handle.shared.state);
                if state.capped {
                    return Err(NotReplayable::BodyOverCap {
                        cap: handle.shared.cap,
                    });
                }
                if complete && !state.ended {
                    return Err(NotReplayable::BodyIncomplete);
                }
                Ok(handle.fork(&mut state))
            }
        }
    }
}

impl<B> Handle<B> {
    /// A new clone, at the start of the body.
    fn fork(&self, state: &mut State<B>) -> ReplayBody<B> {
        let id = state.next_id;
        state.next_id += 1;
        ReplayBody {
            kind: Kind::Shared(Box::new(Handle {
                shared: Arc::clone(&self.shared),
                cursor: Cursor::start(id),
            })),
        }
    }
}

impl<B> Handle<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> PolledFrame {
        if self.cursor.done {
            return Poll::Ready(None);
        }
        let mut state = lock(&self.shared.state);
        let (poll, wake_others) = self.cursor.poll(&self.shared, &mut state, cx);
        drop(state);
        if wake_others {
            self.shared.waiters.wake_all(Some(cx.waker()));
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        if self.cursor.done {
            return true;
        }
        let state = lock(&self.shared.state);
        if state.capped {
            if state.streamer != Some(self.cursor.id) {
                // An error is still to come.
                return false;
            }
        } else if self.cursor.pos < state.frames.len() {
            return false;
        }
        if state.failed.is_some() {
            return false;
        }
        state.source_at_end()
    }

    fn size_hint(&self) -> SizeHint {
        if self.cursor.done {
            return SizeHint::with_exact(0);
        }
        let state = lock(&self.shared.state);
        if state.failed.is_some() || (state.capped && state.streamer != Some(self.cursor.id)) {
            // It will end in an error: promise nothing.
            return SizeHint::new();
        }
        if state
            .ahead
            .iter()
            .any(|item| matches!(item, Ahead::Error(_)))
        {
            // It will end in an error: promise nothing.
            return SizeHint::new();
        }
        let kept = if state.capped {
            0
        } else {
            state.buffered.saturating_sub(self.cursor.read)
        };
        let ahead: usize = state
            .ahead
            .iter()
            .map(|item| match item {
                Ahead::Frame(frame) => frame.data_len(),
                Ahead::End | Ahead::Error(_) => 0,
            })
            .sum();
        let kept = kept.saturating_add(ahead);
        let rest = match &state.body {
            Some(body) => body.size_hint(),
            None => SizeHint::with_exact(0),
        };
        let kept = u64::try_from(kept).unwrap_or(u64::MAX);
        // Upper before lower, each within the other: `SizeHint`'s setters
        // panic if the bounds cross.
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper().and_then(|upper| upper.checked_add(kept)) {
            hint.set_upper(upper);
        }
        hint.set_lower(
            rest.lower()
                .saturating_add(kept)
                .min(hint.upper().unwrap_or(u64::MAX)),
        );
        hint
    }
}

impl Cursor {
    fn start(id: u64) -> Self {
        Cursor {
            id,
            pos: 0,
            read: 0,
            done: false,
        }
    }

    /// The poll, and whether the other clones must be told that the original
    /// body moved on (a frame, its end, or its error).
    fn poll<B>(
        &mut self,
        shared: &Shared<B>,
        state: &mut State<B>,
        cx: &mut Context<'_>,
    ) -> (PolledFrame, bool)
    where
        B: Body,
        B::Data: Buf,
        B::Error: Into<BoxError>,
    {
        loop {
            if state.capped {
                if state.streamer != Some(self.id) {
                    self.done = true;
                    let err = NotReplayable::BodyOverCap { cap: shared.cap };
                    return (Poll::Ready(Some(Err(Box::new(err)))), false);
                }
            } else if let Some(frame) = state.frames.get(self.pos) {
                self.pos += 1;
                self.read += frame.data_len();
                return (Poll::Ready(Some(Ok(frame.clone().into_frame()))), false);
            }

            // This clone has had everything read so far: the next frame, if
            // any, must come from the original body.
            if let Some(message) = &state.failed {
                self.done = true;
                let err = BodyFailed(message.clone());
                return (Poll::Ready(Some(Err(Box::new(err)))), false);
            }
            let next = match state.ahead.pop_front() {
                // Read as the body was wrapped: taken as if polled now.
                Some(Ahead::Frame(frame)) => Some(Ok(frame)),
                Some(Ahead::End) => None,
                Some(Ahead::Error(err)) => Some(Err(err)),
                None => {
                    let Some(body) = state.body.as_mut() else {
                        return (Poll::Ready(None), false);
                    };
                    // Registered before the poll: if the body woke the shared
                    // waker between returning `Pending` and a registration
                    // after it, this clone would sleep through the frame.
                    shared.waiters.register(cx.waker());
                    let mut shared_cx = Context::from_waker(&shared.waker);
                    match body.as_mut().poll_frame(&mut shared_cx) {
                        Poll::Pending => return (Poll::Pending, false),
                        Poll::Ready(None) => None,
                        Poll::Ready(Some(Err(err))) => Some(Err(err.into())),
                        // A frame kind this crate does not know cannot be
                        // kept or converted; skip it rather than fail.
                        Poll::Ready(Some(Ok(frame))) => match Buffered::from_frame(frame) {
                            Some(frame) => Some(Ok(frame)),
                            None => continue,
                        },
                    }
                }
            };
            let frame = match next {
                None => {
                    state.ended = true;
                    state.body = None;
                    return (Poll::Ready(None), true);
                }
                Some(Err(err)) => {
                    // The whole chain: the clones get only this text.
                    state.failed = Some(crate::error::report(&*err).to_string());
                    state.body = None;
                    self.done = true;
                    return (Poll::Ready(Some(Err(err))), true);
                }
                Some(Ok(frame)) => frame,
            };
            // Callers such as hyper stop polling once `is_end_stream` is true,
            // so the end must be noted now or the body would never count as
            // complete.
            if state.source_at_end() {
                state.ended = true;
                state.body = None;
                state.ahead.clear();
            }
            if !state.capped {
                let len = frame.data_len();
                if state.buffered.saturating_add(len) > shared.cap {
                    tracing::debug!(
                        cap = shared.cap,
                        "request body outgrew the replay buffer; it will not be replayed"
                    );
                    state.capped = true;
                    state.streamer = Some(self.id);
                    state.frames = Vec::new();
                    state.buffered = 0;
                } else {
                    state.frames.push(frame.clone());
                    state.buffered += len;
                    self.pos += 1;
                    self.read += len;
                }
            }
            return (Poll::Ready(Some(Ok(frame.into_frame()))), true);
        }
    }
}

impl<B> Clone for ReplayBody<B> {
    /// A copy that sends the body from its start. Unlike
    /// [`try_clone`](ReplayBody::try_clone) it cannot fail: a copy of a body
    /// that outgrew the buffer yields an error when read.
    fn clone(&self) -> Self {
        match &self.kind {
            Kind::Empty { cap, .. } => Self::empty(*cap),
            Kind::Whole { whole, .. } => ReplayBody {
                kind: Kind::Whole {
                    whole: Arc::clone(whole),
                    pos: 0,
                    _body: PhantomData,
                },
            },
            Kind::Shared(handle) => handle.fork(&mut lock(&handle.shared.state)),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Data: Buf,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Empty { .. } => Poll::Ready(None),
            Kind::Whole { whole, pos, .. } => {
                let frame = whole.frames.get(*pos as usize);
                *pos += u32::from(frame.is_some());
                Poll::Ready(frame.map(Ok))
            }
            Kind::Shared(handle) => handle.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty { .. } => true,
            Kind::Whole { whole, pos, .. } => *pos as usize >= whole.frames.len(),
            Kind::Shared(handle) => handle.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty { .. } => SizeHint::with_exact(0),
            Kind::Whole { whole, pos, .. } => {
                let left = u64::try_from(whole.frames.data_from(*pos as usize)).unwrap_or(u64::MAX);
                if whole.exact {
                    SizeHint::with_exact(left)
                } else {
                    // At least what is left: no more is promised than the
                    // original body promised (see `Whole::exact`).
                    let mut hint = SizeHint::new();
                    hint.set_lower(left);
                    hint
                }
            }
            Kind::Shared(handle) => handle.size_hint(),
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("ReplayBody");
        out.field("cap", &self.cap());
        let handle = match &self.kind {
            Kind::Empty { .. } => return out.field("empty", &true).finish(),
            Kind::Whole { whole, pos, .. } => {
                return out
                    .field("whole_frames", &whole.frames.len())
                    .field("position", pos)
                    .finish()
            }
            Kind::Shared(handle) => handle,
        };
        // `try_lock`: printing must not block on, or deadlock with, a poll.
        let state = match handle.shared.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return out.finish_non_exhaustive(),
        };
        out.field("buffered_bytes", &state.buffered)
            .field("buffered_frames", &state.frames.len())
            .field("position", &handle.cursor.pos)
            .field("capped", &state.capped)
            .field("ended", &state.ended)
            .field("failed", &state.failed)
            .finish()
    }
}

/// A copy of `req` for another attempt: method, URI, version, headers and
/// extensions, with `body` as its body.
fn rebuild<B>(
    req: &http::Request<ReplayBody<B>>,
    body: ReplayBody<B>,
) -> http::Request<ReplayBody<B>> {
    let mut copy = rebuild_head(req, body);
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// [`rebuild`] without the extensions.
fn rebuild_head<B>(
    req: &http::Request<ReplayBody<B>>,
    body: ReplayBody<B>,
) -> http::Request<ReplayBody<B>> {
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

impl<B> Replayable for http::Request<ReplayBody<B>> {
    /// By the request's method and headers, or an explicit [`Safety`] in its
    /// extensions: see [`Safety::of_http`].
    fn safety(&self) -> Safety {
        Safety::of_http(self)
    }

    /// A copy with its body from [`ReplayBody::try_clone`]: it fails only once
    /// the body outgrew the replay buffer.
    fn replay(&self) -> Result<Self, NotReplayable> {
        let body = self.body().try_clone()?;
        Ok(rebuild(self, body))
    }

    /// A copy without the extensions when they hold nothing but the call's
    /// context, which the retry layer keeps and puts back into each retry:
    /// a call that is not retried then copies no map of extensions.
    fn replay_kept(&self) -> Result<Self, NotReplayable> {
        let body = self.body().try_clone()?;
        let context_only = self.extensions().len() == 1 && self.call_context().is_some();
        Ok(match context_only {
            true => rebuild_head(self, body),
            false => rebuild(self, body),
        })
    }

    /// A copy only when its body is complete already (see
    /// [`ReplayBody::try_clone_complete`]): what a hedge sends while the
    /// first attempt may still be sending the body.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Empty;
    /// use tower_lb::request::Replayable;
    /// use tower_lb::retry::{ReplayBody, DEFAULT_REPLAY_CAP};
    ///
    /// let req = http::Request::get("http://orders/7")
    ///     .body(ReplayBody::new(Empty::<Bytes>::new(), DEFAULT_REPLAY_CAP))?;
    /// let hedge = req.replay_complete()?;
    /// assert_eq!(hedge.uri(), "http://orders/7");
    /// # Ok::<_, tower_lb::BoxError>(())
    /// ```
    fn replay_complete(&self) -> Result<Self, NotReplayable> {
        let body = self.body().try_clone_complete()?;
        Ok(rebuild(self, body))
    }
}

/// Wraps each request's body in a [`ReplayBody`], which is what makes an
/// `http::Request` [`Replayable`] for the retry and hedge layers: put it
/// between them and the service that sends the request.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, Layer, ServiceExt};
/// use tower_lb::request::Replayable;
/// use tower_lb::retry::{ReplayBody, ReplayLayer};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::BoxError> {
/// let send = service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
///     let again = req.replay()?;
///     let first = req.into_body().collect().await?.to_bytes();
///     let second = again.into_body().collect().await?.to_bytes();
///     Ok::<_, tower_lb::BoxError>(first == second)
/// });
/// let svc = ReplayLayer::default().layer(send);
///
/// let req = http::Request::post("/orders").body(Full::new(Bytes::from("{}")))?;
/// assert!(svc.oneshot(req).await?);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLayer {
    cap: usize,
}

impl ReplayLayer {
    /// Keeps up to `cap` bytes of each request body for replays; a larger body
    /// is sent once and not replayed.
    pub fn new(cap: usize) -> Self {
        ReplayLayer { cap }
    }

    /// The replay buffer's size in bytes.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

impl Default for ReplayLayer {
    /// A [`DEFAULT_REPLAY_CAP`] (64 KiB) buffer.
    fn default() -> Self {
        ReplayLayer::new(DEFAULT_REPLAY_CAP)
    }
}

impl<S> Layer<S> for ReplayLayer {
    type Service = ReplayService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplayService::new(inner, self.cap)
    }
}

/// The service of [`ReplayLayer`]: passes each `http::Request<B>` on as an
/// `http::Request<ReplayBody<B>>`, leaving responses and errors as they are.
#[derive(Debug, Clone)]
pub struct ReplayService<S> {
    inner: S,
    cap: usize,
}

impl<S> ReplayService<S> {
    /// Wraps `inner`, keeping up to `cap` bytes of each request body.
    pub fn new(inner: S, cap: usize) -> Self {
        ReplayService { inner, cap }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<http::Request<B>> for ReplayService<S>
where
    S: Service<http::Request<ReplayBody<B>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        self.inner.call(http::Request::from_parts(
            parts,
            ReplayBody::new(body, self.cap),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http::HeaderValue;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::sync::mpsc;

    use super::*;

    type Sent = Result<Frame<Bytes>, BoxError>;

    /// A body whose frames arrive when the test sends them; it ends when the
    /// sender is dropped.
    struct ChannelBody {
        rx: mpsc::Receiver<Sent>,
    }

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PolledFrame {
            self.get_mut().rx.poll_recv(cx)
        }
    }

    fn channel(cap: usize) -> (mpsc::Sender<Sent>, ReplayBody<ChannelBody>) {
        let (tx, rx) = mpsc::channel(16);
        (tx, ReplayBody::new(ChannelBody { rx }, cap))
    }

    async fn send(tx: &mpsc::Sender<Sent>, frame: Sent) {
        tx.send(frame)
            .await
            .unwrap_or_else(|_| panic!("body dropped"));
    }

    fn data(s: &'static str) -> Sent {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    fn trailers() -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", HeaderValue::from_static("0"));
        map
    }

    fn full(s: &'static str) -> ReplayBody<Full<Bytes>> {
        ReplayBody::new(
            Full::new(Bytes::from_static(s.as_bytes())),
            DEFAULT_REPLAY_CAP,
        )
    }

    /// Reads `body` to its end: the data and trailers, or the first error.
    async fn read_all<B>(body: &mut ReplayBody<B>) -> Result<(Bytes, Option<HeaderMap>), BoxError>
    where
        B: Body,
        B::Data: Buf,
        B::Error: Into<BoxError>,
    {
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes(), trailers))
    }

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_with(body: &mut ReplayBody<ChannelBody>, waker: &Waker) -> Poll<Option<Sent>> {
        Pin::new(body).poll_frame(&mut Context::from_waker(waker))
    }

    fn woken(counter: &CountingWaker) -> usize {
        counter.0.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_clone_made_after_reading_replays_the_same_bytes_and_trailers() {
        let (tx, mut body) = channel(DEFAULT_REPLAY_CAP);
        send(&tx, data("hello ")).await;
        send(&tx, data("world")).await;
        send(&tx, Ok(Frame::trailers(trailers()))).await;
        drop(tx);

        let first = read_all(&mut body).await.unwrap();
        assert_eq!(first.0, "hello world");
        assert_eq!(first.1, Some(trailers()));

        let mut copy = body.try_clone().unwrap();
        assert_eq!(read_all(&mut copy).await.unwrap(), first);
    }

    #[tokio::test]
    async fn a_clone_made_before_reading_gets_the_same_bytes_after_the_original_ends() {
        let mut body = full("abc");
        let mut copy = body.try_clone().unwrap();
        assert_eq!(read_all(&mut body).await.unwrap().0, "abc");
        assert_eq!(read_all(&mut copy).await.unwrap().0, "abc");
    }

    #[tokio::test]
    async fn a_retry_replays_what_the_failed_attempt_sent_then_reads_the_rest() {
        let (tx, held) = channel(DEFAULT_REPLAY_CAP);
        let mut first = held.try_clone().unwrap();
        send(&tx, data("ab")).await;
        let frame = first.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        drop(first); // the attempt failed mid-body

        let mut retry = held.try_clone().unwrap();
        send(&tx, data("cd")).await;
        drop(tx);
        assert_eq!(read_all(&mut retry).await.unwrap().0, "abcd");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_clones_read_concurrently_both_get_the_whole_body() {
        let (tx, body) = channel(DEFAULT_REPLAY_CAP);
        let hedge = body.try_clone().unwrap();
        let readers = [body, hedge].map(|mut body| {
            tokio::spawn(async move { read_all(&mut body).await.map(|(bytes, _)| bytes) })
        });
        for chunk in ["one ", "two ", "three ", "four"] {
            send(&tx, data(chunk)).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tx);
        for reader in readers {
            let got = tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("a clone hung")
                .unwrap()
                .unwrap();
            assert_eq!(got, "one two three four");
        }
    }

    #[test]
    fn interleaved_clones_take_turns_reading_the_original_and_the_buffer() {
        let (tx, rx) = mpsc::channel::<Sent>(4);
        let mut a = ReplayBody::new(ChannelBody { rx }, DEFAULT_REPLAY_CAP);
        let mut b = a.clone();
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let take = |body: &mut ReplayBody<ChannelBody>| match poll_with(body, &waker) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap(),
            other => panic!("expected a data frame, got {other:?}"),
        };

        tx.try_send(data("1")).unwrap();
        assert_eq!(take(&mut a), "1"); // a reads the original
        tx.try_send(data("2")).unwrap();
        assert_eq!(take(&mut b), "1"); // b reads the buffer
        assert_eq!(take(&mut b), "2"); // b reads the original
        assert_eq!(take(&mut a), "2"); // a reads the buffer
        drop(tx);
        assert!(matches!(poll_with(&mut a, &waker), Poll::Ready(None)));
        assert!(matches!(poll_with(&mut b, &waker), Poll::Ready(None)));
    }

    #[test]
    fn a_waiting_clone_is_woken_even_if_the_clone_that_polled_last_is_dropped() {
        let (tx, rx) = mpsc::channel::<Sent>(4);
        let mut original = ReplayBody::new(ChannelBody { rx }, DEFAULT_REPLAY_CAP);
        let mut hedge = original.clone();
        let original_wakes = Arc::new(CountingWaker::default());
        let original_waker = Waker::from(Arc::clone(&original_wakes));
        let hedge_waker = Waker::from(Arc::new(CountingWaker::default()));

        assert!(poll_with(&mut original, &original_waker).is_pending());
        assert!(poll_with(&mut hedge, &hedge_waker).is_pending());
        drop(hedge); // the hedge lost its race

        tx.try_send(data("x")).unwrap();
        assert_eq!(woken(&original_wakes), 1);
        match poll_with(&mut original, &original_waker) {
            Poll::Ready(Some(Ok(frame))) => assert_eq!(frame.into_data().unwrap(), "x"),
            other => panic!("expected the frame, got {other:?}"),
        }
    }

    /// A body that never wakes anyone: it only has a frame when the test
    /// pushed one before the poll.
    struct SilentBody(Arc<Mutex<Vec<Bytes>>>);

    impl Body for SilentBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> PolledFrame {
            match lock(&self.0).pop() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Pending,
            }
        }
    }

    #[test]
    fn a_frame_read_by_one_clone_wakes_the_clones_waiting_for_it_but_not_the_reader() {
        let queue = Arc::new(Mutex::new(Vec::new()));
        let mut a = ReplayBody::new(SilentBody(Arc::clone(&queue)), DEFAULT_REPLAY_CAP);
        let mut b = a.clone();
        let a_wakes = Arc::new(CountingWaker::default());
        let a_waker = Waker::from(Arc::clone(&a_wakes));
        let b_wakes = Arc::new(CountingWaker::default());
        let b_waker = Waker::from(Arc::clone(&b_wakes));
        let poll = |body: &mut ReplayBody<SilentBody>, waker: &Waker| {
            Pin::new(body).poll_frame(&mut Context::from_waker(waker))
        };

        assert!(poll(&mut a, &a_waker).is_pending());
        lock(&queue).push(Bytes::from_static(b"x"));
        assert!(poll(&mut b, &b_waker).is_ready());
        assert_eq!(woken(&a_wakes), 1, "the waiting clone must not hang");
        assert_eq!(woken(&b_wakes), 0, "the reader is awake already");
        assert!(matches!(poll(&mut a, &a_waker), Poll::Ready(Some(Ok(_)))));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_still_reaches_the_first_reader_whole() {
        let (tx, mut body) = channel(10);
        let early = body.try_clone().unwrap();
        for chunk in ["0123", "4567", "89ab", "cdef"] {
            send(&tx, data(chunk)).await;
        }
        send(&tx, Ok(Frame::trailers(trailers()))).await;
        drop(tx);

        let (bytes, got_trailers) = read_all(&mut body).await.unwrap();
        assert_eq!(bytes, "0123456789abcdef");
        assert_eq!(got_trailers, Some(trailers()));
        assert!(body.is_capped());
        assert!(!body.is_complete());
        assert_eq!(
            body.try_clone().err(),
            Some(NotReplayable::BodyOverCap { cap: 10 })
        );
        drop(early);
    }

    #[tokio::test]
    async fn a_clone_that_needs_data_lost_to_the_cap_yields_an_error() {
        let mut body = ReplayBody::new(Full::new(Bytes::from(vec![7u8; 100])), 10);
        let mut early = body.clone();
        assert_eq!(read_all(&mut body).await.unwrap().0.len(), 100);

        let err = read_all(&mut early).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("exceeded the 10-byte replay buffer"),
            "{err}"
        );
        assert!(early.is_end_stream(), "a clone that failed yields no more");
        assert!(early.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_hedge_at_the_same_place_when_the_cap_is_hit_gets_an_error_not_a_hole() {
        let (tx, mut original) = channel(4);
        let mut hedge = original.clone();
        send(&tx, data("ab")).await;
        assert_eq!(
            original
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "ab"
        );
        assert_eq!(
            hedge.frame().await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );

        send(&tx, data("cdef")).await; // 6 bytes > 4: the original streams on alone
        drop(tx);
        assert_eq!(
            original
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "cdef"
        );
        assert!(hedge.frame().await.unwrap().is_err());
        assert!(original.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_error_from_the_original_reaches_every_clone() {
        let (tx, mut body) = channel(DEFAULT_REPLAY_CAP);
        let mut early = body.clone();
        send(&tx, data("a")).await;
        send(&tx, Err("connection reset".into())).await;
        drop(tx);

        let err = read_all(&mut body).await.unwrap_err();
        assert_eq!(err.to_string(), "connection reset");

        let err = read_all(&mut early).await.unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");
        let mut late = body.try_clone().unwrap();
        assert!(read_all(&mut late).await.is_err());
        assert!(!body.is_complete());
    }

    #[tokio::test]
    async fn an_empty_body_allocates_no_shared_state_and_is_at_its_end() {
        let body = ReplayBody::new(Empty::<Bytes>::new(), DEFAULT_REPLAY_CAP);
        assert!(matches!(body.kind, Kind::Empty { .. }));
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.is_complete());

        let copy = body.try_clone_complete().unwrap();
        assert!(matches!(copy.kind, Kind::Empty { .. }));
        assert!(copy.collect().await.unwrap().to_bytes().is_empty());

        let empty_full = ReplayBody::new(Full::new(Bytes::new()), 1);
        assert!(matches!(empty_full.kind, Kind::Empty { .. }));
    }

    #[tokio::test]
    async fn try_clone_complete_refuses_an_unfinished_body_and_accepts_a_finished_one() {
        let (tx, mut body) = channel(DEFAULT_REPLAY_CAP);
        assert_eq!(
            body.try_clone_complete().err(),
            Some(NotReplayable::BodyIncomplete)
        );
        send(&tx, data("abc")).await;
        drop(tx);
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert!(body.is_complete());
        let hedge = body.try_clone_complete().unwrap();
        assert_eq!(hedge.collect().await.unwrap().to_bytes(), "abc");
    }

    #[test]
    fn a_replay_body_is_two_words_whatever_it_wraps() {
        // hyper moves a request a few dozen times on its way out: each
        // byte here is copied that often.
        assert_eq!(std::mem::size_of::<ReplayBody<Empty<Bytes>>>(), 16);
        assert_eq!(std::mem::size_of::<ReplayBody<Full<Bytes>>>(), 16);
    }

    #[tokio::test]
    async fn a_body_ready_whole_is_complete_at_once_and_shares_no_state() {
        let body = full("abc");
        assert!(
            matches!(&body.kind, Kind::Whole { whole, .. } if matches!(whole.frames, WholeFrames::One(_)))
        );
        assert!(body.is_complete());
        assert_eq!(body.size_hint().exact(), Some(3));
        let hedge = body.try_clone_complete().unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(hedge.collect().await.unwrap().to_bytes(), "abc");
    }

    /// A body of the frames given, all ready at once.
    struct ReadyFrames(std::collections::VecDeque<Sent>);

    impl Body for ReadyFrames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> PolledFrame {
            Poll::Ready(self.get_mut().0.pop_front())
        }
    }

    fn ready(frames: Vec<Sent>) -> ReadyFrames {
        ReadyFrames(frames.into())
    }

    #[tokio::test]
    async fn a_body_ready_whole_keeps_its_frames_and_trailers_for_every_copy() {
        let mut body = ReplayBody::new(
            ready(vec![data("a"), data("bc"), Ok(Frame::trailers(trailers()))]),
            DEFAULT_REPLAY_CAP,
        );
        assert!(
            matches!(&body.kind, Kind::Whole { whole, .. } if matches!(whole.frames, WholeFrames::Many(_)))
        );
        // `ReadyFrames` promises no size, so neither does the replay body
        // (hyper would add a `content-length` the caller's body never
        // asked for), though it knows its size now.
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 3);
        let mut copy = body.try_clone().unwrap();
        assert_eq!(copy.size_hint().exact(), None);
        assert_eq!(
            read_all(&mut body).await.unwrap(),
            (Bytes::from("abc"), Some(trailers()))
        );
        assert_eq!(
            read_all(&mut copy).await.unwrap(),
            (Bytes::from("abc"), Some(trailers()))
        );
    }

    #[tokio::test]
    async fn a_body_ready_at_once_but_over_the_cap_is_copied_until_an_attempt_reads_past_it() {
        let frames = || vec![data("abcd"), data("efgh"), data("ij")];
        // A copy made before any attempt sent it (a retry after a
        // connection that was never made) sends it whole.
        let unsent = ReplayBody::new(ready(frames()), 6);
        assert!(!unsent.is_capped());
        let mut retry = unsent.try_clone().unwrap();
        drop(unsent);
        assert_eq!(read_all(&mut retry).await.unwrap().0, "abcdefghij");
        // Within the cap copies can be made; once an attempt has read past
        // it, none can.
        let mut sent = ReplayBody::new(ready(frames()), 6);
        assert_eq!(
            sent.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abcd"
        );
        assert!(!sent.is_capped());
        assert!(sent.try_clone().is_ok());
        assert_eq!(
            sent.frame().await.unwrap().unwrap().into_data().unwrap(),
            "efgh"
        );
        assert!(sent.is_capped());
        assert_eq!(read_all(&mut sent).await.unwrap().0, "ij");
        assert_eq!(
            sent.try_clone().err(),
            Some(NotReplayable::BodyOverCap { cap: 6 })
        );
    }

    #[tokio::test]
    async fn a_body_that_fails_as_it_is_wrapped_hands_its_own_error_to_the_first_reader() {
        #[derive(Debug)]
        struct Broken;
        impl fmt::Display for Broken {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("broken upload")
            }
        }
        impl StdError for Broken {}

        let mut body = ReplayBody::new(
            ready(vec![data("ab"), Err(Box::new(Broken))]),
            DEFAULT_REPLAY_CAP,
        );
        let mut copy = body.try_clone().unwrap();
        let error = read_all(&mut body).await.unwrap_err();
        assert!(error.is::<Broken>(), "{error}");
        let copied = read_all(&mut copy).await.unwrap_err();
        assert_eq!(copied.to_string(), "the request body failed: broken upload");
        assert!(!body.is_complete());
    }

    #[tokio::test]
    async fn a_body_that_stops_being_ready_goes_on_as_a_stream_from_what_was_read() {
        let (tx, rx) = mpsc::channel(16);
        send(&tx, data("ab")).await;
        let mut body = ReplayBody::new(ChannelBody { rx }, DEFAULT_REPLAY_CAP);
        assert!(matches!(body.kind, Kind::Shared(_)));
        let mut copy = body.try_clone().unwrap();
        send(&tx, data("cd")).await;
        drop(tx);
        assert_eq!(read_all(&mut body).await.unwrap().0, "abcd");
        assert_eq!(read_all(&mut copy).await.unwrap().0, "abcd");
    }

    #[tokio::test]
    async fn a_fresh_clone_has_the_original_size_and_end_hints() {
        let mut body = full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        let copy = body.clone();
        assert_eq!(copy.size_hint().exact(), Some(5));
        assert!(!copy.is_end_stream());

        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        let late = body.clone();
        assert_eq!(late.size_hint().exact(), Some(5));
        assert!(!late.is_end_stream());
        assert_eq!(copy.size_hint().exact(), Some(5));
    }

    /// A body that is not ready when first asked (so it is not read whole
    /// when wrapped), then is `inner`.
    struct NotReadyAtFirst<B> {
        asked: bool,
        inner: B,
    }

    impl<B: Body + Unpin> Body for NotReadyAtFirst<B> {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
            if !self.asked {
                self.asked = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_frame(cx)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }

    #[tokio::test]
    async fn a_fresh_clone_of_a_streamed_body_has_the_original_size_and_end_hints() {
        let streamed = NotReadyAtFirst {
            asked: false,
            inner: Full::new(Bytes::from_static(b"hello")),
        };
        let mut body = ReplayBody::new(streamed, DEFAULT_REPLAY_CAP);
        assert!(matches!(body.kind, Kind::Shared(_)));
        assert_eq!(body.size_hint().exact(), Some(5));
        let copy = body.clone();
        assert_eq!(copy.size_hint().exact(), Some(5));
        assert!(!copy.is_end_stream());

        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream(), "hyper would wait for more");
        assert!(body.is_complete());
        assert_eq!(body.size_hint().exact(), Some(0));
        let late = body.clone();
        assert_eq!(late.size_hint().exact(), Some(5));
        assert!(!late.is_end_stream());
    }

    #[test]
    fn replay_copies_method_uri_version_headers_and_extensions() {
        #[derive(Clone, Debug, PartialEq)]
        struct Deadline(u64);

        let mut req = http::Request::put("http://orders/7")
            .version(http::Version::HTTP_2)
            .header("idempotency-key", "k-1")
            .body(full("{}"))
            .unwrap();
        req.extensions_mut().insert(Deadline(42));

        let copy = req.replay().unwrap();
        assert_eq!(copy.method(), http::Method::PUT);
        assert_eq!(copy.uri(), "http://orders/7");
        assert_eq!(copy.version(), http::Version::HTTP_2);
        assert_eq!(copy.headers(), req.headers());
        assert_eq!(copy.extensions().get::<Deadline>(), Some(&Deadline(42)));
        assert_eq!(copy.safety(), Safety::Idempotent);
    }

    #[test]
    fn replay_complete_waits_for_a_complete_body() {
        let (_tx, body) = channel(DEFAULT_REPLAY_CAP);
        let req = http::Request::post("/").body(body).unwrap();
        assert_eq!(
            req.replay_complete().err(),
            Some(NotReplayable::BodyIncomplete)
        );
    }

    #[tokio::test]
    async fn the_replay_service_hands_on_a_replayable_request() {
        let inner = tower::service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
            let again = req.replay()?;
            Ok::<_, BoxError>((
                req.into_body().collect().await?.to_bytes(),
                again.into_body().collect().await?.to_bytes(),
            ))
        });
        let svc = ReplayLayer::new(16).layer(inner);
        let req = http::Request::post("/")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (first, second) = tower::ServiceExt::oneshot(svc, req).await.unwrap();
        assert_eq!(first, "payload");
        assert_eq!(second, "payload");
    }

    #[test]
    fn debug_shows_the_buffer_without_needing_a_debug_body() {
        struct Opaque;
        impl Body for Opaque {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> PolledFrame {
                Poll::Pending
            }
        }
        let shown = format!("{:?}", ReplayBody::new(Opaque, 8));
        assert!(shown.contains("cap: 8"), "{shown}");
        assert!(shown.contains("capped: false"), "{shown}");
    }
}
