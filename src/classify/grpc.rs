//! gRPC classification: the status in the headers or the trailers, and the
//! rule that a `DEADLINE_EXCEEDED` the caller's own deadline caused is not
//! the endpoint's fault.

use std::fmt;

use http::{HeaderMap, StatusCode};
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
    GrpcFailureClass,
};

use super::http::HttpClassify;
use super::{outcome, OutcomeReport};
use crate::timeout::CallDeadline;

impl HttpClassify<GrpcClassifier> {
    /// gRPC status from the headers or the trailers: `UNKNOWN`,
    /// `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and
    /// `DATA_LOSS` (the codes Envoy maps to HTTP 5xx) are failures;
    /// `RESOURCE_EXHAUSTED` says the server is overloaded, which raises its
    /// cost but is no failure (see [`OutcomeReport::overloaded`]); the
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
        // Read on every response and its trailers: by a walk (see
        // `crate::header`).
        let value = crate::header::get(headers, &super::GRPC_STATUS)?;
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
            None => ClassifiedResponse::RequiresEos(GrpcClassifyEos(self)),
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailureClass {
        self.codes.classify_error(error)
    }
}

/// The end-of-stream half of [`GrpcClassifier`]: the same classifier,
/// judging the trailers.
#[derive(Debug, Clone)]
pub struct GrpcClassifyEos(GrpcClassifier);

impl ClassifyEos for GrpcClassifyEos {
    type FailureClass = GrpcFailureClass;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), GrpcFailureClass> {
        let Some(trailers) = trailers else {
            return Err(no_grpc_status());
        };
        match self.0.successes.judge(trailers) {
            Some(GrpcVerdict::Success) => Ok(()),
            Some(GrpcVerdict::Failure) => {
                // Only on failure: a copy of the trailers for tower-http
                // to read the status and message from.
                let mut failed = http::Response::new(());
                *failed.headers_mut() = trailers.clone();
                Err(failure_class(&self.0.codes, &failed))
            }
            Some(GrpcVerdict::Malformed(class)) => Err(class),
            None => Err(no_grpc_status()),
        }
    }

    fn classify_error<E: fmt::Display + 'static>(self, error: &E) -> GrpcFailureClass {
        self.0.codes.classify_error(error)
    }
}

fn no_grpc_status() -> GrpcFailureClass {
    GrpcFailureClass::Error("the gRPC response ended without a grpc-status".to_owned())
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
pub(super) struct CallersDeadline {
    told: Option<CallDeadline>,
}

impl CallersDeadline {
    pub(super) fn of<B>(response: &http::Response<B>) -> Self {
        Self {
            told: response.extensions().get::<CallDeadline>().copied(),
        }
    }

    /// Reports the verdict, and what the status says of the server's load.
    /// `status` is where the verdict was read (the response's status and
    /// headers, or `200` and the trailers), when it was read from headers.
    ///
    /// - A failure that only says the caller's deadline passed
    ///   (`grpc-status: 4`, with the deadline nearly out) is not reported.
    /// - `RESOURCE_EXHAUSTED` (a failure to the gRPC classifier) says the
    ///   server is overloaded: reported as such, not as a failure.
    /// - A 429, whatever its verdict, says the same.
    /// - A failure that asks for a pause (`Retry-After`,
    ///   `grpc-retry-pushback-ms`) raises the endpoint's cost by the pause
    ///   as well (see [`OutcomeReport::overloaded`]).
    ///
    /// Each response is counted as overloaded once at most, and a success
    /// other than a 429 costs no lookup.
    pub(super) fn report(
        self,
        report: OutcomeReport,
        success: bool,
        status: Option<(StatusCode, &HeaderMap)>,
    ) {
        let Some((code, headers)) = status else {
            return report.report(outcome(success));
        };
        let too_many = code == StatusCode::TOO_MANY_REQUESTS;
        if success && !too_many {
            return report.report(outcome(success));
        }
        let grpc = match success {
            true => None,
            false => super::grpc_status(headers),
        };
        if grpc == Some(GRPC_DEADLINE_EXCEEDED) && self.told.is_some_and(|d| nearly_out(&d)) {
            return;
        }
        let pause = super::pushback::pause(headers);
        if grpc == Some(GRPC_RESOURCE_EXHAUSTED) {
            return report.overloaded(pause);
        }
        if too_many || pause.is_some() {
            report.overloaded(pause);
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

use super::grpc_codes::{
    DEADLINE_EXCEEDED as GRPC_DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED as GRPC_RESOURCE_EXHAUSTED,
};
