//! HTTP responses classified with tower-http's classifiers, and the body
//! that reports the verdict when it needs the trailers.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, ServerErrorsAsFailures,
};

use super::grpc::CallersDeadline;
use super::{Classify, Outcome, OutcomeReport};
use crate::load::{LoadExtractor, NoLoadReports};

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
                let status = Some((response.status(), response.headers()));
                deadline.report(report, verdict.is_ok(), status);
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

/// What a body waits for before it can report: the end-of-stream
/// classifier, the report, the load extractor and the deadline rule.
struct Pending<E, L> {
    eos: E,
    report: OutcomeReport,
    load: L,
    deadline: CallersDeadline,
}

impl<E: ClassifyEos, L: LoadExtractor> Pending<E, L> {
    /// Reports the body's outcome at its end, from its trailers if any.
    fn finish(self, trailers: Option<&http::HeaderMap>) {
        if let Some(trailers) = trailers {
            self.report.load_from(&self.load, trailers, true);
        }
        let success = self.eos.classify_eos(trailers).is_ok();
        let status = trailers.map(|trailers| (http::StatusCode::OK, trailers));
        self.deadline.report(self.report, success, status);
    }
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
                        pending.finish(Some(trailers));
                    }
                } else if this.inner.is_end_stream() {
                    // The last data frame of a body without trailers: a
                    // caller may stop here, so decide now.
                    if let Some(pending) = this.pending.take() {
                        pending.finish(None);
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
                    pending.finish(None);
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

#[cfg(test)]
mod tests {

    use super::super::testing::{outcomes, overloads, recorder, Recorder};
    use super::super::*;
    use ::http::HeaderMap;
    use http_body::{Body, Frame};
    use tower_http::classify::{
        ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
        GrpcFailureClass,
    };

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

    /// What the default HTTP classifier reports for a `code` answer with
    /// `Retry-After: seconds`: the outcomes, and the overloads.
    fn with_retry_after(
        code: u16,
        seconds: &'static str,
    ) -> (Vec<Outcome>, Vec<Option<std::time::Duration>>) {
        let (recorder, report) = recorder();
        let mut response = status(code);
        response
            .headers_mut()
            .insert("retry-after", ::http::HeaderValue::from_static(seconds));
        let _ = HttpClassify::server_errors().classify_response(response, report);
        (outcomes(&recorder), overloads(&recorder))
    }

    #[test]
    fn a_429_is_a_success_and_says_the_endpoint_is_overloaded_for_its_retry_after() {
        let pause = Some(std::time::Duration::from_secs(2));
        assert_eq!(
            with_retry_after(429, "2"),
            (vec![Outcome::Success], vec![pause])
        );
    }

    #[test]
    fn a_429_a_classifier_of_the_users_counts_as_a_failure_is_one_overload() {
        let (recorder, report) = recorder();
        let mut response = status(429);
        response
            .headers_mut()
            .insert("retry-after", ::http::HeaderValue::from_static("2"));
        let classify = HttpClassify::new(tower_http::classify::StatusInRangeAsFailures::new(
            429..=599,
        ));
        let _ = classify.classify_response(response, report);
        assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        assert_eq!(
            overloads(&recorder),
            vec![Some(std::time::Duration::from_secs(2))]
        );
    }

    #[test]
    fn a_503_asking_for_a_pause_is_a_failure_and_an_overload() {
        let pause = Some(std::time::Duration::from_secs(1));
        assert_eq!(
            with_retry_after(503, "1"),
            (vec![Outcome::Failure], vec![pause])
        );
    }

    #[test]
    fn a_plain_503_is_a_failure_and_nothing_more() {
        let (recorder, report) = recorder();
        let _ = HttpClassify::server_errors().classify_response(status(503), report);
        assert_eq!(outcomes(&recorder), vec![Outcome::Failure]);
        assert!(overloads(&recorder).is_empty());
    }

    #[test]
    fn resource_exhausted_is_an_overload_with_its_pushback_and_no_failure() {
        // In the headers (trailers-only) and in the trailers.
        for in_trailers in [false, true] {
            let (recorder, report) = recorder();
            let response = if in_trailers {
                let mut frames = std::collections::VecDeque::new();
                let mut trailers = ::http::HeaderMap::new();
                trailers.insert("grpc-status", ::http::HeaderValue::from_static("8"));
                trailers.insert(
                    "grpc-retry-pushback-ms",
                    ::http::HeaderValue::from_static("250"),
                );
                frames.push_back(Ok(Frame::trailers(trailers)));
                ::http::Response::new(Frames(frames))
            } else {
                ::http::Response::builder()
                    .header("grpc-status", "8")
                    .header("grpc-retry-pushback-ms", "250")
                    .body(grpc_body(None))
                    .expect("response")
            };
            let response = HttpClassify::grpc().classify_response(response, report);
            drain(response.into_body());
            assert!(outcomes(&recorder).is_empty(), "trailers: {in_trailers}");
            assert_eq!(
                overloads(&recorder),
                vec![Some(std::time::Duration::from_millis(250))],
                "trailers: {in_trailers}"
            );
        }
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
        let deadline = crate::timeout::CallDeadline::after(std::time::Duration::from_millis(300));
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
        let eos = match GrpcClassifier::new(codes).classify_response(&::http::Response::new(())) {
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
            ::http::HeaderValue::from_static("TEXT rps_fractional=5, application_utilization=0.25"),
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
