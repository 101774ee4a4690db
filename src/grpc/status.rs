use std::sync::Arc;

use tonic::{Code, Status};

use crate::error::{chain, BoxError, NeverSent};
use crate::timeout::Elapsed;

/// The gRPC status a generated client should see for an error of the
/// balanced stack, with the error kept as its `source()`.
///
/// tonic turns an error it does not recognise into `UNKNOWN`; this names
/// what happened in gRPC's terms instead:
///
/// | error | code |
/// |---|---|
/// | a `Status` anywhere in the chain | that status |
/// | [`Elapsed`]: the deadline or an attempt's timeout fired; tonic's own `grpc-timeout` timer | `DEADLINE_EXCEEDED` |
/// | no endpoint to send to, the balancer closed | `UNAVAILABLE` |
/// | the connection could not be made ([`NeverSent`], [`tonic::ConnectError`]) | `UNAVAILABLE` |
/// | anything else | what tonic makes of it (a reset is `UNAVAILABLE`, the rest `UNKNOWN`) |
///
/// The retry layer's refusals ([`BudgetExhausted`](crate::retry::BudgetExhausted),
/// [`DeadlineTooClose`](crate::retry::DeadlineTooClose)) carry the last
/// attempt's error, whose code they get.
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
    if chain(&*error).any(|link| link.is::<Status>()) {
        return Status::from_error(error);
    }
    let code = chain(&*error).find_map(code_of);
    match code {
        Some(code) => {
            let mut status = Status::new(code, error.to_string());
            status.set_source(Arc::from(error));
            status
        }
        None => Status::from_error(error),
    }
}

/// The code one link of the chain decides, if it decides one.
fn code_of(link: &(dyn std::error::Error + 'static)) -> Option<Code> {
    // tonic's channel enforces a call's `grpc-timeout` itself and calls
    // that `CANCELLED`; it is the call's deadline.
    if link.is::<Elapsed>() || link.is::<tonic::TimeoutExpired>() {
        return Some(Code::DeadlineExceeded);
    }
    if link.is::<NeverSent>() || link.is::<tonic::ConnectError>() {
        return Some(Code::Unavailable);
    }
    match link.downcast_ref::<crate::Error>()? {
        crate::Error::Endpoint { .. } => None,
        // No endpoint, none eligible, closed, a strategy that picked none:
        // the service is not there for this call.
        _ => Some(Code::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
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
    fn a_refused_connection_is_unavailable() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = crate::Error::Endpoint {
            endpoint: "a".into(),
            source: Box::new(NeverSent::new(refused)),
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
}
