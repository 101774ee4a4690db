use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};

use crate::error::{chain, is_connection_broken, report, BoxError, RefusedByClient};
use crate::timeout::Elapsed;

/// The gRPC status a generated client should see for an error of the
/// balanced stack, with the error kept as its `source()`.
///
/// tonic turns an error it does not recognise into `UNKNOWN`; this names
/// what happened in gRPC's terms instead:
///
/// | error | code |
/// |---|---|
/// | a `Status` anywhere in the chain | that status (but see below) |
/// | [`Elapsed`]: the deadline or an attempt's timeout fired; tonic's own `grpc-timeout` timer | `DEADLINE_EXCEEDED` |
/// | no endpoint to send to, the balancer closed | `UNAVAILABLE` |
/// | the call never left ([`is_never_sent`](crate::error::is_never_sent), but for a call the client refused to address; [`tonic::ConnectError`]): the connection could not be made, the server refused the stream or went away before processing it | `UNAVAILABLE` |
/// | the connection broke under the call, before or during the answer: reset, broken pipe, closed | `UNAVAILABLE` |
/// | an HTTP/2 reset or connection error with a reason | as gRPC's [HTTP/2 mapping] says: `CANCEL` `CANCELLED`, `ENHANCE_YOUR_CALM` `RESOURCE_EXHAUSTED`, `INADEQUATE_SECURITY` `PERMISSION_DENIED`, the protocol's own errors `INTERNAL` |
/// | anything else | what tonic makes of it (`UNKNOWN` for what it does not know) |
///
/// A broken connection is `UNAVAILABLE` as gRPC's [status code table] says
/// ("some data transmitted ... before connection breaks") and grpc-go and
/// grpc-java do; tonic alone makes it `UNKNOWN`. [`GrpcChannel`](crate::client::GrpcChannel)
/// maps the errors of answers' bodies too, so a connection that breaks in
/// the middle of an answer is `UNAVAILABLE` as well.
///
/// [status code table]: https://github.com/grpc/grpc/blob/master/doc/statuscodes.md
/// [HTTP/2 mapping]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md#errors
///
/// The retry layer's refusals ([`BudgetExhausted`](crate::retry::BudgetExhausted),
/// [`DeadlineTooClose`](crate::retry::DeadlineTooClose)) carry the last
/// attempt's error, whose code they get; a call adaptive throttling kept
/// from being sent ([`Throttled`](crate::retry::Throttled)) is `UNAVAILABLE`.
///
/// ```
/// use std::time::Duration;
/// use tower_lb::grpc::status_from_error;
/// use tower_lb::timeout::{Elapsed, Timer};
///
/// let status = status_from_error(Box::new(Elapsed::new(Timer::Deadline, Duration::from_secs(1))));
/// assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
/// ```
pub fn status_from_error(error: BoxError) -> Status {
    let found = chain(&*error).find_map(|link| link.downcast_ref::<Status>());
    if let Some(status) = found {
        // tonic turns the errors of an answer's body into statuses itself,
        // a broken connection into UNKNOWN; a status the server sent has no
        // source.
        let broken =
            status.code() == Code::Unknown && chain(status).skip(1).any(is_connection_broken);
        if !broken {
            return Status::from_error(error);
        }
        let message = status.message().to_owned();
        let mut status = Status::new(Code::Unavailable, message);
        status.set_source(Arc::from(error));
        return status;
    }
    let code = chain(&*error).find_map(code_of);
    let error = match code {
        Some(code) => return with_source(code, error),
        None => match Status::try_from_error(error) {
            Ok(status) => return status,
            Err(error) => error,
        },
    };
    with_source(Code::Unknown, error)
}

/// A status of `code` that says what the whole chain of `error` says (each
/// of the crate's errors says only its own part), with `error` as its
/// source.
fn with_source(code: Code, error: BoxError) -> Status {
    let mut status = Status::new(code, report(&*error).to_string());
    status.set_source(Arc::from(error));
    status
}

/// The code one link of the chain decides, if it decides one.
fn code_of(link: &(dyn std::error::Error + 'static)) -> Option<Code> {
    // tonic's channel enforces a call's `grpc-timeout` itself and calls
    // that `CANCELLED`; it is the call's deadline.
    if link.is::<Elapsed>() || link.is::<tonic::TimeoutExpired>() {
        return Some(Code::DeadlineExceeded);
    }
    // Never sent (the crate's one rule: a connection never made, a stream
    // the server left unprocessed in a graceful GOAWAY or REFUSED_STREAM,
    // ...) but for a refusal of the caller's own, or a broken connection:
    // the service was not there for this call.
    // Throttled by the client (adaptive throttling): the backends have been
    // turning calls away, as gRPC's own retry throttling reports it.
    if (crate::error::never_sent_link(link) && !link.is::<RefusedByClient>())
        || link.is::<crate::retry::Throttled>()
        || link.is::<tonic::ConnectError>()
        || is_connection_broken(link)
    {
        return Some(Code::Unavailable);
    }
    if let Some(code) = link.downcast_ref::<h2::Error>().and_then(code_of_h2) {
        return Some(code);
    }
    match link.downcast_ref::<crate::Error>()? {
        crate::Error::Endpoint { .. } => None,
        // No endpoint, none eligible, closed, a strategy that picked none:
        // the service is not there for this call.
        _ => Some(Code::Unavailable),
    }
}

/// The code gRPC's [HTTP/2 mapping] gives a stream or connection error's
/// reason, as tonic gives it to an h2 error it finds (the own connections
/// hand h2's error on as it is, under the crate's own errors, where tonic
/// does not look).
///
/// [HTTP/2 mapping]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md#errors
fn code_of_h2(error: &h2::Error) -> Option<Code> {
    use h2::Reason;
    match error.reason()? {
        Reason::NO_ERROR
        | Reason::PROTOCOL_ERROR
        | Reason::INTERNAL_ERROR
        | Reason::FLOW_CONTROL_ERROR
        | Reason::SETTINGS_TIMEOUT
        | Reason::COMPRESSION_ERROR
        | Reason::CONNECT_ERROR => Some(Code::Internal),
        Reason::REFUSED_STREAM => Some(Code::Unavailable),
        Reason::CANCEL => Some(Code::Cancelled),
        Reason::ENHANCE_YOUR_CALM => Some(Code::ResourceExhausted),
        Reason::INADEQUATE_SECURITY => Some(Code::PermissionDenied),
        _ => None,
    }
}

pin_project! {
    /// An answer's body whose errors are [`status_from_error`]'s statuses,
    /// which tonic hands to the caller as they are (a connection that breaks
    /// in the middle of an answer is `UNAVAILABLE`, not tonic's `UNKNOWN`).
    pub(crate) struct StatusBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B> StatusBody<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self { inner }
    }
}

impl<B> Body for StatusBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.project()
            .inner
            .poll_frame(cx)
            .map_err(|error| status_from_error(error.into()))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::NeverSent;
    use crate::timeout::Timer;

    #[test]
    fn a_status_in_the_chain_is_kept() {
        let inner = Status::invalid_argument("bad name");
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(inner),
        };
        let status = status_from_error(Box::new(error));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "bad name");
    }

    #[test]
    fn an_attempt_timeout_is_deadline_exceeded() {
        let error = Elapsed::new(Timer::Attempt, Duration::from_millis(50));
        let status = status_from_error(Box::new(error));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("50ms"), "{}", status.message());
    }

    #[test]
    fn no_endpoints_is_unavailable_and_keeps_its_message() {
        let error = crate::Error::NoEndpoints {
            waited: Duration::from_secs(1),
        };
        let status = status_from_error(Box::new(error));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("no endpoints"),
            "{}",
            status.message()
        );
        assert!(std::error::Error::source(&status).is_some());
    }

    #[test]
    fn an_http2_reset_under_the_crates_errors_gets_grpcs_code_for_its_reason() {
        for (reason, code) in [
            (h2::Reason::CANCEL, Code::Cancelled),
            (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
            (h2::Reason::INTERNAL_ERROR, Code::Internal),
            (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
        ] {
            let error = crate::Error::Endpoint {
                endpoint: "a".into(),
                source: Box::new(h2::Error::from(reason)),
            };
            assert_eq!(
                status_from_error(Box::new(error)).code(),
                code,
                "{reason:?}"
            );
        }
    }

    #[test]
    fn a_refused_connection_is_unavailable() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(NeverSent::new(refused)),
        };
        assert_eq!(status_from_error(Box::new(error)).code(), Code::Unavailable);
    }

    #[test]
    fn a_connection_that_could_not_be_made_is_unavailable_without_a_never_sent_mark() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let failed = crate::error::ConnectFailed::new(([127, 0, 0, 1], 9).into(), refused);
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(failed),
        };
        assert_eq!(status_from_error(Box::new(error)).code(), Code::Unavailable);
    }

    #[test]
    fn a_call_the_client_refused_to_address_is_not_unavailable() {
        // The caller's mistake: the same on every endpoint, so not a code a
        // gRPC client retries.
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(RefusedByClient::new("cannot address the call")),
        };
        assert_eq!(status_from_error(Box::new(error)).code(), Code::Unknown);
    }

    #[test]
    fn a_connection_reset_is_unavailable() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(reset),
        };
        assert_eq!(status_from_error(Box::new(error)).code(), Code::Unavailable);
    }

    #[test]
    fn an_unrecognised_error_is_unknown() {
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: "something odd".into(),
        };
        assert_eq!(status_from_error(Box::new(error)).code(), Code::Unknown);
    }

    #[test]
    fn the_message_says_the_whole_chain_once() {
        for source in [
            BoxError::from("something odd"),
            Box::new(NeverSent::new("something odd")),
        ] {
            let error = crate::Error::Endpoint {
                endpoint: "a".into(),
                source,
            };
            let status = status_from_error(Box::new(error));
            let message = status.message();
            assert!(message.starts_with("endpoint a failed: "), "{message}");
            assert_eq!(message.matches("something odd").count(), 1, "{message}");
        }
    }
}
