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
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use self::http::{ClassifiedBody, GrpcClassifier, GrpcClassifyEos, HttpClassify};

#[cfg(feature = "http")]
mod http {
    use std::fmt;
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use http::{HeaderMap, StatusCode};
    use http_body::{Body, Frame, SizeHint};
    use pin_project_lite::pin_project;
    use tower_http::classify::{
        ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
        GrpcFailureClass, ServerErrorsAsFailures,
    };

    use super::{Classify, Outcome, OutcomeReport};
    use crate::load::{LoadExtractor, NoLoadReports};
    use crate::timeout::CallDeadline;

    /// Classifies `http::Response`s with a classifier from
    /// [`tower_http::classify`], watching the body's trailers when the
    /// verdict needs them.
    ///
    /// ```
    /// use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, StatusInRangeAsFailures};
    /// use tower_lb::classify::HttpClassify;
    ///
    /// // 5xx are failures.
    /// let http = HttpClassify::server_errors();
    /// // gRPC: the codes Envoy maps to 5xx are failures.
    /// let grpc = HttpClassify::grpc();
    /// // Anything tower-http can express: here 429 counts too.
    /// let custom = HttpClassify::new(StatusInRangeAsFailures::new(429..=599));
    /// # let _ = (http, grpc, custom);
    /// ```
    ///
    /// It also reads the load reports endpoints send (for
    /// [`WeightedRoundRobin`](crate::strategy::WeightedRoundRobin)) when
    /// given an extractor with [`load_reports`](HttpClassify::load_reports).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct HttpClassify<C = ServerErrorsAsFailures, L = NoLoadReports> {
        classifier: C,
        load: L,
    }

    impl<C> HttpClassify<C> {
        /// Adapts `classifier`.
        pub fn new(classifier: C) -> Self {
            Self {
                classifier,
                load: NoLoadReports,
            }
        }
    }

    impl<C, L> HttpClassify<C, L> {
        /// Reads each response's load report with `extractor` (from the
        /// headers, or for gRPC from the trailers) and records it on the
        /// endpoint: [`OrcaLoadReports`](crate::load::OrcaLoadReports) for
        /// the `endpoint-load-metrics` header and gRPC's
        /// `endpoint-load-metrics-bin`. A malformed report is counted in the
        /// endpoint's stats and otherwise ignored.
        ///
        /// ```
        /// use tower_lb::classify::HttpClassify;
        /// use tower_lb::load::OrcaLoadReports;
        ///
        /// let classify = HttpClassify::server_errors().load_reports(OrcaLoadReports);
        /// # let _ = classify;
        /// ```
        pub fn load_reports<M>(self, extractor: M) -> HttpClassify<C, M> {
            HttpClassify {
                classifier: self.classifier,
                load: extractor,
            }
        }
    }

    impl HttpClassify<ServerErrorsAsFailures> {
        /// HTTP status 5xx is a failure; anything else, 4xx included, is not.
        pub fn server_errors() -> Self {
            Self::new(ServerErrorsAsFailures::new())
        }
    }

    impl HttpClassify<GrpcClassifier> {
        /// gRPC status from the headers or the trailers: `UNKNOWN`,
        /// `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and
        /// `DATA_LOSS` (the codes Envoy maps to HTTP 5xx) are failures; the
        /// other codes describe the call, not the server, and are not. An HTTP
        /// status other than 200, or a response that ends without any
        /// `grpc-status`, is a failure too (see [`GrpcClassifier`]).
        pub fn grpc() -> Self {
            let not_the_servers_fault = [
                GrpcCode::Cancelled,
                GrpcCode::InvalidArgument,
                GrpcCode::NotFound,
                GrpcCode::AlreadyExists,
                GrpcCode::PermissionDenied,
                GrpcCode::ResourceExhausted,
                GrpcCode::FailedPrecondition,
                GrpcCode::Aborted,
                GrpcCode::OutOfRange,
                GrpcCode::Unauthenticated,
            ];
            let codes = not_the_servers_fault
                .into_iter()
                .fold(GrpcErrorsAsFailures::new(), |c, code| c.with_success(code));
            Self::new(GrpcClassifier::new(codes))
        }
    }

    /// tower-http's [`GrpcErrorsAsFailures`], plus three things a gRPC client
    /// knows that it does not: a response whose HTTP status is not 200 (a
    /// proxy's 503, a server that does not speak gRPC), a response that ends
    /// with no `grpc-status` at all, and a `grpc-status` that is not a code
    /// from 0 to 16, are failed calls (`UNAVAILABLE`, `UNKNOWN` or `INTERNAL`
    /// in gRPC's HTTP mapping), not successes.
    ///
    /// It reads `grpc-status` once from the headers and once from the
    /// trailers, by a constant name, and judges the code against the
    /// successes of `codes`, read from it once when the classifier is made:
    /// tower-http's own check parses the name from a string at every look,
    /// and with the checks above the status was looked up six times a call.
    #[derive(Debug, Clone)]
    pub struct GrpcClassifier {
        codes: GrpcErrorsAsFailures,
        successes: GrpcSuccesses,
    }

    impl GrpcClassifier {
        /// Judges the gRPC status with `codes` (which says which codes are
        /// successes).
        pub fn new(codes: GrpcErrorsAsFailures) -> Self {
            let successes = GrpcSuccesses::of(&codes);
            Self { codes, successes }
        }
    }

    /// The gRPC codes a classifier counts as successes, bit `c` for code `c`.
    #[derive(Debug, Clone, Copy)]
    struct GrpcSuccesses(u32);

    /// What the `grpc-status` of a header map says.
    enum GrpcVerdict {
        Success,
        /// A code the classifier does not count as a success.
        Failure,
        /// Not a code at all.
        Malformed(GrpcFailureClass),
    }

    impl GrpcSuccesses {
        /// Asks `codes` about each code once: tower-http keeps its set of
        /// successes to itself.
        fn of(codes: &GrpcErrorsAsFailures) -> Self {
            let mut bits = 0;
            for code in 0..=16u8 {
                let mut probe = http::Response::new(());
                probe
                    .headers_mut()
                    .insert(super::GRPC_STATUS, http::HeaderValue::from(u16::from(code)));
                if let ClassifiedResponse::Ready(Ok(())) = codes.clone().classify_response(&probe) {
                    bits |= 1 << code;
                }
            }
            Self(bits)
        }

        /// The verdict on the `grpc-status` in `headers`, `None` when there
        /// is none.
        fn judge(self, headers: &HeaderMap) -> Option<GrpcVerdict> {
            let value = headers.get(&super::GRPC_STATUS)?;
            Some(match super::grpc_code(value) {
                None => GrpcVerdict::Malformed(GrpcFailureClass::Error(format!(
                    "grpc-status {value:?} is not a gRPC code"
                ))),
                Some(code) if self.0 & (1 << code) != 0 => GrpcVerdict::Success,
                Some(_) => GrpcVerdict::Failure,
            })
        }
    }

    /// The failure class tower-http gives a failed call (its status, with
    /// the decoded `grpc-message`), asked only once the call is known to
    /// have failed: it has no constructor of its own.
    fn failure_class<B>(
        codes: &GrpcErrorsAsFailures,
        response: &http::Response<B>,
    ) -> GrpcFailureClass {
        match codes.clone().classify_response(response) {
            ClassifiedResponse::Ready(Err(class)) => class,
            _ => GrpcFailureClass::Error("a failed gRPC status".to_owned()),
        }
    }

    impl ClassifyResponse for GrpcClassifier {
        type FailureClass = GrpcFailureClass;
        type ClassifyEos = GrpcClassifyEos;

        fn classify_response<B>(
            self,
            response: &http::Response<B>,
        ) -> ClassifiedResponse<GrpcFailureClass, GrpcClassifyEos> {
            if response.status() != StatusCode::OK {
                let status = response.status();
                return ClassifiedResponse::Ready(Err(GrpcFailureClass::Error(format!(
                    "HTTP status {status} on a gRPC call"
                ))));
            }
            // A trailers-only response has its status in the headers.
            match self.successes.judge(response.headers()) {
                Some(GrpcVerdict::Success) => ClassifiedResponse::Ready(Ok(())),
                Some(GrpcVerdict::Failure) => {
                    ClassifiedResponse::Ready(Err(failure_class(&self.codes, response)))
                }
                Some(GrpcVerdict::Malformed(class)) => ClassifiedResponse::Ready(Err(class)),
                None => ClassifiedResponse::RequiresEos(GrpcClassifyEos {
                    codes: self.codes,
                    successes: self.successes,
                }),
            }
        }

        fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailureClass {
            self.codes.classify_error(error)
        }
    }

    /// The end-of-stream half of [`GrpcClassifier`].
    #[derive(Debug, Clone)]
    pub struct GrpcClassifyEos {
        codes: GrpcErrorsAsFailures,
        successes: GrpcSuccesses,
    }

    impl ClassifyEos for GrpcClassifyEos {
        type FailureClass = GrpcFailureClass;

        fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), GrpcFailureClass> {
            let Some(trailers) = trailers else {
                return Err(no_grpc_status());
            };
            match self.successes.judge(trailers) {
                Some(GrpcVerdict::Success) => Ok(()),
                Some(GrpcVerdict::Failure) => {
                    // Only on failure: a copy of the trailers for tower-http
                    // to read the status and message from.
                    let mut failed = http::Response::new(());
                    *failed.headers_mut() = trailers.clone();
                    Err(failure_class(&self.codes, &failed))
                }
                Some(GrpcVerdict::Malformed(class)) => Err(class),
                None => Err(no_grpc_status()),
            }
        }

        fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailureClass {
            self.codes.classify_error(error)
        }
    }

    fn no_grpc_status() -> GrpcFailureClass {
        GrpcFailureClass::Error("the gRPC response ended without a grpc-status".to_owned())
    }

    impl<C, L, B> Classify<http::Response<B>> for HttpClassify<C, L>
    where
        C: ClassifyResponse + Clone + Send + Sync + 'static,
        L: LoadExtractor,
        B: Body,
    {
        type Response = http::Response<ClassifiedBody<B, C::ClassifyEos, L>>;

        fn classify_response(
            &self,
            response: http::Response<B>,
            report: OutcomeReport,
        ) -> Self::Response {
            report.load_from(&self.load, response.headers(), false);
            let deadline = CallersDeadline::of(&response);
            let pending = match self.classifier.clone().classify_response(&response) {
                ClassifiedResponse::Ready(verdict) => {
                    deadline.report(report, verdict.is_ok(), Some(response.headers()));
                    None
                }
                // Nothing more will come: decide now rather than wait for a
                // poll that a caller who checks `is_end_stream` never makes.
                ClassifiedResponse::RequiresEos(eos) if response.body().is_end_stream() => {
                    deadline.report(report, eos.classify_eos(None).is_ok(), None);
                    None
                }
                ClassifiedResponse::RequiresEos(eos) => Some(Pending {
                    eos,
                    report,
                    load: self.load.clone(),
                    deadline,
                }),
            };
            response.map(|inner| ClassifiedBody { inner, pending })
        }
    }

    fn outcome(success: bool) -> Outcome {
        if success {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }

    /// The deadline the server was told, if any: then its
    /// `DEADLINE_EXCEEDED` may be the caller's doing, not the endpoint's.
    ///
    /// A gRPC server that enforces the `grpc-timeout` it was sent answers
    /// `DEADLINE_EXCEEDED` when the caller's time runs out, or at once when
    /// it sees that the time left cannot cover the work. Either way a healthy
    /// server did what it was asked; counting it would eject healthy
    /// endpoints whenever callers choose tight deadlines (and a client-side
    /// expiry of the same deadline counts as nothing either, see
    /// [`default_error_outcome`](super::default_error_outcome)). So such a
    /// failure is reported as nothing: neither a failure nor a success, so
    /// it neither extends nor breaks a streak of failures.
    ///
    /// Only while the caller's deadline is [nearly out](nearly_out) when
    /// the answer arrives, though: a server that answers `DEADLINE_EXCEEDED`
    /// with most of a long deadline left is speaking of its own (a
    /// dependency that timed out), and a broken one that answers so at once
    /// must still be ejected. An endpoint service says it told the server by
    /// leaving the call's [`CallDeadline`] in the response's extensions, as
    /// [`GrpcEndpoint`](crate::grpc::GrpcEndpoint) does.
    #[derive(Debug, Clone, Copy)]
    struct CallersDeadline {
        told: Option<CallDeadline>,
    }

    impl CallersDeadline {
        fn of<B>(response: &http::Response<B>) -> Self {
            Self {
                told: response.extensions().get::<CallDeadline>().copied(),
            }
        }

        /// Reports the verdict, unless it is a failure that only says the
        /// caller's deadline passed (`grpc-status: 4` in `status`, with the
        /// deadline nearly out).
        fn report(self, report: OutcomeReport, success: bool, status: Option<&HeaderMap>) {
            if !success {
                if let Some(deadline) = self.told {
                    let deadline_exceeded = status
                        .and_then(|headers| headers.get(&super::GRPC_STATUS))
                        .and_then(super::grpc_code)
                        == Some(GRPC_DEADLINE_EXCEEDED);
                    if deadline_exceeded && nearly_out(&deadline) {
                        return;
                    }
                }
            }
            report.report(outcome(success));
        }
    }

    /// Whether a call's deadline is nearly out: less than a second left, or
    /// less than a tenth of its budget. A server that gives up on a deadline
    /// answers a little before it passes (it propagates a shorter one to its
    /// own calls, or keeps a margin), and one that refuses a deadline too
    /// short for its work answers at once, with all of a short deadline
    /// left.
    fn nearly_out(deadline: &CallDeadline) -> bool {
        let slack = (deadline.budget() / 10).max(std::time::Duration::from_secs(1));
        deadline.remaining() <= slack
    }

    /// gRPC's `DEADLINE_EXCEEDED`.
    const GRPC_DEADLINE_EXCEEDED: u8 = 4;

    /// What a body waits for before it can report: the end-of-stream
    /// classifier, the report, the load extractor and the deadline rule.
    struct Pending<E, L> {
        eos: E,
        report: OutcomeReport,
        load: L,
        deadline: CallersDeadline,
    }

    pin_project! {
        /// A response body that reports its request's outcome when it ends:
        /// from the trailers, or as a failure if the body fails. A load
        /// report in the trailers is recorded too.
        pub struct ClassifiedBody<B, E, L = NoLoadReports> {
            #[pin]
            inner: B,
            pending: Option<Pending<E, L>>,
        }
    }

    impl<B, E, L> ClassifiedBody<B, E, L> {
        /// The wrapped body.
        pub fn into_inner(self) -> B {
            self.inner
        }
    }

    impl<B: fmt::Debug, E, L> fmt::Debug for ClassifiedBody<B, E, L> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ClassifiedBody")
                .field("inner", &self.inner)
                .field("awaiting_end_of_stream", &self.pending.is_some())
                .finish()
        }
    }

    impl<B, E, L> Body for ClassifiedBody<B, E, L>
    where
        B: Body,
        B::Error: fmt::Display + 'static,
        E: ClassifyEos,
        L: LoadExtractor,
    {
        type Data = B::Data;
        type Error = B::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            let mut this = self.project();
            let frame = ready!(this.inner.as_mut().poll_frame(cx));
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        if let Some(pending) = this.pending.take() {
                            pending.report.load_from(&pending.load, trailers, true);
                            let success = pending.eos.classify_eos(Some(trailers)).is_ok();
                            pending
                                .deadline
                                .report(pending.report, success, Some(trailers));
                        }
                    } else if this.inner.is_end_stream() {
                        // The last data frame of a body without trailers: a
                        // caller may stop here, so decide now.
                        if let Some(pending) = this.pending.take() {
                            let success = pending.eos.classify_eos(None).is_ok();
                            pending.report.report(outcome(success));
                        }
                    }
                }
                Some(Err(error)) => {
                    if let Some(pending) = this.pending.take() {
                        let _class = pending.eos.classify_error(error);
                        pending.report.report(Outcome::Failure);
                    }
                }
                None => {
                    if let Some(pending) = this.pending.take() {
                        let success = pending.eos.classify_eos(None).is_ok();
                        pending.report.report(outcome(success));
                    }
                }
            }
            Poll::Ready(frame)
        }

        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }

        fn size_hint(&self) -> SizeHint {
            self.inner.size_hint()
        }
    }

    impl<C> HttpClassify<C> {
        /// The adapted tower-http classifier.
        pub fn classifier(&self) -> &C {
            &self.classifier
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Remembers what was reported: outcomes, load reports, malformed ones.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Outcome>>, Mutex<Vec<LoadReport>>, Mutex<usize>);

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
    }

    fn recorder() -> (Arc<Recorder>, OutcomeReport) {
        let recorder = Arc::new(Recorder::default());
        let report = OutcomeReport::new(recorder.clone());
        (recorder, report)
    }

    fn outcomes(recorder: &Recorder) -> Vec<Outcome> {
        recorder.0.lock().expect("lock").clone()
    }

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

    #[cfg(feature = "http")]
    mod http {
        use ::http::HeaderMap;
        use http_body::{Body, Frame};
        use tower_http::classify::{
            ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
            GrpcFailureClass,
        };

        use super::*;

        /// A body of frames known in advance.
        struct Frames(std::collections::VecDeque<Result<Frame<&'static [u8]>, &'static str>>);

        impl Body for Frames {
            type Data = &'static [u8];
            type Error = &'static str;

            fn poll_frame(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
                std::task::Poll::Ready(self.0.pop_front())
            }

            fn is_end_stream(&self) -> bool {
                self.0.is_empty()
            }
        }

        fn grpc_body(trailer_status: Option<&'static str>) -> Frames {
            let mut frames = std::collections::VecDeque::new();
            frames.push_back(Ok(Frame::data(&b"message"[..])));
            if let Some(status) = trailer_status {
                let mut trailers = ::http::HeaderMap::new();
                trailers.insert("grpc-status", ::http::HeaderValue::from_static(status));
                frames.push_back(Ok(Frame::trailers(trailers)));
            }
            Frames(frames)
        }

        /// Polls the body to its end (it never waits).
        fn drain<B: Body + Unpin>(mut body: B) {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            while let std::task::Poll::Ready(Some(_)) =
                std::pin::Pin::new(&mut body).poll_frame(&mut cx)
            {}
        }

        fn status(code: u16) -> ::http::Response<http_body_util::Empty<&'static [u8]>> {
            let mut response = ::http::Response::new(http_body_util::Empty::new());
            *response.status_mut() = ::http::StatusCode::from_u16(code).expect("status");
            response
        }

        fn verdict(classify: &HttpClassify, code: u16) -> Vec<Outcome> {
            let (recorder, report) = recorder();
            let _ = classify.classify_response(status(code), report);
            outcomes(&recorder)
        }

        #[test]
        fn server_errors_are_failures_and_client_errors_are_not() {
            let classify = HttpClassify::server_errors();
            assert_eq!(verdict(&classify, 200), vec![Outcome::Success]);
            assert_eq!(verdict(&classify, 404), vec![Outcome::Success]);
            assert_eq!(verdict(&classify, 429), vec![Outcome::Success]);
            assert_eq!(verdict(&classify, 500), vec![Outcome::Failure]);
            assert_eq!(verdict(&classify, 503), vec![Outcome::Failure]);
        }

        #[test]
        fn grpc_status_in_the_headers_is_judged_at_once() {
            let (recorder, report) = recorder();
            let response = ::http::Response::builder()
                .header("grpc-status", "14")
                .body(grpc_body(None))
                .expect("response");
            let _ = HttpClassify::grpc().classify_response(response, report);
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        /// A gRPC response whose status 4 (`DEADLINE_EXCEEDED`) comes in the
        /// headers or in the trailers, for a call whose deadline the server
        /// was told (or not).
        fn deadline_exceeded(in_trailers: bool, told: bool) -> ::http::Response<Frames> {
            let mut response = if in_trailers {
                ::http::Response::new(grpc_body(Some("4")))
            } else {
                ::http::Response::builder()
                    .header("grpc-status", "4")
                    .body(grpc_body(None))
                    .expect("response")
            };
            if told {
                let deadline =
                    crate::timeout::CallDeadline::after(std::time::Duration::from_millis(300));
                response.extensions_mut().insert(deadline);
            }
            response
        }

        #[test]
        fn deadline_exceeded_on_a_call_whose_server_knew_the_deadline_counts_as_nothing() {
            for in_trailers in [false, true] {
                let (recorder, report) = recorder();
                let response = HttpClassify::grpc()
                    .classify_response(deadline_exceeded(in_trailers, true), report);
                drain(response.into_body());
                assert!(outcomes(&recorder).is_empty(), "trailers: {in_trailers}");
            }
        }

        #[test]
        fn deadline_exceeded_without_the_callers_deadline_is_a_failure() {
            for in_trailers in [false, true] {
                let (recorder, report) = recorder();
                let response = HttpClassify::grpc()
                    .classify_response(deadline_exceeded(in_trailers, false), report);
                drain(response.into_body());
                assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
            }
        }

        #[test]
        fn a_known_deadline_does_not_excuse_other_failures() {
            let (recorder, report) = recorder();
            let mut response = ::http::Response::builder()
                .header("grpc-status", "14")
                .body(grpc_body(None))
                .expect("response");
            let deadline =
                crate::timeout::CallDeadline::after(std::time::Duration::from_millis(300));
            response.extensions_mut().insert(deadline);
            let _ = HttpClassify::grpc().classify_response(response, report);
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn a_failed_grpc_status_keeps_its_code_and_message_in_headers_and_trailers() {
            let classifier = || GrpcClassifier::new(GrpcErrorsAsFailures::new());
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", ::http::HeaderValue::from_static("14"));
            headers.insert(
                "grpc-message",
                ::http::HeaderValue::from_static("going%20away"),
            );
            let check = |class: GrpcFailureClass| match class {
                GrpcFailureClass::Status(status) => {
                    assert_eq!(status.code_raw(), 14);
                    assert_eq!(status.message(), Some("going away"));
                }
                other => panic!("{other}"),
            };
            let mut response = ::http::Response::new(());
            *response.headers_mut() = headers.clone();
            match classifier().classify_response(&response) {
                ClassifiedResponse::Ready(Err(class)) => check(class),
                _ => panic!("a trailers-only failure is judged at once"),
            }
            let eos = match classifier().classify_response(&::http::Response::new(())) {
                ClassifiedResponse::RequiresEos(eos) => eos,
                ClassifiedResponse::Ready(_) => panic!("no status yet: wait for the trailers"),
            };
            check(eos.classify_eos(Some(&headers)).expect_err("a failure"));
        }

        #[test]
        fn codes_made_successes_by_the_caller_are_successes() {
            let codes = GrpcErrorsAsFailures::new().with_success(GrpcCode::Unavailable);
            let eos = match GrpcClassifier::new(codes).classify_response(&::http::Response::new(()))
            {
                ClassifiedResponse::RequiresEos(eos) => eos,
                ClassifiedResponse::Ready(_) => panic!("no status yet"),
            };
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", ::http::HeaderValue::from_static("14"));
            assert!(eos.clone().classify_eos(Some(&trailers)).is_ok());
            trailers.insert("grpc-status", ::http::HeaderValue::from_static("13"));
            assert!(eos.classify_eos(Some(&trailers)).is_err());
        }

        #[test]
        fn grpc_status_in_the_trailers_is_judged_at_the_end_of_the_body() {
            for (code, expected) in [
                ("0", Outcome::Success),
                ("14", Outcome::Failure),
                ("13", Outcome::Failure),
                ("3", Outcome::Success),
                ("5", Outcome::Success),
            ] {
                let (recorder, report) = recorder();
                let response = ::http::Response::new(grpc_body(Some(code)));
                let response = HttpClassify::grpc().classify_response(response, report);
                assert!(outcomes(&recorder).is_empty(), "not before the trailers");
                drain(response.into_body());
                assert_eq!(outcomes(&recorder), vec![expected], "grpc-status {code}");
            }
        }

        fn loads(recorder: &Recorder) -> Vec<LoadReport> {
            recorder.1.lock().expect("lock").clone()
        }

        #[test]
        fn a_load_report_in_the_headers_is_recorded() {
            let (recorder, report) = recorder();
            let mut response = status(200);
            response.headers_mut().insert(
                "endpoint-load-metrics",
                ::http::HeaderValue::from_static("TEXT rps_fractional=10, cpu_utilization=0.5"),
            );
            let classify = HttpClassify::server_errors().load_reports(crate::load::OrcaLoadReports);
            let _ = classify.classify_response(response, report);
            let recorded = loads(&recorder);
            assert_eq!(recorded.len(), 1);
            assert_eq!(recorded[0].rps_fractional, 10.0);
            assert_eq!(outcomes(&recorder), vec![Outcome::Success]);
        }

        #[test]
        fn a_load_report_in_grpc_trailers_is_recorded_at_the_end_of_the_body() {
            let (recorder, report) = recorder();
            let mut body = grpc_body(None);
            let mut trailers = ::http::HeaderMap::new();
            trailers.insert("grpc-status", ::http::HeaderValue::from_static("0"));
            trailers.insert(
                "endpoint-load-metrics",
                ::http::HeaderValue::from_static(
                    "TEXT rps_fractional=5, application_utilization=0.25",
                ),
            );
            body.0.push_back(Ok(Frame::trailers(trailers)));
            let classify = HttpClassify::grpc().load_reports(crate::load::OrcaLoadReports);
            let response = classify.classify_response(::http::Response::new(body), report);
            assert!(loads(&recorder).is_empty(), "not before the trailers");
            drain(response.into_body());
            assert_eq!(loads(&recorder).len(), 1);
            assert_eq!(loads(&recorder)[0].utilization_for_weight(), 0.25);
            assert_eq!(outcomes(&recorder), vec![Outcome::Success]);
        }

        #[test]
        fn a_malformed_load_report_is_counted_and_the_outcome_stands() {
            let (recorder, report) = recorder();
            let mut response = status(200);
            response.headers_mut().insert(
                "endpoint-load-metrics",
                ::http::HeaderValue::from_static("TEXT cpu_utilization=-1"),
            );
            let classify = HttpClassify::server_errors().load_reports(crate::load::OrcaLoadReports);
            let _ = classify.classify_response(response, report);
            assert!(loads(&recorder).is_empty());
            assert_eq!(*recorder.2.lock().expect("lock"), 1);
            assert_eq!(outcomes(&recorder), vec![Outcome::Success]);
        }

        #[test]
        fn a_grpc_call_answered_with_an_http_error_is_a_failure() {
            let (recorder, report) = recorder();
            let mut response = ::http::Response::new(grpc_body(None));
            *response.status_mut() = ::http::StatusCode::SERVICE_UNAVAILABLE;
            let _ = HttpClassify::grpc().classify_response(response, report);
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn a_grpc_response_that_ends_without_a_status_is_a_failure() {
            let (recorder, report) = recorder();
            let response = ::http::Response::new(grpc_body(None));
            let response = HttpClassify::grpc().classify_response(response, report);
            drain(response.into_body());
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn the_verdict_comes_with_the_last_frame_for_callers_that_stop_at_end_of_stream() {
            let (recorder, report) = recorder();
            let response = ::http::Response::new(grpc_body(None));
            let response = HttpClassify::grpc().classify_response(response, report);
            let mut body = response.into_body();
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            let frame = std::pin::Pin::new(&mut body).poll_frame(&mut cx);
            assert!(matches!(frame, std::task::Poll::Ready(Some(Ok(_)))));
            assert!(body.is_end_stream());
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn a_body_that_fails_midway_is_a_failure() {
            let (recorder, report) = recorder();
            let mut frames = std::collections::VecDeque::new();
            frames.push_back(Ok(Frame::data(&b"half"[..])));
            frames.push_back(Err("connection reset"));
            let response = ::http::Response::new(Frames(frames));
            let response = HttpClassify::grpc().classify_response(response, report);
            drain(response.into_body());
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn a_body_dropped_before_its_end_reports_nothing() {
            let (recorder, report) = recorder();
            let response = ::http::Response::new(grpc_body(Some("14")));
            drop(HttpClassify::grpc().classify_response(response, report));
            assert!(outcomes(&recorder).is_empty());
        }

        #[test]
        fn an_empty_grpc_response_without_a_status_fails_without_being_polled() {
            let (recorder, report) = recorder();
            let response = ::http::Response::new(http_body_util::Empty::<&[u8]>::new());
            let _ = HttpClassify::grpc().classify_response(response, report);
            assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        }

        #[test]
        fn a_request_the_client_refused_to_send_says_nothing_about_the_endpoint() {
            let classify = HttpClassify::server_errors();
            let refused = crate::http::HttpError::refused_for_test();
            let outcome = <HttpClassify as Classify<
                ::http::Response<http_body_util::Empty<&[u8]>>,
            >>::classify_error(&classify, &refused);
            assert_eq!(outcome, None);
        }
    }
}
