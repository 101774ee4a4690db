//! Outcome classification: whether a response counts as a success or a
//! failure of the endpoint that sent it.
//!
//! The balancer asks its [`Classify`] about every response and every error,
//! and feeds the verdict to the endpoint's health counters (the failure
//! counts that [outlier detection](crate::health) reads). The verdict is
//! about the endpoint's health, not about the caller's request: a `404` or an
//! `INVALID_ARGUMENT` says nothing bad about the server that sent it.
//!
//! - [`ErrorsAsFailures`] (the default) counts every response as a success and
//!   every error (connection refused or reset, a timeout layered inside the
//!   endpoint service) as a failure.
//! - [`HttpClassify`] (feature `http`) adapts any classifier from
//!   [`tower_http::classify`]: [`HttpClassify::server_errors`] counts 5xx as
//!   failures, [`HttpClassify::grpc`] reads the gRPC status from the response
//!   headers (trailers-only responses) or, when it is not there, from the
//!   trailers at the end of the body. Reusing tower-http keeps one definition
//!   of "failure" across a stack that also uses its `Trace` layer.
//!
//! A verdict that needs the end of the body (gRPC trailers) is reported when
//! the body ends, through the [`OutcomeReport`] the classifier keeps; a body
//! dropped before its end reports nothing.
//!
//! Writing your own, for a non-HTTP protocol:
//!
//! ```
//! use tower_lb::classify::{Classify, Outcome, OutcomeReport};
//!
//! /// Answers are `Result`s from the server; an `Err` means it is unwell.
//! #[derive(Clone)]
//! struct ServerErrors;
//!
//! impl Classify<Result<String, String>> for ServerErrors {
//!     type Response = Result<String, String>;
//!
//!     fn classify_response(&self, response: Self::Response, report: OutcomeReport) -> Self::Response {
//!         report.report(if response.is_ok() { Outcome::Success } else { Outcome::Failure });
//!         response
//!     }
//! }
//! ```
//!
#![cfg_attr(
    feature = "http",
    doc = "
[`HttpClassify`]: HttpClassify
[`HttpClassify::server_errors`]: HttpClassify::server_errors
[`HttpClassify::grpc`]: HttpClassify::grpc
[`tower_http::classify`]: tower_http::classify
"
)]
#![cfg_attr(
    not(feature = "http"),
    doc = "
[`HttpClassify`]: crate#cargo-features
[`HttpClassify::server_errors`]: crate#cargo-features
[`HttpClassify::grpc`]: crate#cargo-features
"
)]
#![cfg_attr(
    not(feature = "http"),
    doc = "[`tower_http::classify`]: https://docs.rs/tower-http/0.7/tower_http/classify/index.html"
)]

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::load::{LoadExtractor, LoadReport, LoadReportError};

/// What a response or error says about the endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The endpoint did its job.
    Success,
    /// The endpoint failed: it counts towards its consecutive failures and
    /// its failure rate.
    Failure,
}

/// Where an outcome goes: an endpoint's health counters.
pub(crate) trait RecordOutcome: Send + Sync {
    fn record_outcome(&self, outcome: Outcome);
    /// The endpoint said it is overloaded, or asked for a pause: its cost
    /// rises, its health does not suffer.
    fn record_overload(&self, pause: Option<Duration>);
    fn record_load(&self, report: &LoadReport);
    fn record_malformed_load(&self, error: &LoadReportError);
}

/// A one-shot handle that records the outcome of one request on the endpoint
/// that served it.
///
/// [`Classify::classify_response`] gets one per response. Report at once, or
/// keep it (inside a body wrapper, say) and report when the verdict is known.
/// Dropping it unreported records nothing, which is right for a response the
/// caller abandoned.
pub struct OutcomeReport {
    endpoint: Option<Arc<dyn RecordOutcome>>,
}

impl OutcomeReport {
    pub(crate) fn new(endpoint: Arc<dyn RecordOutcome>) -> Self {
        Self {
            endpoint: Some(endpoint),
        }
    }

    /// A report that goes nowhere, for testing a classifier on its own.
    pub fn detached() -> Self {
        Self { endpoint: None }
    }

    /// Records `outcome` on the endpoint.
    #[inline]
    pub fn report(mut self, outcome: Outcome) {
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.record_outcome(outcome);
        }
    }

    /// Records that the endpoint said it is overloaded (HTTP 429, gRPC
    /// `RESOURCE_EXHAUSTED`) or asked for a pause (`Retry-After`,
    /// `grpc-retry-pushback-ms`, given as `pause`), with or without the
    /// outcome. It raises the endpoint's cost for P2C as a failure does,
    /// by more for a longer pause (each second of it weighs as much as a
    /// second's decay of the cost, up to [`MAX_PAUSE`](crate::load::MAX_PAUSE)), and counts
    /// nothing against its health: an overloaded server is busy, not sick.
    pub fn overloaded(&self, pause: Option<Duration>) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.record_overload(pause);
        }
    }

    /// Records a load report the endpoint sent with its response, for
    /// [weighted round robin](crate::strategy::WeightedRoundRobin). Any
    /// number of them, before or after the outcome.
    pub fn load(&self, report: &LoadReport) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.record_load(report);
        }
    }

    /// Counts a load report that could not be read (it shows in the
    /// endpoint's stats, with a `debug` event); it changes no weight.
    pub fn malformed_load(&self, error: &LoadReportError) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.record_malformed_load(error);
        }
    }

    /// Reads a load report with `extractor` and records it, or counts it as
    /// malformed.
    pub fn load_from<X: LoadExtractor>(
        &self,
        extractor: &X,
        headers: &::http::HeaderMap,
        trailers: bool,
    ) {
        let found = if trailers {
            extractor.from_trailers(headers)
        } else {
            extractor.from_headers(headers)
        };
        match found {
            Some(Ok(report)) => self.load(&report),
            Some(Err(error)) => self.malformed_load(&error),
            None => {}
        }
    }
}

impl fmt::Debug for OutcomeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutcomeReport")
            .field("detached", &self.endpoint.is_none())
            .finish()
    }
}

/// Decides whether responses and errors count as successes or failures of
/// the endpoint, and may wrap the response to decide later.
///
/// Implementations are cloned into each response future, so they should be
/// cheap handles (most are zero-sized or a few bytes).
pub trait Classify<Resp>: Clone + Send + Sync + 'static {
    /// The response handed to the caller: `Resp` itself, or `Resp` with its
    /// body wrapped to watch for the end of the stream.
    type Response;

    /// Classifies a response: report through `report` now, or keep it and
    /// report once the verdict is known.
    fn classify_response(&self, response: Resp, report: OutcomeReport) -> Self::Response;

    /// Classifies an error from the endpoint service. `None` when the error
    /// says nothing about the endpoint (the client refused to send the
    /// request). The default: [`default_error_outcome`].
    fn classify_error(&self, error: &(dyn StdError + Send + Sync + 'static)) -> Option<Outcome> {
        default_error_outcome(error)
    }
}

/// The default verdict on an error: a failure (connection refused or reset,
/// attempt timeouts, protocol errors), except for errors that say nothing
/// about the endpoint:
///
/// - a request the client refused to send (the HTTP glue's invalid-URI
///   errors), which is the caller's doing;
/// - an HTTP/2 stream the server left unprocessed as it shut down
///   gracefully (a `GOAWAY` with `NO_ERROR`, as in a deploy or a reload):
///   routine, and the request is resent elsewhere. A `REFUSED_STREAM`
///   still counts: the server is up but will not take the work;
/// - the call's deadline running out inside the endpoint service (tonic's own
///   `grpc-timeout` timer, say): the caller's time was up, which a healthy
///   endpoint cannot help. Slowness is the latency detector's business.
pub fn default_error_outcome(error: &(dyn StdError + Send + Sync + 'static)) -> Option<Outcome> {
    let cause = crate::cause::Cause::of(error);
    if cause.refused_by_client || cause.server_going_away || cause.deadline {
        return None;
    }
    Some(Outcome::Failure)
}

/// The trailer's name as a constant: a lookup by it neither parses nor
/// lowercases a string, and this runs on every response.
pub(crate) const GRPC_STATUS: ::http::HeaderName = ::http::HeaderName::from_static("grpc-status");

/// A `grpc-status` value's code, read as gRPC clients read it: one digit,
/// or `10` to `16`. Anything else (`+0`, `00`, `14 `, `OK`) is not a code,
/// and a client reads it as a failed call.
pub(crate) fn grpc_code(value: &::http::HeaderValue) -> Option<u8> {
    match *value.as_bytes() {
        [d @ b'0'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'6'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// The gRPC status code in `headers` (or trailers), if there is a valid one.
pub(crate) fn grpc_status(headers: &::http::HeaderMap) -> Option<u8> {
    crate::header::get(headers, &GRPC_STATUS).and_then(grpc_code)
}

/// The gRPC status codes the crate reads by name.
pub(crate) mod grpc_codes {
    /// The caller's deadline ran out, or the server's own.
    #[cfg(feature = "http")]
    pub(crate) const DEADLINE_EXCEEDED: u8 = 4;
    /// The server (or a quota) is overloaded.
    #[cfg(feature = "http")]
    pub(crate) const RESOURCE_EXHAUSTED: u8 = 8;
    /// The service is not there for this call: the one code retried.
    pub(crate) const UNAVAILABLE: u8 = 14;
}

/// Every response is a success, every error a failure: the default, for any
/// response type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorsAsFailures;

impl<Resp> Classify<Resp> for ErrorsAsFailures {
    type Response = Resp;

    fn classify_response(&self, response: Resp, report: OutcomeReport) -> Resp {
        report.report(Outcome::Success);
        response
    }
}

#[cfg(feature = "http")]
mod grpc;
#[cfg(feature = "http")]
mod http;
pub(crate) mod pushback;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::grpc::{GrpcClassifier, GrpcClassifyEos};
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::http::{ClassifiedBody, HttpClassify};

/// A verdict as an outcome.
#[cfg(feature = "http")]
fn outcome(success: bool) -> Outcome {
    if success {
        Outcome::Success
    } else {
        Outcome::Failure
    }
}

/// What the classifiers' tests share: a recorder of what was reported.
#[cfg(test)]
mod testing {
    use std::sync::{Arc, Mutex};

    use super::{LoadReport, LoadReportError, Outcome, OutcomeReport, RecordOutcome};

    /// Remembers what was reported: outcomes, load reports, malformed ones.
    #[derive(Default)]
    pub(crate) struct Recorder(
        pub(crate) Mutex<Vec<Outcome>>,
        pub(crate) Mutex<Vec<LoadReport>>,
        pub(crate) Mutex<usize>,
        pub(crate) Mutex<Vec<Option<std::time::Duration>>>,
    );

    impl RecordOutcome for Recorder {
        fn record_outcome(&self, outcome: Outcome) {
            self.0.lock().expect("lock").push(outcome);
        }

        fn record_load(&self, report: &LoadReport) {
            self.1.lock().expect("lock").push(report.clone());
        }

        fn record_malformed_load(&self, _: &LoadReportError) {
            *self.2.lock().expect("lock") += 1;
        }

        fn record_overload(&self, pause: Option<std::time::Duration>) {
            self.3.lock().expect("lock").push(pause);
        }
    }

    pub(crate) fn recorder() -> (Arc<Recorder>, OutcomeReport) {
        let recorder = Arc::new(Recorder::default());
        let report = OutcomeReport::new(recorder.clone());
        (recorder, report)
    }

    pub(crate) fn outcomes(recorder: &Recorder) -> Vec<Outcome> {
        recorder.0.lock().expect("lock").clone()
    }

    pub(crate) fn overloads(recorder: &Recorder) -> Vec<Option<std::time::Duration>> {
        recorder.3.lock().expect("lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{outcomes, recorder};
    use super::*;

    #[test]
    fn errors_as_failures_counts_every_response_as_a_success() {
        let (recorder, report) = recorder();
        assert_eq!(ErrorsAsFailures.classify_response(7, report), 7);
        assert_eq!(outcomes(&recorder), vec![Outcome::Success]);
    }

    #[test]
    fn an_error_is_a_failure_by_default() {
        let error = std::io::Error::other("connection reset");
        assert_eq!(
            <ErrorsAsFailures as Classify<()>>::classify_error(&ErrorsAsFailures, &error),
            Some(Outcome::Failure)
        );
    }

    #[test]
    fn a_dropped_report_records_nothing() {
        let (recorder, report) = recorder();
        drop(report);
        assert!(outcomes(&recorder).is_empty());
    }
}
