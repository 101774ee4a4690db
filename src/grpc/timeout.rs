use std::task::{Context, Poll};
use std::time::Duration;

use tower::{Layer, Service};

use crate::request::{CallDeadline, HasCallContext};

/// The header's name as a constant: a lookup by it neither parses nor
/// lowercases a string, and this runs on every call.
pub(crate) const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Turns a call's `grpc-timeout` header (set by
/// `tonic::Request::set_timeout`) into its [`CallDeadline`], so the
/// [`Deadline`](crate::timeout::Deadline) layer and the retry layer keep to
/// it. An earlier deadline already on the call stands; a malformed header is
/// ignored (the server will refuse it).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTimeoutLayer;

impl<S> Layer<S> for GrpcTimeoutLayer {
    type Service = GrpcTimeout<S>;

    fn layer(&self, inner: S) -> GrpcTimeout<S> {
        GrpcTimeout { inner }
    }
}

/// See [`GrpcTimeoutLayer`].
#[derive(Debug, Clone)]
pub struct GrpcTimeout<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for GrpcTimeout<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        // Looked for in every call, found in few: by a walk (see
        // `crate::header`).
        let timeout = crate::header::get(req.headers(), &GRPC_TIMEOUT)
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        if let Some(timeout) = timeout {
            req.call_context_mut()
                .tighten_deadline(CallDeadline::after(timeout));
        }
        self.inner.call(req)
    }
}

/// `grpc-timeout`: at most 8 ASCII digits, then a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), per gRPC over HTTP/2.
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value, rounded up to whole microseconds (as
/// grpc-go does, so that the server's timer and tonic's own never fire
/// before the client's deadline), then in the finest of `u`, `m`, `S`, `M`,
/// `H` that fits in 8 digits.
pub(crate) fn format_grpc_timeout(left: Duration) -> http::HeaderValue {
    const MAX: u128 = 99_999_999;
    let left = left.saturating_add(Duration::from_nanos(999));
    let micros = left.as_micros();
    let (amount, unit) = if micros <= MAX {
        (micros, 'u')
    } else if left.as_millis() <= MAX {
        (left.as_millis(), 'm')
    } else if u128::from(left.as_secs()) <= MAX {
        (u128::from(left.as_secs()), 'S')
    } else if u128::from(left.as_secs() / 60) <= MAX {
        (u128::from(left.as_secs() / 60), 'M')
    } else {
        (u128::from(left.as_secs() / 3600).min(MAX), 'H')
    };
    http::HeaderValue::try_from(format!("{amount}{unit}"))
        .unwrap_or_else(|_| unreachable!("digits and a unit letter are a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_of_the_spec_is_read() {
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"4S"), Some(Duration::from_secs(4)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout(b"1n"), Some(Duration::from_nanos(1)));
    }

    #[test]
    fn a_formatted_timeout_reads_back_within_its_unit() {
        for left in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(1),
            Duration::from_nanos(1_500),
            Duration::from_millis(250),
            Duration::from_secs(99),
            Duration::from_secs(100_000),
            Duration::from_secs(86_400 * 365 * 30),
            Duration::MAX,
        ] {
            let value = format_grpc_timeout(left);
            let read = parse_grpc_timeout(value.as_bytes())
                .unwrap_or_else(|| panic!("{value:?} does not parse"));
            assert!(
                read <= left.saturating_add(Duration::from_nanos(999)),
                "{value:?} reads as {read:?}, more than {left:?} rounded up"
            );
            if value.as_bytes().last() == Some(&b'u') {
                assert!(
                    read >= left,
                    "{value:?} reads as {read:?}, less than {left:?}"
                );
            }
            let unit = match value.as_bytes().last() {
                Some(b'u') => Duration::from_micros(1),
                Some(b'm') => Duration::from_millis(1),
                Some(b'S') => Duration::from_secs(1),
                Some(b'M') => Duration::from_secs(60),
                _ => Duration::from_secs(3600),
            };
            let capped = left.min(Duration::from_secs(99_999_999 * 3600));
            assert!(capped.saturating_sub(read) < unit, "{value:?} for {left:?}");
        }
    }

    #[test]
    fn malformed_timeouts_are_ignored() {
        for bad in [
            &b""[..],
            b"S",
            b"123456789S",
            b"12x",
            b"-1S",
            b"1.5S",
            b"10",
            b"\xff",
        ] {
            assert_eq!(
                parse_grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_header_becomes_the_call_deadline_unless_one_is_earlier() {
        use tower::ServiceExt;

        let echo = tower::service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(CallDeadline::of(&req).map(|d| d.remaining()))
        });
        let service = GrpcTimeoutLayer.layer(echo);

        let call = |timeout: &str| {
            http::Request::post("/a.B/C")
                .header("grpc-timeout", timeout)
                .body(())
                .unwrap_or_default()
        };
        let read = service.clone().oneshot(call("200m")).await;
        assert_eq!(read, Ok(Some(Duration::from_millis(200))));

        let mut earlier = call("5S");
        earlier
            .extensions_mut()
            .insert(CallDeadline::after(Duration::from_secs(1)));
        let kept = service.clone().oneshot(earlier).await;
        assert_eq!(kept, Ok(Some(Duration::from_secs(1))));

        let mut later = call("200m");
        later
            .extensions_mut()
            .insert(CallDeadline::after(Duration::from_secs(10)));
        let shortened = service.oneshot(later).await;
        assert_eq!(shortened, Ok(Some(Duration::from_millis(200))));
    }
}
