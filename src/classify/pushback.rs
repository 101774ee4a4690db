//! Server pushback: a server saying when, or whether, to retry.

use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue};

/// gRPC's pushback header (proposal A6), in milliseconds.
// A constant name, so that a lookup neither parses nor lowercases it.
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// What a server asked of the client's retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Wait this long, instead of the backoff, before the next attempt.
    RetryAfter(Duration),
    /// Do not retry this request at all.
    DoNotRetry,
}

/// The pushback in a response's headers (or a gRPC response's trailers, where
/// `grpc-retry-pushback-ms` usually travels), if any; `now` dates an HTTP-date
/// `Retry-After`.
///
/// - `grpc-retry-pushback-ms` (gRPC A6) is a non-negative number of
///   milliseconds to wait. Any other value (negative, empty, not a number,
///   too large) means do not retry, as A6 specifies. It wins over
///   `Retry-After`.
/// - `Retry-After` (RFC 9110 section 10.2.3) is a number of seconds (capped
///   at `u32::MAX`) or an HTTP-date (a date in the past means retry now). A
///   malformed value is ignored, and logged at debug level: a broken header
///   should not stop a retry that would otherwise happen.
///
/// Only the first value of each header counts.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use http::HeaderMap;
/// use tower_lb::retry::{pushback, Pushback};
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(pushback(&headers, SystemTime::now()), None);
///
/// headers.insert("retry-after", "120".parse().unwrap());
/// assert_eq!(
///     pushback(&headers, SystemTime::now()),
///     Some(Pushback::RetryAfter(Duration::from_secs(120)))
/// );
///
/// headers.insert("grpc-retry-pushback-ms", "-1".parse().unwrap());
/// assert_eq!(pushback(&headers, SystemTime::now()), Some(Pushback::DoNotRetry));
/// ```
pub fn pushback(headers: &HeaderMap, now: SystemTime) -> Option<Pushback> {
    if let Some(value) = headers.get(&GRPC_RETRY_PUSHBACK_MS) {
        return Some(grpc_pushback(value));
    }
    headers
        .get(RETRY_AFTER)
        .and_then(|value| retry_after(value, now))
        .map(Pushback::RetryAfter)
}

/// A `grpc-retry-pushback-ms` value: anything but a plain non-negative
/// integer that fits in a `u64` is "do not retry".
fn grpc_pushback(value: &HeaderValue) -> Pushback {
    match value.to_str().ok().and_then(|text| digits(text.trim())) {
        Some(ms) => Pushback::RetryAfter(Duration::from_millis(ms)),
        None => Pushback::DoNotRetry,
    }
}

/// A `Retry-After` value as a delay from `now`, or `None` if it is neither
/// delay-seconds nor an HTTP-date.
fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let Ok(text) = value.to_str() else {
        tracing::debug!(
            header = "retry-after",
            ?value,
            "ignoring a non-ASCII Retry-After"
        );
        return None;
    };
    let text = text.trim();
    if is_digits(text) {
        // All digits, so the only way to fail is overflow: an absurd delay,
        // capped rather than ignored.
        let secs = text
            .parse::<u64>()
            .map_or(u64::from(u32::MAX), |secs| secs.min(u64::from(u32::MAX)));
        return Some(Duration::from_secs(secs));
    }
    match httpdate::parse_http_date(text) {
        // A date in the past means the server is ready now.
        Ok(date) => Some(date.duration_since(now).unwrap_or(Duration::ZERO)),
        Err(_) => {
            tracing::debug!(
                header = "retry-after",
                value = text,
                "ignoring a malformed Retry-After"
            );
            None
        }
    }
}

/// Non-empty and ASCII digits only: no sign, no fraction, no exponent, which
/// `u64::from_str` alone would not rule out (it accepts `+5`).
fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// `text` as a `u64` if it is only digits and fits.
fn digits(text: &str) -> Option<u64> {
    if is_digits(text) {
        text.parse().ok()
    } else {
        None
    }
}

/// The pause a response's headers (or trailers) ask for, if any: a
/// `grpc-retry-pushback-ms` or `Retry-After` that says how long (not one
/// that says "do not retry").
#[cfg(feature = "http")]
pub(crate) fn pause(headers: &HeaderMap) -> Option<Duration> {
    match pushback(headers, SystemTime::now())? {
        Pushback::RetryAfter(pause) => Some(pause),
        Pushback::DoNotRetry => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fri, 15 May 2015 15:34:21 GMT.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_431_704_061)
    }

    const PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for &(name, value) in pairs {
            let value = HeaderValue::from_bytes(value).unwrap_or_else(|_| unreachable!());
            headers.append(name, value);
        }
        headers
    }

    fn grpc(value: &[u8]) -> Option<Pushback> {
        pushback(&headers(&[(PUSHBACK_MS, value)]), now())
    }

    fn retry_after_of(value: &[u8]) -> Option<Pushback> {
        pushback(&headers(&[("retry-after", value)]), now())
    }

    fn after(d: Duration) -> Option<Pushback> {
        Some(Pushback::RetryAfter(d))
    }

    #[test]
    fn no_header_means_no_pushback() {
        assert_eq!(pushback(&HeaderMap::new(), now()), None);
    }

    #[test]
    fn grpc_pushback_of_whole_milliseconds_is_a_delay() {
        for (value, ms) in [
            (&b"0"[..], 0),
            (b"1", 1),
            (b"250", 250),
            (b" 250 ", 250),
            (b"007", 7),
            (b"18446744073709551615", u64::MAX),
        ] {
            assert_eq!(grpc(value), after(Duration::from_millis(ms)), "{value:?}");
        }
    }

    #[test]
    fn anything_else_in_grpc_pushback_means_do_not_retry() {
        for value in [
            &b"-1"[..],
            b"-0",
            b"+5",
            b"",
            b"abc",
            b"1.5",
            b"1e3",
            b"12ms",
            b"18446744073709551616",
            b"\xff\xfe",
        ] {
            assert_eq!(grpc(value), Some(Pushback::DoNotRetry), "{value:?}");
        }
    }

    #[test]
    fn retry_after_seconds_is_a_delay() {
        for (value, secs) in [
            (&b"0"[..], 0),
            (b"1", 1),
            (b"120", 120),
            (b" 120", 120),
            (b"4294967295", u64::from(u32::MAX)),
        ] {
            assert_eq!(
                retry_after_of(value),
                after(Duration::from_secs(secs)),
                "{value:?}"
            );
        }
    }

    #[test]
    fn absurd_retry_after_seconds_are_capped() {
        let cap = after(Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(retry_after_of(b"4294967296"), cap);
        assert_eq!(retry_after_of(b"18446744073709551616"), cap);
        assert_eq!(retry_after_of(&[b'9'; 100]), cap);
    }

    #[test]
    fn a_retry_after_date_is_the_time_until_it() {
        assert_eq!(
            retry_after_of(b"Fri, 15 May 2015 15:34:51 GMT"),
            after(Duration::from_secs(30))
        );
        // The obsolete formats RFC 9110 still requires recipients to accept.
        assert_eq!(
            retry_after_of(b"Friday, 15-May-15 15:34:51 GMT"),
            after(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after_of(b"Fri May 15 15:34:51 2015"),
            after(Duration::from_secs(30))
        );
    }

    #[test]
    fn a_retry_after_date_in_the_past_means_now() {
        assert_eq!(
            retry_after_of(b"Sun, 06 Nov 1994 08:49:37 GMT"),
            after(Duration::ZERO)
        );
    }

    #[test]
    fn a_malformed_retry_after_is_ignored() {
        for value in [
            &b""[..],
            b"-1",
            b"+5",
            b"abc",
            b"1.5",
            b"1e3",
            b"Fri, 32 May 2015 15:34:51 GMT",
            b"\xff\xfe",
        ] {
            assert_eq!(retry_after_of(value), None, "{value:?}");
        }
    }

    #[test]
    fn grpc_pushback_wins_over_retry_after() {
        let both = headers(&[("retry-after", b"120"), (PUSHBACK_MS, b"50")]);
        assert_eq!(pushback(&both, now()), after(Duration::from_millis(50)));

        let refused = headers(&[("retry-after", b"120"), (PUSHBACK_MS, b"-1")]);
        assert_eq!(pushback(&refused, now()), Some(Pushback::DoNotRetry));
    }

    #[test]
    fn a_malformed_retry_after_does_not_hide_grpc_pushback() {
        let both = headers(&[("retry-after", b"soon"), (PUSHBACK_MS, b"50")]);
        assert_eq!(pushback(&both, now()), after(Duration::from_millis(50)));
    }

    #[test]
    fn only_the_first_value_counts() {
        let twice = headers(&[("retry-after", b"5"), ("retry-after", b"60")]);
        assert_eq!(pushback(&twice, now()), after(Duration::from_secs(5)));

        let twice = headers(&[(PUSHBACK_MS, b"-1"), (PUSHBACK_MS, b"10")]);
        assert_eq!(pushback(&twice, now()), Some(Pushback::DoNotRetry));
    }
}
