//! The error type returned by the balancer, the marker that says a request
//! never left the client, and how the crate's errors print.
//!
//! Each error of the crate says what happened at its own level only, and
//! hands the error it wraps out through [`std::error::Error::source`] (as
//! the Rust API guidelines ask: one or the other, never both), so that a
//! chain printed link by link says each thing once. [`report`] prints a
//! whole chain on one line.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use crate::setting::InvalidSetting;

/// A type-erased error, as used throughout tower.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong with a request sent through a [`Balancer`](crate::Balancer).
///
/// Every variant says in words what happened; errors that wrap an inner error
/// expose it through [`std::error::Error::source`], and do not repeat it
/// (print the whole chain with [`report`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No endpoint was known when the request arrived, and none appeared within
    /// the startup wait.
    #[error("no endpoints available: none appeared within {}", duration(.waited))]
    NoEndpoints {
        /// How long the request waited for the first endpoint.
        waited: Duration,
    },

    /// Discovery has said there are no endpoints (a DNS name with no
    /// records, an empty list, every endpoint removed), so the request
    /// failed at once rather than wait for one. See
    /// [`discover::Empty`](crate::discover::Empty).
    #[error("no endpoints available: {reason}")]
    DiscoveredNone {
        /// What discovery said (its text is this error's).
        reason: Empty,
    },

    /// Endpoints exist but the strategy declined to pick one of them.
    #[error("the balancing strategy picked none of {}", eligible(*.endpoints))]
    NoPick {
        /// How many endpoints the strategy was offered.
        endpoints: usize,
    },

    /// Every endpoint is ejected by outlier detection, and panic mode is off
    /// ([`Builder::panic_threshold`](crate::balance::Builder::panic_threshold)`(0)`),
    /// so there is nowhere to send the request.
    #[error("{} ejected by outlier detection and panic mode is off", all_endpoints_are(*.endpoints))]
    AllEjected {
        /// How many endpoints there are, all ejected.
        endpoints: usize,
    },

    /// Every endpoint is out of service, kept out by its
    /// [active health check](crate::balance::Builder::health_check) (failing
    /// it, or not passed yet) or ejected by outlier detection, and panic mode
    /// is off, so there is nowhere to send the request.
    #[error(
        "{} out of service ({}) and panic mode is off",
        all_endpoints_are(*.endpoints),
        out_of_service(*.endpoints, *.failing_checks)
    )]
    AllOutOfService {
        /// How many endpoints there are, all out of service.
        endpoints: usize,
        /// How many of them their health check keeps out; the others are
        /// ejected.
        failing_checks: usize,
    },

    /// The balancer was closed (see [`Balancer::close`](crate::Balancer::close));
    /// it accepts no new requests.
    #[error("the balancer is closed and accepts no new requests")]
    Closed,

    /// [`Balancer::shutdown`](crate::Balancer::shutdown) gave up waiting for
    /// in-flight requests to finish.
    #[error(
        "shutdown gave up after {} with {} still in flight",
        duration(.waited),
        count(*.in_flight as u64, "request")
    )]
    ShutdownTimedOut {
        /// How long the shutdown waited.
        waited: Duration,
        /// Requests still in flight when it gave up.
        in_flight: usize,
    },

    /// The endpoint service the request was sent to failed; what it said is
    /// the [`source`](std::error::Error::source).
    #[error("endpoint {endpoint} failed")]
    Endpoint {
        /// The endpoint's key, formatted with `Debug`.
        endpoint: String,
        /// The endpoint service's error.
        #[source]
        source: BoxError,
    },
}

/// "the 1 eligible endpoint", "the 3 eligible endpoints".
fn eligible(endpoints: usize) -> String {
    format!("the {}", count(endpoints as u64, "eligible endpoint"))
}

/// "the only endpoint is", "all 3 endpoints are".
fn all_endpoints_are(endpoints: usize) -> String {
    match endpoints {
        1 => "the only endpoint is".to_owned(),
        n => format!("all {n} endpoints are"),
    }
}

/// Why the endpoints are out of service: "failing their health check or
/// not passed it yet", or that and how many are ejected.
fn out_of_service(endpoints: usize, failing_checks: usize) -> String {
    let checks = "failing their health check or not passed it yet";
    match endpoints.saturating_sub(failing_checks) {
        0 => checks.to_owned(),
        ejected => format!("{failing_checks} {checks}, {ejected} ejected by outlier detection"),
    }
}

/// `n` and `noun`, in the plural unless `n` is 1: "1 request", "2 requests".
/// For the crate's messages, whose nouns take an `s`.
pub(crate) fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How the crate's messages print a duration: rounded to what a reader
/// needs, with one rule everywhere.
///
/// - a second or more: seconds with one decimal (`5.0s`, `1.5s`, `90.0s`);
/// - a millisecond or more: whole milliseconds (`300ms`, `1ms`);
/// - less: whole microseconds (`250µs`, `0µs`).
///
/// Each is rounded to the nearest unit, and a value that rounds up to the
/// next range prints in it (`999.7ms` is `1.0s`).
///
/// ```
/// use std::time::Duration;
/// use tower_lb::error::duration;
///
/// assert_eq!(duration(&Duration::from_micros(5_000_123)).to_string(), "5.0s");
/// assert_eq!(duration(&Duration::from_nanos(300_000_001)).to_string(), "300ms");
/// ```
pub fn duration(d: &Duration) -> impl fmt::Display {
    RoundedDuration(*d)
}

struct RoundedDuration(Duration);

impl fmt::Display for RoundedDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos < 1_000_000 {
            return match (nanos + 500) / 1_000 {
                1_000.. => f.write_str("1ms"),
                micros => write!(f, "{micros}µs"),
            };
        }
        match (nanos + 500_000) / 1_000_000 {
            millis @ ..1_000 => write!(f, "{millis}ms"),
            _ => {
                let tenths = (nanos + 50_000_000) / 100_000_000;
                write!(f, "{}.{}s", tenths / 10, tenths % 10)
            }
        }
    }
}

/// Prints `error` and every error of its `source()` chain on one line,
/// joined by `": "`: each says its own part once, so the line says what
/// happened from the outside in.
///
/// ```
/// use tower_lb::error::{report, NeverSent};
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let err = tower_lb::Error::Endpoint {
///     endpoint: "127.0.0.1:8080".into(),
///     source: Box::new(NeverSent::new(refused)),
/// };
/// assert_eq!(
///     report(&err).to_string(),
///     "endpoint 127.0.0.1:8080 failed: the request was never sent: connection refused",
/// );
/// ```
pub fn report<'a>(error: &'a (dyn StdError + 'static)) -> impl fmt::Display + 'a {
    Report(error)
}

struct Report<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut links = chain(self.0);
        if let Some(first) = links.next() {
            write!(f, "{first}")?;
        }
        links.try_for_each(|link| write!(f, ": {link}"))
    }
}

impl Error {
    /// True when the error proves the request never reached the endpoint (for
    /// example the connection was refused), so sending it again cannot
    /// duplicate it. Retry layers rely on this to retry non-idempotent requests.
    pub fn is_never_sent(&self) -> bool {
        is_never_sent(self)
    }
}

/// Discovery's answer that there are no endpoints, yielded as a discovery
/// stream's error (the [`Discover`](tower::discover::Discover) interface has no other way to say it):
/// not a failure of discovery but its result, like a DNS name with no
/// records.
///
/// A balancer with no endpoints that reads it fails requests at once with
/// [`Error::DiscoveredNone`], whose reason it
/// is, instead of having them wait the
/// [startup wait](crate::balance::Builder::startup_wait); the next endpoint inserted
/// ends that. A balancer that still has endpoints keeps them (with a `warn`
/// event): removing them is the stream's to do. Yield it as the stream's
/// error, or anywhere in that error's `source()` chain.
///
/// Its `Display` is the reason's.
///
/// ```
/// use tower_lb::discover::{Change, Empty};
///
/// let answer: Result<Change<&str, ()>, Empty> =
///     Err(Empty::new("the registry lists no instance of `api`"));
/// # let _ = answer;
/// ```
#[derive(Clone)]
pub struct Empty {
    // Shared: every request that fails while the set is empty carries it.
    reason: Arc<dyn StdError + Send + Sync>,
}

impl Empty {
    /// Says there are no endpoints, and why (the reason requests will
    /// fail with).
    pub fn new(reason: impl Into<BoxError>) -> Self {
        Self {
            reason: Arc::from(reason.into()),
        }
    }

    /// Why there are no endpoints: for DNS discovery, a `DnsError`.
    pub fn reason(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.reason
    }
}

impl fmt::Debug for Empty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Empty").field(&self.reason).finish()
    }
}

impl fmt::Display for Empty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reason, f)
    }
}

/// Transparent: the reason's text is this error's, so its `source()` is
/// the reason's too (not the reason itself, which would print it twice).
impl StdError for Empty {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.reason.source()
    }
}

/// Walks an error's `source()` chain and tells whether any link proves that the
/// request never reached the server's application: a [`NeverSent`] marker;
/// the client's refusal to address it (a CONNECT, a scheme the endpoint does
/// not speak); with the `http` feature, hyper-util's failure to connect, or
/// an HTTP/2 stream the server refused unprocessed or left unprocessed when
/// it went away gracefully (what `http::HttpError` reports).
pub fn is_never_sent(error: &(dyn StdError + 'static)) -> bool {
    chain(error).any(never_sent_link)
}

/// [`is_never_sent`] for one link of a chain.
pub(crate) fn never_sent_link(link: &(dyn StdError + 'static)) -> bool {
    if link.is::<NeverSent>() || link.is::<RefusedByClient>() {
        return true;
    }
    #[cfg(feature = "http")]
    if link.is::<ConnectFailed>()
        || link
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
        || unprocessed_link(link).is_some()
    {
        return true;
    }
    false
}

/// A link in an error chain that says the client refused to send the
/// request, for a reason of the caller's (a CONNECT, a scheme the endpoint
/// does not speak), which would be the same on any endpoint: not retried,
/// and not held against the endpoint.
/// Transparent: it prints as its reason, whose `source()` is its own, so
/// the reason is not printed twice.
pub(crate) struct RefusedByClient {
    reason: BoxError,
}

// Only the HTTP glue refuses requests so far.
#[cfg(feature = "http")]
impl RefusedByClient {
    pub(crate) fn new(reason: impl Into<BoxError>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Debug for RefusedByClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RefusedByClient")
            .field(&self.reason)
            .finish()
    }
}

impl fmt::Display for RefusedByClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.reason, f)
    }
}

impl StdError for RefusedByClient {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.reason.source()
    }
}

/// A connection to an endpoint could not be made (refused, timed out, the
/// HTTP/2 handshake failed): no byte of any call was sent on it. It says
/// "never sent" by itself ([`is_never_sent`] finds it in a chain), so a call
/// that fails with it may be sent elsewhere whatever its method.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Debug, Clone)]
pub struct ConnectFailed {
    addr: std::net::SocketAddr,
    source: Arc<dyn StdError + Send + Sync>,
}

#[cfg(feature = "http")]
impl ConnectFailed {
    pub(crate) fn new(addr: std::net::SocketAddr, source: impl Into<BoxError>) -> Self {
        Self {
            addr,
            source: Arc::from(source.into()),
        }
    }

    /// The address it was for.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

#[cfg(feature = "http")]
impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot connect to {}", self.addr)
    }
}

#[cfg(feature = "http")]
impl StdError for ConnectFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// How an HTTP/2 server said that it did not process a request's stream,
/// so that the request may be sent again whatever its method.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unprocessed {
    /// The server reset the stream with `REFUSED_STREAM`: "closed prior to
    /// any processing having occurred" (RFC 9113, 8.7). A server does this
    /// when it will not take more work (its stream limit, overload): the
    /// endpoint's failure, as a 503 would be.
    Refused,
    /// The server is shutting down gracefully (a deploy, a reload): its
    /// `GOAWAY` with `NO_ERROR` named a last stream below this one, which it
    /// "might still complete" no stream above (RFC 9113, 6.8). Not the
    /// endpoint's failure.
    GoingAway,
}

/// Whether `error`'s chain holds the server's word that it did not process
/// the request's HTTP/2 stream, and which word.
///
/// h2 hands a received `GOAWAY` only to the streams above its last stream
/// id, and a stream opened after it to a new request, so a remote `GOAWAY`
/// error on a stream proves it unprocessed, but only with `NO_ERROR`: a
/// connection ended with an error code gives that code to every stream,
/// processed or not. Likewise only a reset of the stream itself proves
/// `REFUSED_STREAM`, not a `GOAWAY` that carries that code.
#[cfg(feature = "http")]
pub(crate) fn unprocessed_stream(error: &(dyn StdError + 'static)) -> Option<Unprocessed> {
    chain(error).find_map(unprocessed_link)
}

/// [`unprocessed_stream`] for one link of the chain.
#[cfg(feature = "http")]
pub(crate) fn unprocessed_link(link: &(dyn StdError + 'static)) -> Option<Unprocessed> {
    let h2 = link.downcast_ref::<h2::Error>()?;
    if !h2.is_remote() {
        return None;
    }
    match h2.reason()? {
        h2::Reason::REFUSED_STREAM if h2.is_reset() => Some(Unprocessed::Refused),
        h2::Reason::NO_ERROR if h2.is_go_away() => Some(Unprocessed::GoingAway),
        _ => None,
    }
}

/// The connection under the request died: closed before the response was
/// complete, reset, a broken pipe (see [`is_connection_broken`]), or an
/// HTTP/2 connection-level error (a `GOAWAY` with an error code). Every
/// request on that connection fails at once, so the balancer counts such
/// failures as one burst (see `Endpoint::record_connection_lost`).
pub(crate) fn is_connection_lost(error: &(dyn StdError + 'static)) -> bool {
    chain(error).any(|link| {
        #[cfg(feature = "http")]
        {
            if link
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
                || link
                    .downcast_ref::<h2::Error>()
                    .is_some_and(h2::Error::is_go_away)
            {
                return true;
            }
        }
        is_connection_broken(link)
    })
}

/// One link of an error chain says the connection broke under the request:
/// reset by the peer, a broken pipe, closed before the answer was complete.
/// hyper reports it as an I/O error, in its own chain or inside h2's error
/// (which has no `source()`), or as a closed or incomplete message.
pub(crate) fn is_connection_broken(link: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind;
    let io = link.downcast_ref::<std::io::Error>();
    #[cfg(feature = "http")]
    let io = io.or_else(|| link.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
    if let Some(io) = io {
        return matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
                | ErrorKind::NotConnected
        );
    }
    #[cfg(feature = "http")]
    if let Some(hyper) = link.downcast_ref::<hyper::Error>() {
        return hyper.is_closed() || hyper.is_incomplete_message();
    }
    false
}

/// `error`, then each of its `source()`s in turn.
pub(crate) fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&err| err.source())
}

/// Wraps an endpoint error that proves the request was never sent (connect
/// refused, connection failed before the request was written).
///
/// Endpoint services other than the built-in HTTP glue return this (or put it
/// in their error's `source()` chain) to tell retry layers that resending is
/// safe even for non-idempotent requests.
///
/// ```
/// use tower_lb::error::{is_never_sent, NeverSent};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let err = NeverSent::new(refused);
/// assert!(is_never_sent(&err));
/// ```
pub struct NeverSent {
    source: BoxError,
}

impl NeverSent {
    /// Marks `source` as a failure that happened before the request was sent.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Debug for NeverSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NeverSent").field(&self.source).finish()
    }
}

impl fmt::Display for NeverSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Why is the source's to tell.
        f.write_str("the request was never sent")
    }
}

impl StdError for NeverSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message of `error`'s chain, outside in.
    fn messages(error: &(dyn StdError + 'static)) -> Vec<String> {
        chain(error).map(ToString::to_string).collect()
    }

    #[test]
    fn no_endpoints_message_says_how_long_it_waited() {
        let err = Error::NoEndpoints {
            waited: Duration::from_millis(250),
        };
        assert_eq!(
            err.to_string(),
            "no endpoints available: none appeared within 250ms"
        );
    }

    #[test]
    fn endpoint_error_says_its_own_part_and_hands_out_the_inner_error() {
        let inner = std::io::Error::other("boom");
        let err = Error::Endpoint {
            endpoint: "127.0.0.1:80".into(),
            source: Box::new(inner),
        };
        assert_eq!(err.to_string(), "endpoint 127.0.0.1:80 failed");
        assert_eq!(err.source().map(|s| s.to_string()), Some("boom".into()));
        assert!(!err.is_never_sent());
    }

    #[test]
    fn never_sent_marker_is_found_anywhere_in_the_chain() {
        let err = Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(NeverSent::new("refused")),
        };
        assert!(err.is_never_sent());
        assert_eq!(
            messages(&err),
            ["endpoint a failed", "the request was never sent", "refused"]
        );
    }

    #[test]
    fn a_chain_printed_link_by_link_says_each_message_once() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::Endpoint {
            endpoint: "127.0.0.1:80".into(),
            source: Box::new(NeverSent::new(refused)),
        };
        let printed: String = messages(&err).join("\n");
        for message in ["127.0.0.1:80", "never sent", "refused"] {
            assert_eq!(printed.matches(message).count(), 1, "{printed}");
        }
        assert_eq!(
            report(&err).to_string(),
            "endpoint 127.0.0.1:80 failed: the request was never sent: refused"
        );
    }

    #[test]
    fn durations_print_rounded_to_the_unit_a_reader_needs() {
        let cases = [
            (Duration::from_secs(5), "5.0s"),
            (Duration::from_micros(5_000_123), "5.0s"),
            (Duration::from_millis(1_450), "1.5s"),
            (Duration::from_secs(90), "90.0s"),
            (Duration::from_nanos(999_700_000), "1.0s"),
            (Duration::from_millis(300), "300ms"),
            (Duration::from_nanos(300_000_001), "300ms"),
            (Duration::from_micros(1_499), "1ms"),
            (Duration::from_micros(999), "999µs"),
            (Duration::from_nanos(999_600), "1ms"),
            (Duration::from_nanos(250_400), "250µs"),
            (Duration::ZERO, "0µs"),
        ];
        for (d, printed) in cases {
            assert_eq!(duration(&d).to_string(), printed, "{d:?}");
        }
    }

    #[test]
    fn counts_are_singular_for_one_only() {
        let err = |in_flight| Error::ShutdownTimedOut {
            waited: Duration::from_secs(5),
            in_flight,
        };
        assert_eq!(
            err(1).to_string(),
            "shutdown gave up after 5.0s with 1 request still in flight"
        );
        assert_eq!(
            err(2).to_string(),
            "shutdown gave up after 5.0s with 2 requests still in flight"
        );
        assert_eq!(
            Error::NoPick { endpoints: 1 }.to_string(),
            "the balancing strategy picked none of the 1 eligible endpoint"
        );
        assert_eq!(
            Error::AllEjected { endpoints: 1 }.to_string(),
            "the only endpoint is ejected by outlier detection and panic mode is off"
        );
        assert_eq!(
            Error::AllEjected { endpoints: 3 }.to_string(),
            "all 3 endpoints are ejected by outlier detection and panic mode is off"
        );
        assert_eq!(
            Error::AllOutOfService {
                endpoints: 2,
                failing_checks: 2
            }
            .to_string(),
            "all 2 endpoints are out of service (failing their health check or not passed it yet) and panic mode is off"
        );
        assert_eq!(
            Error::AllOutOfService {
                endpoints: 3,
                failing_checks: 1
            }
            .to_string(),
            "all 3 endpoints are out of service (1 failing their health check or not passed it yet, 2 ejected by outlier detection) and panic mode is off"
        );
    }
}
