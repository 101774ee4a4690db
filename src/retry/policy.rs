//! What the retry layer retries, how many times and how fast.

use std::time::{Duration, SystemTime};

use http::StatusCode;

use super::backoff::Backoff;
use crate::cause::Cause;
use crate::classify::pushback::{pushback, Pushback};
use crate::request::Safety;
use crate::setting::{self, InvalidSetting};

/// How the retry layer decides: attempts, backoff, the most pushback it
/// honours, and which outcomes deserve another attempt.
///
/// Whatever the policy says, a request whose [`Safety`] is
/// [`Unsafe`](Safety::Unsafe) is sent again only when the error proves it
/// never reached the endpoint (see [`is_never_sent`](crate::error::is_never_sent)),
/// and no request is retried once a response it accepts has arrived.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::retry::{Backoff, HttpRetryOn, RetryPolicy};
///
/// let policy = RetryPolicy::new()
///     .max_attempts(4)?
///     .backoff(Backoff::new().initial(Duration::from_millis(50)))
///     .retry_on(HttpRetryOn::new().status(http::StatusCode::TOO_MANY_REQUESTS));
/// # let _ = policy;
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone)]
pub struct RetryPolicy<C = HttpRetryOn> {
    pub(crate) max_attempts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) max_pushback: Duration,
    pub(crate) retry_timeouts: bool,
    pub(crate) retry_endpoint_errors: bool,
    pub(crate) on: C,
}

impl RetryPolicy {
    /// The defaults: 3 attempts, [`Backoff::new`] (25 ms doubling to 250 ms,
    /// ±20 % jitter), pushback honoured up to 10 s, and [`HttpRetryOn::new`]:
    /// connection failures, per-attempt timeouts, HTTP 502, 503 and 504 and
    /// gRPC `UNAVAILABLE`.
    pub fn new() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::new(),
            max_pushback: Duration::from_secs(10),
            retry_timeouts: true,
            retry_endpoint_errors: true,
            on: HttpRetryOn::new(),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryPolicy<C> {
    /// Attempts per call, the first included; 1 turns retries off.
    ///
    /// # Errors
    ///
    /// When `attempts` is 0: a call makes at least its first attempt.
    pub fn max_attempts(mut self, attempts: u32) -> Result<Self, InvalidSetting> {
        self.max_attempts = setting::at_least_one("RetryPolicy::max_attempts", attempts)?;
        Ok(self)
    }

    /// The pause before each retry.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest server pushback (`Retry-After`, `grpc-retry-pushback-ms`)
    /// the layer waits out; a server asking for longer gets its response
    /// returned instead. Default 10 s.
    pub fn max_pushback(mut self, max: Duration) -> Self {
        self.max_pushback = max;
        self
    }

    /// Whether a per-attempt [`Timeout`](crate::timeout::Timeout) is
    /// retried (for requests that may repeat). Default true.
    pub fn retry_timeouts(mut self, on: bool) -> Self {
        self.retry_timeouts = on;
        self
    }

    /// Whether an endpoint's failure before it answered (a reset, a broken
    /// connection) is retried, for requests that may repeat. Default true.
    /// Failures that prove the request was never sent are retried either
    /// way.
    pub fn retry_endpoint_errors(mut self, on: bool) -> Self {
        self.retry_endpoint_errors = on;
        self
    }

    /// Which responses deserve another attempt.
    pub fn retry_on<D>(self, on: D) -> RetryPolicy<D> {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            max_pushback: self.max_pushback,
            retry_timeouts: self.retry_timeouts,
            retry_endpoint_errors: self.retry_endpoint_errors,
            on,
        }
    }

    /// Whether `error`, from an attempt of a request of class `safety`,
    /// deserves another attempt.
    pub(crate) fn retries_error(
        &self,
        error: &(dyn std::error::Error + 'static),
        safety: Safety,
    ) -> bool {
        let cause = Cause::of(error);
        // Checked first: a request the client refused to address is "never
        // sent" too, but another endpoint would refuse it the same way.
        if cause.refused_by_client {
            return false;
        }
        if cause.never_sent {
            return true;
        }
        if !safety.may_repeat() {
            return false;
        }
        if cause.attempt_timeout {
            return self.retry_timeouts;
        }
        // An endpoint failed to answer, as opposed to the balancer having
        // nowhere to send the request, or being closed.
        self.retry_endpoint_errors && cause.endpoint_failed
    }
}

/// What the retry layer makes of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseVerdict {
    /// The response stands: return it.
    Accept,
    /// Worth another attempt (for requests that may repeat), after the
    /// server's pushback if it sent one, else after the backoff.
    Retry {
        /// The server's pushback.
        after: Option<Duration>,
    },
}

/// Which responses deserve another attempt.
///
/// A response means the request reached the endpoint, so only requests that
/// may repeat are retried on one, whatever the verdict.
pub trait RetryOn<Resp>: Send + Sync + 'static {
    /// The verdict on `response`.
    fn response(&self, response: &Resp) -> ResponseVerdict;
}

/// Retries no response: only errors.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsOnly;

impl<Resp> RetryOn<Resp> for ErrorsOnly {
    fn response(&self, _: &Resp) -> ResponseVerdict {
        ResponseVerdict::Accept
    }
}

/// Retries HTTP responses by status, and gRPC responses by the
/// `grpc-status` of a trailers-only response (how gRPC servers send errors
/// without a body), honouring server pushback.
///
/// A gRPC status that arrives in trailers, after a response body has begun,
/// is not retried: the call is committed by then, as in gRPC's A6.
#[derive(Debug, Clone)]
pub struct HttpRetryOn {
    /// Bit `s - 100` set for each retried status `s` (100 to 999, all that
    /// `http` accepts).
    statuses: [u64; 15],
    /// Bit `c` set for each retried gRPC code `c` (0..=16).
    grpc_codes: u32,
}

use crate::classify::grpc_codes::UNAVAILABLE as GRPC_UNAVAILABLE;

impl HttpRetryOn {
    /// HTTP 502, 503, 504 and gRPC `UNAVAILABLE` (14).
    pub fn new() -> Self {
        Self::none()
            .status(StatusCode::BAD_GATEWAY)
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .status(StatusCode::GATEWAY_TIMEOUT)
            .with_grpc_code(GRPC_UNAVAILABLE)
    }

    /// Retries no response (but still reads pushback for nothing); add
    /// statuses and codes to it.
    pub fn none() -> Self {
        Self {
            statuses: [0; 15],
            grpc_codes: 0,
        }
    }

    /// Retries responses with `status` too.
    pub fn status(mut self, status: StatusCode) -> Self {
        if let Some((word, bit)) = status_bit(status) {
            if let Some(word) = self.statuses.get_mut(word) {
                *word |= 1 << bit;
            }
        }
        self
    }

    /// Retries gRPC responses with `code` too.
    ///
    /// # Errors
    ///
    /// When `code` is not a gRPC status code (0 to 16).
    pub fn grpc_code(self, code: u8) -> Result<Self, InvalidSetting> {
        let code = setting::check(
            "HttpRetryOn::grpc_code",
            code,
            code <= 16,
            "a gRPC status code, 0 to 16",
        )?;
        Ok(self.with_grpc_code(code))
    }

    /// `grpc_code` for a code known to be one.
    const fn with_grpc_code(mut self, code: u8) -> Self {
        self.grpc_codes |= 1 << code;
        self
    }

    fn retries_status(&self, status: StatusCode) -> bool {
        status_bit(status)
            .and_then(|(word, bit)| self.statuses.get(word).map(|w| w & (1 << bit) != 0))
            .unwrap_or(false)
    }

    fn retries_grpc(&self, headers: &http::HeaderMap) -> bool {
        crate::classify::grpc_status(headers).is_some_and(|c| self.grpc_codes & (1 << c) != 0)
    }
}

/// The word and bit of `status` in the table.
fn status_bit(status: StatusCode) -> Option<(usize, u32)> {
    let bit = usize::from(status.as_u16().checked_sub(100)?);
    Some((bit / 64, (bit % 64) as u32))
}

impl Default for HttpRetryOn {
    fn default() -> Self {
        Self::new()
    }
}

impl<B> RetryOn<http::Response<B>> for HttpRetryOn {
    fn response(&self, response: &http::Response<B>) -> ResponseVerdict {
        let headers = response.headers();
        if !self.retries_status(response.status()) && !self.retries_grpc(headers) {
            return ResponseVerdict::Accept;
        }
        match pushback(headers, SystemTime::now()) {
            Some(Pushback::DoNotRetry) => ResponseVerdict::Accept,
            Some(Pushback::RetryAfter(after)) => ResponseVerdict::Retry { after: Some(after) },
            None => ResponseVerdict::Retry { after: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_code_above_16_is_refused_by_name() {
        for bad in [17, 255] {
            let error = HttpRetryOn::none().grpc_code(bad).unwrap_err();
            assert_eq!(error.setting(), "HttpRetryOn::grpc_code");
        }
    }

    #[test]
    fn zero_attempts_are_refused_by_name() {
        let error = RetryPolicy::new().max_attempts(0).unwrap_err();
        assert_eq!(error.setting(), "RetryPolicy::max_attempts");
        assert_eq!(error.value(), "0");
    }

    fn response(status: u16, headers: &[(&'static str, &'static str)]) -> http::Response<()> {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn gateway_errors_are_retried() {
        let on = HttpRetryOn::new();
        for status in [502, 503, 504] {
            assert_eq!(
                on.response(&response(status, &[])),
                ResponseVerdict::Retry { after: None }
            );
        }
    }

    #[test]
    fn other_statuses_stand() {
        let on = HttpRetryOn::new();
        for status in [200, 400, 404, 429, 500] {
            assert_eq!(on.response(&response(status, &[])), ResponseVerdict::Accept);
        }
    }

    #[test]
    fn grpc_unavailable_in_a_trailers_only_response_is_retried() {
        let on = HttpRetryOn::new();
        let unavailable = response(200, &[("grpc-status", "14")]);
        let invalid = response(200, &[("grpc-status", "3")]);
        assert_eq!(
            on.response(&unavailable),
            ResponseVerdict::Retry { after: None }
        );
        assert_eq!(on.response(&invalid), ResponseVerdict::Accept);
    }

    #[test]
    fn retry_after_is_the_pause() {
        let on = HttpRetryOn::new();
        let resp = response(503, &[("retry-after", "2")]);
        assert_eq!(
            on.response(&resp),
            ResponseVerdict::Retry {
                after: Some(Duration::from_secs(2))
            }
        );
    }

    #[test]
    fn negative_grpc_pushback_means_no_retry() {
        let on = HttpRetryOn::new();
        let resp = response(
            200,
            &[("grpc-status", "14"), ("grpc-retry-pushback-ms", "-1")],
        );
        assert_eq!(on.response(&resp), ResponseVerdict::Accept);
    }

    #[test]
    fn any_status_http_accepts_is_judged_without_panic() {
        let on = HttpRetryOn::new().status(StatusCode::from_u16(999).unwrap_or_default());
        assert_eq!(on.response(&response(799, &[])), ResponseVerdict::Accept);
        assert_eq!(
            on.response(&response(999, &[])),
            ResponseVerdict::Retry { after: None }
        );
    }

    #[test]
    fn added_statuses_are_retried() {
        let on = HttpRetryOn::none().status(StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            on.response(&response(429, &[])),
            ResponseVerdict::Retry { after: None }
        );
        assert_eq!(on.response(&response(503, &[])), ResponseVerdict::Accept);
    }

    fn endpoint_error(source: crate::error::BoxError) -> crate::Error {
        crate::Error::Endpoint {
            endpoint: "a".into(),
            source,
        }
    }

    #[test]
    fn never_sent_errors_are_retried_even_for_unsafe_requests() {
        let policy = RetryPolicy::new();
        let err = endpoint_error(Box::new(crate::error::NeverSent::new("refused")));
        assert!(policy.retries_error(&err, Safety::Unsafe));
    }

    #[test]
    fn endpoint_failures_are_retried_only_for_requests_that_may_repeat() {
        let policy = RetryPolicy::new();
        let err = endpoint_error("connection reset".into());
        assert!(policy.retries_error(&err, Safety::Safe));
        assert!(policy.retries_error(&err, Safety::Idempotent));
        assert!(!policy.retries_error(&err, Safety::Unsafe));
    }

    #[test]
    fn attempt_timeouts_are_retried_only_for_requests_that_may_repeat() {
        let policy = RetryPolicy::new();
        let err =
            crate::timeout::Elapsed::new(crate::timeout::Timer::Attempt, Duration::from_millis(10));
        assert!(policy.retries_error(&err, Safety::Safe));
        assert!(!policy.retries_error(&err, Safety::Unsafe));
        assert!(!policy
            .retry_timeouts(false)
            .retries_error(&err, Safety::Safe));
    }

    #[test]
    fn balancer_errors_are_not_retried() {
        let policy = RetryPolicy::new();
        assert!(!policy.retries_error(&crate::Error::Closed, Safety::Safe));
        assert!(!policy.retries_error(&crate::Error::AllEjected { endpoints: 3 }, Safety::Safe));
    }

    #[cfg(feature = "http")]
    #[test]
    fn a_request_the_client_refused_is_not_retried() {
        let policy = RetryPolicy::new();
        let err = endpoint_error(Box::new(crate::http::HttpError::refused_for_test()));
        assert!(!policy.retries_error(&err, Safety::Safe));
    }
}
