//! An endpoint's own HTTP/1.1 connections ([`H1Pool`]): idle ones kept
//! for the next request, new ones made when none is free.
//!
//! Why not hyper-util's pooled `Client`, which `HttpClient` used before:
//! its pool is one map for every endpoint, so each request hashes its
//! origin into it under a lock to check a connection out and again to put
//! it back, and when the response's body is still to come it spawns a task
//! per request to wait for the connection to be free. The balancer has
//! already chosen the endpoint, so here each endpoint keeps its own list
//! and a request takes the newest free connection from it. Measured in
//! `benches/clients.rs`: bare hyper connections kept this way cost 1.85 µs
//! less client CPU per request than hyper-util's `Client` (7.95 against
//! 9.80 µs, HTTP/1.1, same run).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::{Connection as _, HttpInfo};
use hyper_util::rt::TokioIo;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{connect_tcp, ConnectFailureHook, ConnectionAttempts, ObservedConnect};
use crate::error::{BoxError, ConnectFailed, NeverSent};
use crate::health::ConnectionStatus;

/// How an endpoint's HTTP/1.1 connections are made and kept.
#[derive(Debug, Clone)]
pub(crate) struct H1Settings {
    /// How long a TCP connect may take before it counts as failed.
    pub(crate) connect_timeout: Duration,
    /// How long a connection may stay idle before it is closed; zero keeps
    /// none (a connection serves one request).
    pub(crate) idle_timeout: Duration,
    /// Told of every connection attempt that fails.
    pub(crate) on_connect_failure: Option<ConnectFailureHook>,
}

/// The ticks in an idle timeout: a connection idle for between 3/4 and all
/// of the timeout is not used again, never one idle longer (the timeout is
/// there to stay below the server's); the reaper closes it within a tick.
const TICKS_PER_IDLE_TIMEOUT: u64 = 4;

/// The reaper runs no more often than this, whatever the timeout.
const MIN_REAP_INTERVAL: Duration = Duration::from_millis(1);

/// The response future of [`H1Pool::send`]. Boxed: hyper's send future
/// has no name (hyper-util's `Client` boxes it too).
pub(crate) type Http1SendFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, BoxError>> + Send>>;

/// One endpoint's HTTP/1.1 connections (plain text): a request takes the
/// newest kept connection that is free, or makes a new one; the connection
/// is kept again once the response's head has arrived, and is free for
/// the next request once hyper has read that response whole.
///
/// A cheap `Clone` handle: every clone shares the connections.
pub(crate) struct H1Pool<B> {
    shared: Arc<Pool<B>>,
}

struct Pool<B> {
    addr: SocketAddr,
    settings: H1Settings,
    attempts: Arc<ConnectionAttempts>,
    /// The kept connections: the newest at the back, busy ones moved to the
    /// front as requests pass them. Locked twice per request, to take one
    /// and to keep it again, for a few pushes and pops: hyper-util's pool
    /// takes a lock as often, and a lock-free stack could not take a free
    /// connection from under a busy one. Each endpoint has its own, so
    /// requests to different endpoints never wait for each other.
    kept: Mutex<VecDeque<Kept<B>>>,
    /// When the pool was made, and the tick (in nanoseconds, at least one)
    /// a connection's idle time is counted in.
    start: Instant,
    tick_ns: u64,
    /// Whether a reaper task is running: the first connection kept starts
    /// one, which stops once nothing has been kept for a whole timeout.
    reaping: AtomicBool,
    /// The latest reaper, stopped with the pool.
    reaper: Mutex<Option<AbortHandle>>,
}

/// A connection, with what its socket says of its ends (hyper-util's
/// `HttpInfo`, given to every response as hyper-util's client does).
struct Connection<B> {
    sender: SendRequest<B>,
    info: Option<HttpInfo>,
}

/// A kept connection, and the tick when it was last seen in use.
struct Kept<B> {
    connection: Connection<B>,
    since: u64,
}

impl<B> Clone for H1Pool<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> fmt::Debug for H1Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Pool")
            .field("addr", &self.shared.addr)
            .field("kept", &self.shared.kept().len())
            .finish_non_exhaustive()
    }
}

impl<B> H1Pool<B> {
    /// The connections' state, as the balancer reads it (see
    /// [`ConnectionAttempts`]).
    pub(crate) fn status(&self) -> &ConnectionStatus {
        self.shared.attempts.status()
    }
}

impl<B> H1Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Connections to `addr`, none made yet. While connections are kept,
    /// inside a tokio runtime, a task closes the idle ones as they time out;
    /// a request never takes one past its timeout either way.
    pub(crate) fn new(addr: SocketAddr, settings: H1Settings) -> Self {
        let tick = settings.idle_timeout / u32::try_from(TICKS_PER_IDLE_TIMEOUT).unwrap_or(1);
        let tick_ns = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX).max(1);
        Self {
            shared: Arc::new(Pool {
                addr,
                settings,
                attempts: ConnectionAttempts::new(),
                kept: Mutex::new(VecDeque::new()),
                start: Instant::now(),
                tick_ns,
                reaping: AtomicBool::new(false),
                reaper: Mutex::new(None),
            }),
        }
    }

    /// Sends `req` (origin-form, with its `Host`) on a free connection, or
    /// on a new one. A request a kept connection gives back unsent (it
    /// closed since it was kept: the server's idle close racing the
    /// request) goes on another; one a new connection gives back fails,
    /// marked [`NeverSent`]; one whose connection cannot be made fails with
    /// [`ConnectFailed`], which says the same.
    pub(crate) fn send(&self, req: http::Request<B>) -> Http1SendFuture {
        Box::pin(Arc::clone(&self.shared).send(req))
    }
}

impl<B> Pool<B> {
    fn kept(&self) -> MutexGuard<'_, VecDeque<Kept<B>>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ticks since the pool was made, by the clock.
    fn now(&self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        elapsed / self.tick_ns
    }

    /// Whether a connection last seen in use at tick `since` has been idle
    /// for the whole timeout by tick `now`.
    fn expired(since: u64, now: u64) -> bool {
        now.saturating_sub(since) >= TICKS_PER_IDLE_TIMEOUT
    }

    /// What a kept connection is at tick `now`: what `take` and the reaper
    /// both go by.
    fn judge(kept: &Kept<B>, now: u64) -> Verdict {
        let sender = &kept.connection.sender;
        if sender.is_closed() {
            Verdict::Gone
        } else if !sender.is_ready() {
            Verdict::Busy
        } else if Self::expired(kept.since, now) {
            Verdict::Gone
        } else {
            Verdict::Free
        }
    }

    /// The newest kept connection that is free, dropping the closed and
    /// timed-out ones it passes; busy ones (a response still being read)
    /// go to the front, so that a long download or event stream is passed
    /// once rather than by every request.
    fn take(&self) -> Option<Connection<B>> {
        // The clock read here, not left to the reaper, which may not have
        // run lately (a busy runtime): a connection past the timeout must
        // not go out.
        let now = self.now();
        let mut kept = self.kept();
        for _ in 0..kept.len() {
            let Some(candidate) = kept.pop_back() else {
                break;
            };
            match Self::judge(&candidate, now) {
                Verdict::Gone => {}
                Verdict::Busy => kept.push_front(candidate),
                Verdict::Free => return Some(candidate.connection),
            }
        }
        None
    }

    /// One run of the reaper: closes the connections idle for the whole
    /// timeout, and counts a busy one's idle time from now. Whether any
    /// connection is still kept.
    fn reap(&self) -> bool {
        let now = self.now();
        let mut kept = self.kept();
        kept.retain_mut(|candidate| match Self::judge(candidate, now) {
            Verdict::Gone => false,
            Verdict::Busy => {
                candidate.since = now;
                true
            }
            Verdict::Free => true,
        });
        !kept.is_empty()
    }
}

/// What a kept connection is, to a request or the reaper.
enum Verdict {
    /// Closed, or idle past the timeout: dropped.
    Gone,
    /// Its last response is still being read: left for later, its idle
    /// time counted from now.
    Busy,
    /// Free for a request.
    Free,
}

impl<B: Send + 'static> Pool<B> {
    /// Keeps `connection`, whose response has begun, for a later request,
    /// and starts the reaper if none runs.
    fn keep(self: &Arc<Self>, connection: Connection<B>) {
        if self.settings.idle_timeout.is_zero() {
            return;
        }
        // The clock read again, not `take`'s: a response that took a while
        // would make its connection look idle for that while.
        let since = self.now();
        self.kept().push_back(Kept { connection, since });
        if !self.reaping.load(Ordering::Relaxed) && !self.reaping.swap(true, Ordering::AcqRel) {
            self.start_reaper();
        }
    }

    fn start_reaper(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let every = Duration::from_nanos(self.tick_ns).max(MIN_REAP_INTERVAL);
        let task = tokio::spawn(reap(Arc::downgrade(self), every));
        *self.reaper.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }
}

impl<B> Drop for Pool<B> {
    fn drop(&mut self) {
        let reaper = self
            .reaper
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(reaper) = reaper.take() {
            reaper.abort();
        }
    }
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn send(
        self: Arc<Self>,
        mut req: http::Request<B>,
    ) -> Result<http::Response<Incoming>, BoxError> {
        loop {
            let (mut connection, kept) = match self.take() {
                Some(connection) => (connection, true),
                // Boxed: its state is large and rarely needed. A connection
                // never made is itself proof that the request was never
                // sent (see `ConnectFailed`).
                None => (Box::pin(self.connect()).await?, false),
            };
            match connection.sender.try_send_request(req).await {
                Ok(mut response) => {
                    // Three allocations a response (the extensions' map, its
                    // table, the boxed value) and some 1,400 instructions
                    // (callgrind over `benches/clients.rs`: 14.1 -> 17.1
                    // allocations a call), which hyper-util's client spends
                    // too: so that a user of either finds which server
                    // answered, as before this route.
                    if let Some(info) = &connection.info {
                        response.extensions_mut().insert(info.clone());
                    }
                    self.keep(connection);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // Each kept connection is taken once: this ends.
                    Some(unsent) if kept => req = unsent,
                    Some(_) => return Err(Box::new(NeverSent::new(error.into_error()))),
                    None => return Err(Box::new(error.into_error())),
                },
            }
        }
    }

    /// Makes a connection, keeping the endpoint's connection state and
    /// telling the hook of a failure, as hyper-util's pool route does (see
    /// [`ObservedConnect`]).
    async fn connect(&self) -> Result<Connection<B>, ConnectFailed> {
        ObservedConnect::new(
            self.handshake(),
            self.settings.on_connect_failure.clone(),
            Some(Arc::clone(&self.attempts)),
        )
        .await
    }

    async fn handshake(&self) -> Result<Connection<B>, ConnectFailed> {
        let addr = self.addr;
        let stream = connect_tcp(addr, self.settings.connect_timeout).await?;
        let mut extras = http::Extensions::new();
        stream.connected().get_extras(&mut extras);
        let info = extras.remove::<HttpInfo>();
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| ConnectFailed::new(addr, error))?;
        tokio::spawn(async move {
            // With upgrades, as hyper-util's client does: a `101 Switching
            // Protocols` response hands the caller the connection.
            if let Err(error) = connection.with_upgrades().await {
                let error = crate::error::report(&error);
                tracing::debug!(%addr, %error, "HTTP/1.1 connection ended");
            }
        });
        Ok(Connection { sender, info })
    }
}

/// Closes `pool`'s idle connections as they time out, every `every`,
/// until the pool is gone or nothing has been kept for a whole timeout
/// (the next connection kept starts it again).
async fn reap<B>(pool: Weak<Pool<B>>, every: Duration) {
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut empty = 0;
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.reap() {
            empty = 0;
            continue;
        }
        empty += 1;
        if empty > TICKS_PER_IDLE_TIMEOUT {
            pool.reaping.store(false, Ordering::Release);
            // A connection kept since the run above saw the flag still set
            // and started no reaper: this one goes on for it, unless one
            // kept after the flag was cleared started another.
            if pool.kept().is_empty() || pool.reaping.swap(true, Ordering::AcqRel) {
                return;
            }
            empty = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_expires_after_between_three_and_four_ticks_idle() {
        // Kept during tick 3 (between 3 and 4 ticks after the start).
        assert!(!Pool::<()>::expired(3, 6));
        assert!(Pool::<()>::expired(3, 7));
    }

    /// A hyper HTTP/1.1 server on loopback answering `200` with no body.
    async fn server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let answer = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), answer)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_reaper_closes_idle_connections_then_stops_until_one_is_kept_again() {
        use http_body_util::BodyExt;

        let addr = server().await;
        let pool = H1Pool::new(
            addr,
            H1Settings {
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_millis(200),
                on_connect_failure: None,
            },
        );
        let call = || async {
            let req = http::Request::get("/")
                .header(http::header::HOST, addr.to_string())
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap_or_else(|e| panic!("{e}"));
            let response = pool.send(req).await.unwrap_or_else(|e| panic!("{e}"));
            assert!(
                response
                    .extensions()
                    .get::<HttpInfo>()
                    .map(HttpInfo::remote_addr)
                    == Some(addr),
                "hyper-util's HttpInfo, as its client gives"
            );
            let _ = response.into_body().collect().await;
        };
        call().await;
        assert_eq!(pool.shared.kept().len(), 1);
        assert!(pool.shared.reaping.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.shared.kept().len(), 0, "closed once idle 200 ms");
        // Nothing kept for a whole timeout (and a tick): the reaper is gone.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!pool.shared.reaping.load(Ordering::Relaxed));
        call().await;
        assert!(pool.shared.reaping.load(Ordering::Relaxed), "started again");
    }

    #[test]
    fn a_stamp_from_a_later_tick_than_now_is_not_expired() {
        // A request's stamp may come from a clock read a moment after the
        // reaper's.
        assert!(!Pool::<()>::expired(9, 8));
    }
}
