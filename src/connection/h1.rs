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

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::{connect_tcp, ConnectFailureHook, ConnectionAttempts, SendFuture};
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

/// The ticks in an idle timeout: a connection idle for between 7/8 and all
/// of the timeout is not used again, never one idle longer (the timeout is
/// there to stay below the server's); the reaper closes it within a tick.
const TICKS_PER_IDLE_TIMEOUT: u32 = 8;

/// One endpoint's HTTP/1.1 connections (plain text): a request takes the
/// newest idle connection that is free, or makes a new one; the connection
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
    /// The kept connections, oldest first. Locked twice per request, to take
    /// one and to keep it again, for a few pushes and pops: hyper-util's pool
    /// takes a lock as often, and a lock-free stack could not take a free
    /// connection from under a busy one. Each endpoint has its own, so
    /// requests to different endpoints never wait for each other.
    kept: Mutex<Vec<Kept<B>>>,
    /// When the pool was made, and the tick a connection's idle time is
    /// counted in.
    start: Instant,
    tick: Duration,
    /// Ticks since `start`, as of the last request or reaper run: what a
    /// connection kept now is stamped with, without a second clock read.
    epoch: AtomicU32,
}

/// A kept connection, and the reaper's tick when it was last seen in use.
struct Kept<B> {
    sender: SendRequest<B>,
    since: u32,
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
    /// Connections to `addr`, none made yet. Inside a tokio runtime a task
    /// closes the idle ones as they time out, for as long as a handle
    /// lives; outside one they are checked only when a request looks.
    pub(crate) fn new(addr: SocketAddr, settings: H1Settings) -> Self {
        let idle_timeout = settings.idle_timeout;
        let tick = (idle_timeout / TICKS_PER_IDLE_TIMEOUT).max(Duration::from_millis(1));
        let shared = Arc::new(Pool {
            addr,
            settings,
            attempts: ConnectionAttempts::new(),
            kept: Mutex::new(Vec::new()),
            start: Instant::now(),
            tick,
            epoch: AtomicU32::new(0),
        });
        if !idle_timeout.is_zero() && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap(Arc::downgrade(&shared), tick));
        }
        Self { shared }
    }

    /// Sends `req` (origin-form, with its `Host`) on a free connection, or
    /// on a new one. A request a kept connection gives back unsent (it
    /// closed since it was kept: the server's idle close racing the
    /// request) goes on another; one a new connection gives back fails,
    /// marked [`NeverSent`], as does one whose connection cannot be made.
    pub(crate) fn send(&self, req: http::Request<B>) -> SendFuture {
        let pool = Arc::clone(&self.shared);
        Box::pin(async move { pool.send(req).await })
    }
}

impl<B> Pool<B> {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Kept<B>>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ticks since the pool was made, by the clock; kept as the epoch.
    fn now(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() / self.tick.as_nanos().max(1);
        let now = u32::try_from(ticks).unwrap_or(u32::MAX);
        self.epoch.store(now, Ordering::Relaxed);
        now
    }

    /// Whether a connection last seen in use at tick `since` has been idle
    /// for the whole timeout by tick `now`.
    fn expired(since: u32, now: u32) -> bool {
        now.wrapping_sub(since) >= TICKS_PER_IDLE_TIMEOUT
    }

    /// The newest kept connection that is free, dropping the closed and
    /// timed-out ones it passes; busy ones (a response still being read)
    /// are left for later.
    fn take(&self) -> Option<SendRequest<B>> {
        // One clock read a request: the reaper may not have run lately (a
        // busy runtime), and a connection past the timeout must not go out.
        let now = self.now();
        let mut kept = self.kept();
        let mut index = kept.len();
        while index > 0 {
            index -= 1;
            let connection = &kept[index];
            if connection.sender.is_closed() {
                kept.remove(index);
            } else if connection.sender.is_ready() {
                let connection = kept.remove(index);
                if !Self::expired(connection.since, now) {
                    return Some(connection.sender);
                }
            }
        }
        None
    }

    /// Keeps `sender`, whose response has begun, for a later request.
    fn keep(&self, sender: SendRequest<B>) {
        if self.settings.idle_timeout.is_zero() {
            return;
        }
        let since = self.epoch.load(Ordering::Relaxed);
        self.kept().push(Kept { sender, since });
    }

    /// One run of the reaper: closes the connections idle for the whole
    /// timeout, and counts a busy one's idle time from now.
    fn reap(&self) {
        let now = self.now();
        self.kept().retain_mut(|connection| {
            if connection.sender.is_closed() {
                return false;
            }
            if !connection.sender.is_ready() {
                connection.since = now;
                return true;
            }
            !Self::expired(connection.since, now)
        });
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
            let (mut sender, kept) = match self.take() {
                Some(sender) => (sender, true),
                // A connection never made is itself proof that the request
                // was never sent (see `ConnectFailed`).
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.keep(sender);
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
    /// telling the hook of a failure. An attempt dropped before it ends (the
    /// request's timeout or deadline) counts as failed: the address did not
    /// answer in time.
    async fn connect(&self) -> Result<SendRequest<B>, ConnectFailed> {
        let mut attempt = Attempt {
            pool: self,
            ended: false,
        };
        self.attempts.attempt_started();
        let made = self.handshake().await;
        attempt.ended = true;
        match &made {
            Ok(_) => self.attempts.made(),
            Err(_) => self.connect_failed(),
        }
        made
    }

    async fn handshake(&self) -> Result<SendRequest<B>, ConnectFailed> {
        let addr = self.addr;
        let stream = connect_tcp(addr, self.settings.connect_timeout).await?;
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
        Ok(sender)
    }
}

impl<B> Pool<B> {
    fn connect_failed(&self) {
        self.attempts.failed();
        if let Some(hook) = &self.settings.on_connect_failure {
            hook.connect_failed();
        }
    }
}

/// A connection attempt under way: dropped before it ended, it failed.
struct Attempt<'a, B> {
    pool: &'a Pool<B>,
    ended: bool,
}

impl<B> Drop for Attempt<'_, B> {
    fn drop(&mut self) {
        if !self.ended {
            self.pool.connect_failed();
        }
    }
}

/// Closes `pool`'s idle connections as they time out, every `tick`, until
/// the pool is gone.
async fn reap<B>(pool: Weak<Pool<B>>, tick: Duration) {
    let mut ticks = tokio::time::interval_at(Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_expires_after_between_seven_and_eight_ticks_idle() {
        // Kept during tick 3 (between 3 and 4 ticks after the start).
        assert!(!Pool::<()>::expired(3, 10));
        assert!(Pool::<()>::expired(3, 11));
    }

    #[test]
    fn expiry_holds_across_the_tick_counters_wrap() {
        assert!(!Pool::<()>::expired(u32::MAX - 2, 4));
        assert!(Pool::<()>::expired(u32::MAX - 2, 5));
    }
}
