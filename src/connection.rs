//! Connections of an endpoint's own, made and kept by tower-lb itself, for
//! endpoints that need nothing between the balancer and the wire: one
//! HTTP/2 connection to one address, made and remade ([`H2Connection`],
//! spoken with h2 itself, in `http2`), and an endpoint's HTTP/1.1
//! connections, idle ones kept ([`H1Pool`], in `h1`, over hyper's).
//!
//! Why not a tonic `Channel` or hyper-util's pooled `Client` per endpoint:
//! both put a shared queue in front of the connection (a `Buffer` and its
//! worker task, or the pool's lock and checkout) that every call passes
//! through. A balancer already spreads calls over endpoints and an HTTP/2
//! connection multiplexes them, so here a call goes from the balancer's pick
//! straight to the connection's streams. Measured in `benches/clients.rs`:
//! a tonic client over four bare hyper HTTP/2 connections costs 1.0 µs less
//! client CPU per call than over four tonic `Channel`s; over h2 itself
//! (`http2`'s module docs say why) 2.9 µs less again.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http_body::Body;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::{BoxError, ConnectFailed, NeverSent};
use crate::health::{ConnectionState, ConnectionStatus};
use crate::retry::Backoff;
use crate::setting::{self, InvalidSetting};

mod attempts;
mod h1;
mod http2;

pub(crate) use attempts::{ConnectionAttempts, ObservedConnect};
pub(crate) use h1::{H1Pool, H1Settings, Http1SendFuture};
pub(crate) use http2::{Http2Body, Http2SendFuture};
use http2::{Http2Open, KeepAliveRule};

/// A connection that closes sooner than this after it opened is made again
/// after a back-off, as a failed attempt is, rather than at once: a server
/// that accepts and at once hangs up must not be dialled in a loop.
const MIN_CONNECTED: Duration = Duration::from_secs(1);

/// How the connection is made and kept.
#[derive(Debug, Clone)]
pub(crate) struct H2Settings {
    /// How long a TCP connect may take before it counts as failed.
    pub(crate) connect_timeout: Duration,
    /// HTTP/2 pings on a connection that has gone quiet, and whether while
    /// no call is open too.
    pub(crate) keep_alive: Option<KeepAliveRule>,
    /// Told of every connection attempt that fails.
    pub(crate) on_connect_failure: Option<ConnectFailureHook>,
}

impl H2Settings {
    /// The clients' [`DEFAULT_CONNECT_TIMEOUT`](crate::client::DEFAULT_CONNECT_TIMEOUT)
    /// and `keep_alive`.
    pub(crate) fn new(keep_alive: Option<Http2KeepAlive>) -> Self {
        Self {
            connect_timeout: crate::client::DEFAULT_CONNECT_TIMEOUT,
            keep_alive: keep_alive.map(|keep_alive| KeepAliveRule {
                keep_alive,
                while_idle: false,
            }),
            on_connect_failure: None,
        }
    }

    /// Pings while no call is open too, when it pings (see
    /// [`Http2KeepAlive`]).
    pub(crate) fn ping_while_idle(mut self, on: bool) -> Self {
        if let Some(rule) = self.keep_alive.as_mut() {
            rule.while_idle = on;
        }
        self
    }

    /// Tells `hook` of every connection attempt that fails.
    pub(crate) fn on_connect_failure(mut self, hook: Option<ConnectFailureHook>) -> Self {
        self.on_connect_failure = hook;
        self
    }
}

/// What a client does when a connection to an endpoint cannot be made: the
/// clients over DNS re-resolve the name (the address may be gone for good,
/// and a new one be in the records already). Called once per failed
/// attempt, never per request.
#[derive(Clone)]
pub(crate) struct ConnectFailureHook(Arc<dyn Fn() + Send + Sync>);

impl ConnectFailureHook {
    // Made only by the clients built over DNS.
    #[cfg_attr(not(feature = "dns"), allow(dead_code))]
    pub(crate) fn new(hook: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(hook))
    }

    pub(crate) fn connect_failed(&self) {
        (self.0)()
    }
}

impl fmt::Debug for ConnectFailureHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectFailureHook")
    }
}

/// HTTP/2 keep-alive: when a connection with calls open has received
/// nothing for `interval`, a `PING` goes out, and a connection that does not
/// answer it within `timeout` is closed. Its calls then fail as on a lost
/// connection (retried as such: at once elsewhere when they are idempotent)
/// and the next call makes a new connection. This is how a server that
/// stops answering without closing anything (a hung process, a
/// `kill -STOP`, a host gone behind a NAT) is found: TCP alone never says
/// so, and the kernel of a stopped process still accepts connections.
///
/// A busy connection receives frames and is never pinged. `GrpcChannel`
/// pings only a connection with calls open (`keep_alive_while_idle` off),
/// as gRPC servers require (they count pings on a connection with no call
/// as abuse). `HttpClient` pings idle connections too, on both its routes
/// alike, for the sake of hyper-util's pool: with idle pings off, hyper
/// (1.12) leaves a connection's pings unarmed when its connection task
/// runs in the moment between a call's `HEADERS` being queued and the call
/// being counted as open, and a call on such a connection to a server that
/// has stopped waits for its deadline with nothing to find it (seen once in
/// CI, and made to happen every time by widening that moment). Pinging
/// while idle arms them from the connection's start; HTTP servers allow it
/// at this rate. tower-lb's own HTTP/2 connections count a call open
/// before its `HEADERS` are queued, so `GrpcChannel`'s cannot meet that
/// race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2KeepAlive {
    interval: Duration,
    timeout: Duration,
}

impl Http2KeepAlive {
    /// `HttpClient`'s default (over HTTP/2): a ping after 30 s of quiet, 10 s
    /// to answer it. HTTP servers (nginx, Envoy, hyper) do not limit pings
    /// this rare.
    pub const HTTP: Self = Self {
        interval: Duration::from_secs(30),
        timeout: Duration::from_secs(10),
    };

    /// `GrpcChannel`'s default: a ping after 5 minutes of quiet, 20 s to
    /// answer it (gRPC's A8 timeout). Not sooner: grpc-go and grpc-java
    /// servers by default count a ping that comes less than 5 minutes
    /// after the last as abuse while they are not sending, and close the
    /// connection (`GOAWAY` `ENHANCE_YOUR_CALM`, "too_many_pings") on the
    /// third, which would end a quiet stream every few minutes. Set a
    /// shorter interval for servers that allow it (their
    /// `keepalive_enforcement_policy`, or `grpc.http2.min_ping_interval_without_data_ms`).
    pub const GRPC: Self = Self {
        interval: Duration::from_secs(300),
        timeout: Duration::from_secs(20),
    };

    /// A ping after `interval` of quiet, `timeout` to answer it.
    ///
    /// # Errors
    ///
    /// When either is zero.
    pub fn new(interval: Duration, timeout: Duration) -> Result<Self, InvalidSetting> {
        let interval = setting::check(
            "Http2KeepAlive::new (interval)",
            interval,
            !interval.is_zero(),
            "a duration above zero",
        )?;
        let timeout = setting::check(
            "Http2KeepAlive::new (timeout)",
            timeout,
            !timeout.is_zero(),
            "a duration above zero",
        )?;
        Ok(Self { interval, timeout })
    }

    /// The quiet that sends a ping.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a ping may go unanswered.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Whether the attempt `outcome` watches is under way: no outcome yet, and
/// its task still alive (a task dropped with its runtime never tells; a new
/// attempt replaces it).
fn under_way(outcome: &watch::Receiver<Outcome>) -> bool {
    outcome.borrow().is_none() && outcome.has_changed().is_ok()
}

/// The outcome of one connection attempt, shared by every call that waited
/// on it.
type Outcome = Option<Result<(), ConnectFailed>>;

/// A call's wait for the connection attempt under way. Boxed: only calls
/// that find no open connection make one.
type Waiting = Pin<Box<dyn Future<Output = Result<(), ConnectFailed>> + Send + Sync>>;

/// One HTTP/2 connection (plain text, prior knowledge) to one address,
/// made on the first call and made again by the first call after it
/// closes (a `GOAWAY`, a reset, the server gone).
///
/// A cheap `Clone` handle: every clone shares the connection. The balancer
/// clones its endpoint for each call, so each call asks [`poll_ready`]
/// whether the connection is open (an atomic load) and, if not, waits for
/// the one attempt under way, which every waiting call shares.
///
/// [`poll_ready`]: H2Connection::poll_ready
pub(crate) struct H2Connection {
    shared: Arc<Shared>,
    /// This handle's wait for a connection attempt.
    waiting: Option<Waiting>,
}

struct Shared {
    addr: SocketAddr,
    settings: H2Settings,
    /// The connection's state, for the balancer. Changed only with
    /// `attempt` locked, so that an attempt's end and a connection's end
    /// cannot undo each other.
    status: ConnectionStatus,
    /// The open connection's handle, read by every call without a lock.
    open: ArcSwapOption<Http2Open>,
    /// The latest connection attempt. Locked only by calls that find no
    /// open connection, to join the attempt under way or start one.
    attempt: Mutex<Option<watch::Receiver<Outcome>>>,
}

impl Clone for H2Connection {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            waiting: None,
        }
    }
}

impl fmt::Debug for H2Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Connection")
            .field("addr", &self.shared.addr)
            .field("open", &self.shared.is_open())
            .finish_non_exhaustive()
    }
}

impl H2Connection {
    /// A connection to `addr`, made by the first call.
    pub(crate) fn lazy(addr: SocketAddr, settings: H2Settings) -> Self {
        Self {
            shared: Arc::new(Shared {
                addr,
                settings,
                status: ConnectionStatus::new(),
                open: ArcSwapOption::empty(),
                attempt: Mutex::new(None),
            }),
            waiting: None,
        }
    }

    /// The connection's state, as the balancer reads it.
    pub(crate) fn status(&self) -> &ConnectionStatus {
        &self.shared.status
    }

    /// A connection to `addr`, made at once and made again whenever it
    /// closes (at once, if it had stayed open a while) or an attempt fails
    /// (after gRPC's connection back-off), for as long as a handle to it
    /// lives: so that the balancer, which prefers endpoints whose
    /// connection is ready, finds new endpoints and those back from a
    /// restart ready rather than making a request wait for a handshake.
    /// gRPC's subchannels under `round_robin` are kept connected the same
    /// way. Outside a tokio runtime it is made by the first call instead.
    pub(crate) fn kept_open(addr: SocketAddr, settings: H2Settings) -> Self {
        let connection = Self::lazy(addr, settings);
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(keep_open(
                Arc::downgrade(&connection.shared),
                connection.shared.status.changes(),
            ));
        }
        connection
    }
}

/// Keeps the connection behind `shared` open while it lives (see
/// [`H2Connection::kept_open`]); `changes` follows its state.
async fn keep_open(shared: Weak<Shared>, mut changes: watch::Receiver<ConnectionState>) {
    let mut failures = 0u32;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        // Joins the attempt a call started, if one is under way.
        let attempt = Shared::connect(&strong);
        drop(strong);
        if attempt.await.is_ok() {
            let opened = tokio::time::Instant::now();
            // Until the connection ends; every handle gone ends this too.
            if changes
                .wait_for(|state| *state != ConnectionState::Ready)
                .await
                .is_err()
            {
                return;
            }
            if opened.elapsed() >= MIN_CONNECTED {
                failures = 0;
                continue;
            }
        }
        failures = failures.saturating_add(1);
        // gRPC's connection back-off: 1 s, growing 1.6x up to 120 s.
        let delay = Backoff::CONNECTION.delay(failures, &mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

impl H2Connection {
    /// Ready once the connection is open. While it is not, joins (or
    /// starts) an attempt to make it, and fails with the attempt's
    /// [`ConnectFailed`], which says "never sent" by itself, if it fails:
    /// no call went anywhere.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.waiting.is_none() {
            if self.shared.is_open() {
                return Poll::Ready(Ok(()));
            }
            self.waiting = Some(Shared::connect(&self.shared));
        }
        let Some(waiting) = self.waiting.as_mut() else {
            unreachable!("set above");
        };
        let outcome = ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        // Ready once the attempt made a connection, even if it has closed
        // since: `send` turns a closed connection into a request never
        // sent, where checking again here could start attempt after
        // attempt against a server that accepts and at once hangs up.
        Poll::Ready(outcome.map_err(|failed| -> BoxError { Box::new(failed) }))
    }

    /// Sends `req` on the open connection. A request the connection cannot
    /// take (it closed, or its server said `GOAWAY`, since `poll_ready`)
    /// fails marked [`NeverSent`].
    pub(crate) fn send<B>(&mut self, req: http::Request<B>) -> Http2SendFuture
    where
        B: Body + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        match self.shared.open.load().as_deref() {
            Some(open) => open.send(req),
            None => {
                let error = NeverSent::new(format!("no open connection to {}", self.shared.addr));
                Box::pin(std::future::ready(Err(Box::new(error) as BoxError)))
            }
        }
    }
}

/// A TCP connection to `addr`, made within `timeout`, that sends at once:
/// without `TCP_NODELAY` an HTTP/2 call's DATA frame written after its
/// HEADERS, or an HTTP/1.1 body written after its head, waits for the
/// server's delayed ACK (Nagle): 40 ms a call.
pub(crate) async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectFailed> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(ConnectFailed::new(addr, error)),
        Err(_) => {
            return Err(ConnectFailed::new(
                addr,
                format!("timed out after {}", crate::error::duration(&timeout)),
            ))
        }
    };
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%addr, %error, "could not set TCP_NODELAY");
    }
    Ok(stream)
}

impl Shared {
    fn is_open(&self) -> bool {
        self.open
            .load()
            .as_deref()
            .is_some_and(Http2Open::is_usable)
    }

    /// Joins the attempt under way, or starts one.
    fn connect(this: &Arc<Self>) -> Waiting {
        let addr = this.addr;
        let mut attempt = this.attempt.lock().unwrap_or_else(PoisonError::into_inner);
        // An attempt that finished while this call looked made a connection.
        if this.is_open() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let outcome = match attempt.as_ref().filter(|a| under_way(a)) {
            Some(under_way) => under_way.clone(),
            _ => {
                let (tell, outcome) = watch::channel(None);
                *attempt = Some(outcome.clone());
                this.status.set(ConnectionState::Connecting);
                let shared = Arc::clone(this);
                tokio::spawn(async move {
                    let made = shared.open_connection().await;
                    let _attempt = shared
                        .attempt
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    shared.status.set(match &made {
                        // Closed already: its end found this attempt under
                        // way and left the state to it.
                        Ok(()) if !shared.is_open() => ConnectionState::Idle,
                        Ok(()) => ConnectionState::Ready,
                        Err(_) => ConnectionState::Failed,
                    });
                    // Nobody waits any more: the endpoint may be gone.
                    let _ = tell.send(Some(made));
                });
                outcome
            }
        };
        drop(attempt);
        Box::pin(async move {
            let mut outcome = outcome;
            let result = match outcome.wait_for(Option::is_some).await {
                Ok(made) => made.clone().unwrap_or(Ok(())),
                Err(_) => Err(ConnectFailed::new(
                    addr,
                    "the connection attempt was dropped",
                )),
            };
            result
        })
    }

    /// Connects, shakes hands, and publishes the connection's handle; a
    /// failure is told to the hook, if any.
    async fn open_connection(self: &Arc<Self>) -> Result<(), ConnectFailed> {
        let made = self.try_open_connection().await;
        if made.is_err() {
            if let Some(hook) = &self.settings.on_connect_failure {
                hook.connect_failed();
            }
        }
        made
    }

    async fn try_open_connection(self: &Arc<Self>) -> Result<(), ConnectFailed> {
        let addr = self.addr;
        let stream = connect_tcp(addr, self.settings.connect_timeout).await?;
        let (open, driver) = http2::handshake(stream, self.settings.keep_alive)
            .await
            .map_err(|error| ConnectFailed::new(addr, error))?;
        let open = Arc::new(open);
        let shared = Arc::downgrade(self);
        // Weak: the connection closes once its handle is gone and its calls
        // have ended, and this task must not be what keeps a removed
        // endpoint's connection open.
        let ours = Arc::downgrade(&open);
        // Made here, not in the task: its end (told to the endpoint) runs
        // even if the task is dropped before it starts.
        let driving = driver.run(move || {
            if let Some(shared) = shared.upgrade() {
                shared.closed(&ours);
            }
        });
        tokio::spawn(async move {
            let ended = driving.await;
            if let Err(error) = ended {
                let error = crate::error::report(&*error);
                tracing::debug!(%addr, %error, "HTTP/2 connection ended");
            }
        });
        self.open.store(Some(open));
        Ok(())
    }

    /// The connection behind `ended` takes no new calls: if it is the open
    /// one and no attempt is under way (that attempt's end sets the state),
    /// the endpoint is idle until a call or the keeper makes one again.
    fn closed(&self, ended: &Weak<Http2Open>) {
        let attempt = self.attempt.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.open.load();
        if !attempt.as_ref().is_some_and(under_way)
            && current
                .as_ref()
                .is_some_and(|open| std::ptr::eq(Arc::as_ptr(open), ended.as_ptr()))
        {
            self.open.store(None);
            self.status.set(ConnectionState::Idle);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    #[test]
    fn a_keep_alive_of_zero_is_refused_by_name() {
        let second = Duration::from_secs(1);
        let interval = Http2KeepAlive::new(Duration::ZERO, second).unwrap_err();
        assert_eq!(interval.setting(), "Http2KeepAlive::new (interval)");
        let timeout = Http2KeepAlive::new(second, Duration::ZERO).unwrap_err();
        assert_eq!(timeout.setting(), "Http2KeepAlive::new (timeout)");
        let fine = Http2KeepAlive::new(second, second * 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((fine.interval(), fine.timeout()), (second, second * 2));
    }

    type Empty = http_body_util::Empty<bytes::Bytes>;

    /// A listener on loopback, not serving yet.
    fn listener() -> std::net::TcpListener {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        listener
    }

    /// Serves HTTP/2 on `listener` (in the current runtime), counting the
    /// connections it accepts.
    fn serve(listener: std::net::TcpListener) -> Arc<AtomicUsize> {
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let listener =
            tokio::net::TcpListener::from_std(listener).unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Empty::new()))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        accepted
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn an_attempt_dropped_with_its_runtime_is_replaced_not_joined() {
        let listener = listener();
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let mut connection = H2Connection::lazy(addr, H2Settings::new(None));
        let first = runtime();
        first.block_on(async {
            // Starts the attempt, whose task never runs: it goes with its
            // runtime, before it could tell anyone.
            let noop = &mut Context::from_waker(std::task::Waker::noop());
            assert!(connection.poll_ready(noop).is_pending());
        });
        drop(first);
        let mut caller = connection.clone();
        let accepted = runtime().block_on(async move {
            let accepted = serve(listener);
            std::future::poll_fn(|cx| caller.poll_ready(cx))
                .await
                .unwrap_or_else(|e| panic!("{}", crate::error::report(&*e)));
            accepted
        });
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_open_connection_is_joined_not_made_again() {
        let listener = listener();
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        runtime().block_on(async move {
            let accepted = serve(listener);
            let mut connection = H2Connection::lazy(addr, H2Settings::new(None));
            std::future::poll_fn(|cx| connection.poll_ready(cx))
                .await
                .unwrap_or_else(|e| panic!("{}", crate::error::report(&*e)));
            // A call that found no connection and reached for an attempt
            // just as one finished.
            Shared::connect(&connection.shared)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        });
    }
}
