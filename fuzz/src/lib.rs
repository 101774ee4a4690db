//! The invariants tower-lb's parsers of outside input must keep, as checks
//! that panic when one is broken.
//!
//! Two drivers share them: the cargo-fuzz targets in `fuzz/fuzz_targets/`
//! (one per parser family, each a one-line call into this file) and the
//! proptest properties in `tests/parsers.rs`, which include this file as a
//! module (`#[path = "../fuzz/src/lib.rs"]`), so that CI checks exactly
//! what the fuzzers check.
//!
//! Each `check_*` function takes parsed input (a header value, a header
//! map); each byte-level entry point (`load_report`, `pushback`, ...) turns
//! arbitrary bytes into that input first. Most byte-level inputs are written
//! like an HTTP message, so that seeds are easy to read and write:
//!
//! ```text
//! 503                  <- first line: a status, or `METHOD path`
//! grpc-status: 14      <- headers, `name: value` (one optional space)
//! retry-after: 2
//!                      <- a blank line, then trailers
//! grpc-status: 0
//! ```
//!
//! A header line that is not a valid header name and value is skipped.
//! `\n` can never occur in a header value, so it is a safe separator.
//!
//! The checks compare each parser with an oracle written from the
//! documentation (and the specifications it cites), not from the code, and
//! assert only what is documented: an input the documentation says nothing
//! about may go either way, as long as no parser panics.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tower::{Layer, Service};
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse};
use tower_lb::classify::{Classify, HttpClassify, OutcomeReport};
use tower_lb::grpc::{GrpcTimeoutLayer, MethodSafety};
use tower_lb::load::{
    LoadExtractor, LoadReport, LoadReportError, OrcaLoadReports, UtilizationHeader,
};
use tower_lb::request::{CallContext, HasCallContext, Safety};
use tower_lb::retry::{HttpRetryOn, Pushback, ResponseVerdict, RetryOn};
use tower_lb::timeout::CallDeadline;

// ---------------------------------------------------------------------------
// Turning bytes into messages
// ---------------------------------------------------------------------------

/// Bytes read as a small HTTP message (see the module docs).
#[derive(Debug, Default)]
pub struct Message {
    /// The first line, without its `\n`.
    pub start: Vec<u8>,
    /// The headers, in order (repeated names keep every value).
    pub headers: HeaderMap,
    /// The trailers, when a blank line follows the headers.
    pub trailers: Option<HeaderMap>,
}

impl Message {
    /// `data` with a first line.
    pub fn parse(data: &[u8]) -> Message {
        let mut lines = data.split(|&b| b == b'\n');
        let start = lines.next().unwrap_or_default().to_vec();
        let (headers, trailers) = header_blocks(lines);
        Message {
            start,
            headers,
            trailers,
        }
    }

    /// `data` without a first line: headers from the first byte.
    pub fn headers_only(data: &[u8]) -> Message {
        let (headers, trailers) = header_blocks(data.split(|&b| b == b'\n'));
        Message {
            start: Vec::new(),
            headers,
            trailers,
        }
    }
}

fn header_blocks<'a>(mut lines: impl Iterator<Item = &'a [u8]>) -> (HeaderMap, Option<HeaderMap>) {
    let headers = header_block(&mut lines);
    let mut rest = lines.peekable();
    let trailers = rest.peek().is_some().then(|| header_block(&mut rest));
    (headers, trailers)
}

/// Header lines up to a blank line (consumed) or the end.
fn header_block<'a>(lines: &mut impl Iterator<Item = &'a [u8]>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// Polls a future that is ready at once (all the services here are).
fn ready_now<F: std::future::Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a service that never waits returned Pending"),
    }
}

// ---------------------------------------------------------------------------
// Load reports
// ---------------------------------------------------------------------------

/// The longest error message a load report may produce, in characters,
/// whatever the input's length: each quote of the input is cut to 64
/// characters (which `{:?}` may escape to 10 characters each).
pub const MAX_LOAD_ERROR_CHARS: usize = 1024;

const LOAD_METRICS: &str = "endpoint-load-metrics";
const LOAD_METRICS_BIN: &str = "endpoint-load-metrics-bin";
const SERVER_LOAD: &str = "x-server-load";

/// `data` through every load report parser: as a protobuf, and (when it is a
/// valid header value) as the `endpoint-load-metrics` header, the
/// `endpoint-load-metrics-bin` trailer and a bare utilization header.
pub fn load_report(data: &[u8]) {
    check_protobuf(data);
    if let Ok(value) = HeaderValue::from_bytes(data) {
        check_load_header(&value);
    }
}

/// `LoadReport::from_protobuf` on `bytes`, and the same bytes in base64
/// through `from_grpc_trailer` and the `BIN` form, which must agree with it.
pub fn check_protobuf(bytes: &[u8]) {
    let direct = LoadReport::from_protobuf(bytes);
    check_load_result(&direct, "from_protobuf");
    let padded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
    for encoded in [padded, unpadded] {
        let value = HeaderValue::from_str(&encoded).unwrap_or_else(|e| panic!("base64: {e}"));
        let trailer = LoadReport::from_grpc_trailer(&value);
        let bin = HeaderValue::from_str(&format!("BIN {encoded}"))
            .unwrap_or_else(|e| panic!("base64: {e}"));
        let header = LoadReport::from_header(&bin);
        if bytes.is_empty() {
            // Nothing to decode: the trailer and the header are blank.
            assert_eq!(trailer, Err(LoadReportError::Empty));
            assert_eq!(header, Err(LoadReportError::Empty));
            continue;
        }
        assert!(
            same_result(&trailer, &direct),
            "from_grpc_trailer({encoded:?}) = {trailer:?}, from_protobuf = {direct:?}"
        );
        assert!(
            same_result(&header, &direct),
            "from_header(BIN {encoded:?}) = {header:?}, from_protobuf = {direct:?}"
        );
    }
}

/// Every parser of a load report header, on `value`.
pub fn check_load_header(value: &HeaderValue) {
    let header = LoadReport::from_header(value);
    check_load_result(&header, "from_header");
    if header.is_ok() {
        // The first word says the form, and it is case-sensitive.
        let text = std::str::from_utf8(value.as_bytes())
            .unwrap_or_else(|_| panic!("from_header accepted non-UTF-8 {value:?}"));
        let text = text.trim_start();
        let known = ["TEXT", "JSON", "BIN"].iter().any(|form| {
            text.strip_prefix(form)
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_whitespace()))
        });
        assert!(known, "from_header accepted {value:?} without a form word");
    }

    let trailer = LoadReport::from_grpc_trailer(value);
    check_load_result(&trailer, "from_grpc_trailer");

    // The `BIN` form is the trailer's base64 behind a word: the two agree
    // (on ASCII: `from_header` trims Unicode spaces too).
    if value.as_bytes().is_ascii() {
        let bin = [b"BIN ", value.as_bytes()].concat();
        if let Ok(bin) = HeaderValue::from_bytes(&bin) {
            let header = LoadReport::from_header(&bin);
            assert!(
                same_result(&header, &trailer),
                "BIN form {header:?} and trailer {trailer:?} differ on {value:?}"
            );
        }
    }

    // The ORCA extractor: the text header first in headers, the binary one
    // first in trailers, each read by the parsers above.
    let mut text_only = HeaderMap::new();
    text_only.insert(LOAD_METRICS, value.clone());
    let mut bin_only = HeaderMap::new();
    bin_only.insert(LOAD_METRICS_BIN, value.clone());
    let mut both = text_only.clone();
    both.insert(LOAD_METRICS_BIN, value.clone());
    let orca = OrcaLoadReports;
    let cases = [
        (orca.from_headers(&text_only), &header, "headers, text only"),
        (
            orca.from_trailers(&text_only),
            &header,
            "trailers, text only",
        ),
        (
            orca.from_headers(&bin_only),
            &trailer,
            "headers, binary only",
        ),
        (
            orca.from_trailers(&bin_only),
            &trailer,
            "trailers, binary only",
        ),
        (orca.from_headers(&both), &header, "headers, both"),
        (orca.from_trailers(&both), &trailer, "trailers, both"),
    ];
    for (found, expected, case) in cases {
        let found = found.unwrap_or_else(|| panic!("OrcaLoadReports, {case}: no report"));
        assert!(
            same_result(&found, expected),
            "OrcaLoadReports, {case}: {found:?}, expected {expected:?}"
        );
    }
    assert_eq!(orca.from_headers(&HeaderMap::new()), None);

    check_utilization_header(value);
}

/// `UtilizationHeader`: a bare number, finite and non-negative, becomes the
/// application utilization and nothing else.
pub fn check_utilization_header(value: &HeaderValue) {
    let mut map = HeaderMap::new();
    map.insert(SERVER_LOAD, value.clone());
    let extractor = UtilizationHeader::new(HeaderName::from_static(SERVER_LOAD));
    let found = extractor
        .from_headers(&map)
        .unwrap_or_else(|| panic!("the utilization header {value:?} was not found"));
    let again = extractor.from_trailers(&map);
    assert!(again.is_some_and(|again| same_result(&again, &found)));
    check_load_result(&found, "UtilizationHeader");
    let expected = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|u| u.is_finite() && *u >= 0.0);
    match (found, expected) {
        (Ok(report), Some(utilization)) => {
            assert_eq!(report.application_utilization, utilization);
            let others = [
                report.cpu_utilization,
                report.mem_utilization,
                report.rps_fractional,
                report.eps,
            ];
            assert!(others.iter().all(|&x| x == 0.0), "{report:?}");
            assert!(report.request_cost.is_empty() && report.utilization.is_empty());
            assert!(report.named_metrics.is_empty());
        }
        (Err(_), None) => {}
        (found, expected) => {
            panic!("utilization header {value:?}: {found:?}, expected {expected:?}")
        }
    }
}

/// The same report, or errors of the same kind.
///
/// Only the kind: when one protobuf map holds several invalid values, which
/// of them the error names changes from call to call (`from_protobuf` checks
/// the decoded `HashMap` in its random order), so two decodes of the same
/// bytes may disagree on it. That is a finding (fuzz/README.md), kept out of
/// this check so that the fuzzers can look for others.
pub fn same_result(
    a: &Result<LoadReport, LoadReportError>,
    b: &Result<LoadReport, LoadReportError>,
) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
        _ => false,
    }
}

/// A parsed report obeys the struct's docs; an error's message is bounded.
pub fn check_load_result(result: &Result<LoadReport, LoadReportError>, parser: &str) {
    match result {
        Ok(report) => assert_valid_report(report, parser),
        Err(error) => {
            let message = error.to_string();
            let chars = message.chars().count();
            assert!(
                chars <= MAX_LOAD_ERROR_CHARS,
                "{parser}: a {chars}-character error message: {message}"
            );
        }
    }
}

/// "Every number is finite and non-negative": the five rates and
/// utilizations and every map value. (`-0.0` passes: it is `>= 0`, and
/// equal to `0.0`.)
pub fn assert_valid_report(report: &LoadReport, parser: &str) {
    let scalars = [
        ("cpu_utilization", report.cpu_utilization),
        ("mem_utilization", report.mem_utilization),
        ("application_utilization", report.application_utilization),
        ("rps_fractional", report.rps_fractional),
        ("eps", report.eps),
    ];
    for (field, value) in scalars {
        assert!(
            is_valid_number(value),
            "{parser}: {field} = {value:?} in {report:?}"
        );
    }
    let maps = [
        ("request_cost", &report.request_cost),
        ("utilization", &report.utilization),
        ("named_metrics", &report.named_metrics),
    ];
    for (field, map) in maps {
        for (name, &value) in map {
            assert!(
                is_valid_number(value),
                "{parser}: {field}.{name} = {value:?} in {report:?}"
            );
        }
    }
    let weight = report.utilization_for_weight();
    assert!(
        is_valid_number(weight),
        "{parser}: weight utilization {weight:?}"
    );
}

/// Finite, and zero or more.
pub fn is_valid_number(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

// ---------------------------------------------------------------------------
// Pushback: Retry-After and grpc-retry-pushback-ms
// ---------------------------------------------------------------------------

/// The last second an HTTP-date can name: 9999-12-31T23:59:59Z.
pub const LAST_HTTP_DATE_SECS: u64 = 253_402_300_799;

/// `data` as headers (see the module docs) through `retry::pushback`.
pub fn pushback(data: &[u8]) {
    check_pushback(&Message::headers_only(data).headers);
}

/// The `now`s every pushback input is checked at: the epoch, a fixed date,
/// the real clock, and the last HTTP-date.
pub fn pushback_nows() -> [SystemTime; 4] {
    [
        SystemTime::UNIX_EPOCH,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_431_704_061),
        SystemTime::now(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_HTTP_DATE_SECS),
    ]
}

/// `retry::pushback(headers, now)` is what its docs say, at every `now` of
/// [`pushback_nows`]; a `Retry-After` delay is at most `u32::MAX` seconds, or
/// the time until the date it names.
pub fn check_pushback(headers: &HeaderMap) {
    for now in pushback_nows() {
        let got = tower_lb::retry::pushback(headers, now);
        let want = expected_pushback(headers, now);
        assert_eq!(got, want, "pushback of {headers:?} at {now:?}");
        if let (Some(Pushback::RetryAfter(after)), None) =
            (got, headers.get("grpc-retry-pushback-ms"))
        {
            let bound = Duration::from_secs(u64::from(u32::MAX)).max(last_http_date_after(now));
            assert!(after <= bound, "Retry-After of {after:?} in {headers:?}");
        }
    }
}

fn last_http_date_after(now: SystemTime) -> Duration {
    (SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_HTTP_DATE_SECS))
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

/// The documented pushback: `grpc-retry-pushback-ms` wins, and is a delay
/// only as a plain non-negative integer that fits a `u64` (gRPC A6);
/// `Retry-After` is delay-seconds capped at `u32::MAX` or an HTTP-date, and
/// ignored when malformed. Only the first value of each header counts.
pub fn expected_pushback(headers: &HeaderMap, now: SystemTime) -> Option<Pushback> {
    if let Some(value) = headers.get("grpc-retry-pushback-ms") {
        let text = trim_ows(value.as_bytes());
        let ms = all_digits(text).then(|| saturating_decimal(text)).flatten();
        return Some(match ms {
            Some(ms) if ms <= u128::from(u64::MAX) => {
                Pushback::RetryAfter(Duration::from_millis(ms as u64))
            }
            _ => Pushback::DoNotRetry,
        });
    }
    let value = headers.get("retry-after")?;
    if !value.as_bytes().is_ascii() {
        return None;
    }
    let text = trim_ows(value.as_bytes());
    if all_digits(text) {
        let secs = saturating_decimal(text).unwrap_or(u128::MAX);
        let secs = secs.min(u128::from(u32::MAX)) as u64;
        return Some(Pushback::RetryAfter(Duration::from_secs(secs)));
    }
    let text = std::str::from_utf8(text).ok()?;
    let date = httpdate::parse_http_date(text).ok()?;
    Some(Pushback::RetryAfter(
        date.duration_since(now).unwrap_or(Duration::ZERO),
    ))
}

/// `bytes` without the spaces and tabs around it (HTTP's OWS).
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

fn all_digits(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)
}

/// The decimal number `digits` spells, `None` past `u128`.
fn saturating_decimal(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, d| {
        n.checked_mul(10)?.checked_add(u128::from(d - b'0'))
    })
}

// ---------------------------------------------------------------------------
// grpc-timeout
// ---------------------------------------------------------------------------

/// A deadline already on the call, for the "an earlier deadline stands"
/// check: 200 000.5 s, half a second from anything a `grpc-timeout` can
/// say, so the time between setting it and reading the header never
/// decides the comparison.
pub const PRESET_DEADLINE: Duration = Duration::from_millis(200_000_500);

/// `data` as a `grpc-timeout` value through `GrpcTimeoutLayer`.
pub fn grpc_timeout(data: &[u8]) {
    if let Ok(value) = HeaderValue::from_bytes(data) {
        check_grpc_timeout(&value);
    }
}

/// `GrpcTimeoutLayer` turns `value` into the call's deadline exactly when it
/// is 1 to 8 ASCII digits and a unit of `H M S m u n` (gRPC over HTTP/2),
/// and keeps an earlier deadline the call already has.
pub fn check_grpc_timeout(value: &HeaderValue) {
    let expected = expected_grpc_timeout(value.as_bytes());
    let read = deadline_after_layer(value, None).map(|d| d.budget());
    assert_eq!(read, expected, "grpc-timeout {value:?}");

    let preset = CallDeadline::after(PRESET_DEADLINE);
    let kept = deadline_after_layer(value, Some(preset)).map(|d| d.budget());
    let expected = match expected {
        Some(theirs) if theirs < PRESET_DEADLINE => theirs,
        _ => PRESET_DEADLINE,
    };
    assert_eq!(
        kept,
        Some(expected),
        "grpc-timeout {value:?} over an earlier deadline"
    );
}

/// The call deadline a request with `grpc-timeout: value` (and `preset`
/// already in its extensions) reaches the inner service with.
fn deadline_after_layer(value: &HeaderValue, preset: Option<CallDeadline>) -> Option<CallDeadline> {
    let inner = tower::service_fn(|req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(CallDeadline::of(&req)))
    });
    let mut service = GrpcTimeoutLayer.layer(inner);
    let mut req = Request::post("/pkg.Service/Method")
        .body(())
        .unwrap_or_else(|e| panic!("request: {e}"));
    req.headers_mut().insert("grpc-timeout", value.clone());
    if let Some(preset) = preset {
        req.extensions_mut().insert(preset);
    }
    let ready = ready_now(std::future::poll_fn(|cx| service.poll_ready(cx)));
    let Ok(()) = ready;
    let Ok(deadline) = ready_now(service.call(req));
    deadline
}

/// The timeout the gRPC specification reads from `bytes`:
/// `TimeoutValue TimeoutUnit`, `TimeoutValue = 1*8 DIGIT`.
pub fn expected_grpc_timeout(bytes: &[u8]) -> Option<Duration> {
    let (&unit, digits) = bytes.split_last()?;
    if !(1..=8).contains(&digits.len()) || !all_digits(digits) {
        return None;
    }
    let amount = u64::try_from(saturating_decimal(digits)?).ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 60 * 60),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// HttpRetryOn: status, grpc-status, pushback
// ---------------------------------------------------------------------------

/// `data` as a response (status line, headers) through `HttpRetryOn`.
pub fn retry_on_response(data: &[u8]) {
    let message = Message::parse(data);
    let Ok(status) = StatusCode::from_bytes(trim_ows(&message.start)) else {
        return;
    };
    check_retry_on(status, &message.headers);
}

/// The policies every response is judged by: `(policy, retried statuses,
/// retried gRPC codes)`.
fn retry_policies() -> Vec<(HttpRetryOn, Vec<u16>, Vec<u8>)> {
    let custom = HttpRetryOn::none()
        .status(StatusCode::CONTINUE)
        .status(StatusCode::TOO_MANY_REQUESTS)
        .status(StatusCode::from_u16(999).unwrap_or_else(|e| panic!("{e}")))
        .grpc_code(0)
        .and_then(|p| p.grpc_code(8))
        .and_then(|p| p.grpc_code(16))
        .unwrap_or_else(|e| panic!("{e}"));
    vec![
        (HttpRetryOn::new(), vec![502, 503, 504], vec![14]),
        (HttpRetryOn::none(), vec![], vec![]),
        (custom, vec![100, 429, 999], vec![0, 8, 16]),
    ]
}

/// `HttpRetryOn` retries a response exactly when its status or its
/// `grpc-status` (first value) is one it retries, after the server's
/// pushback, and accepts it when the server says not to retry.
pub fn check_retry_on(status: StatusCode, headers: &HeaderMap) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers.clone();
    let code = grpc_status_u8(headers);
    for (policy, statuses, codes) in retry_policies() {
        let before = SystemTime::now();
        let verdict = policy.response(&response);
        let after = SystemTime::now();
        let retried =
            statuses.contains(&status.as_u16()) || code.is_some_and(|c| codes.contains(&c));
        if !retried {
            assert_eq!(verdict, ResponseVerdict::Accept, "{status} {headers:?}");
            continue;
        }
        // Pushback read at some moment between `before` and `after`.
        let early = tower_lb::retry::pushback(headers, before);
        let late = tower_lb::retry::pushback(headers, after);
        match verdict {
            ResponseVerdict::Accept => {
                assert_eq!(early, Some(Pushback::DoNotRetry), "{status} {headers:?}");
            }
            ResponseVerdict::Retry { after: None } => {
                assert_eq!(early, None, "{status} {headers:?}");
            }
            ResponseVerdict::Retry { after: Some(wait) } => {
                let (Some(Pushback::RetryAfter(most)), Some(Pushback::RetryAfter(least))) =
                    (early, late)
                else {
                    panic!("{status} {headers:?}: retry after {wait:?}, pushback {early:?}");
                };
                assert!(
                    least <= wait && wait <= most,
                    "{wait:?} not in {least:?}..={most:?}"
                );
            }
        }
    }
}

/// The `grpc-status` code `HttpRetryOn` reads: as tonic reads it, one
/// digit, or `10` to `16`; nothing else is a code.
fn grpc_status_u8(headers: &HeaderMap) -> Option<u8> {
    match grpc_status(headers) {
        GrpcStatus::Code(code) => Some(code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// HttpClassify::grpc
// ---------------------------------------------------------------------------

/// `data` as a response (status line, headers, trailers) through
/// `HttpClassify::grpc()`.
pub fn grpc_classify(data: &[u8]) {
    let message = Message::parse(data);
    let Ok(status) = StatusCode::from_bytes(trim_ows(&message.start)) else {
        return;
    };
    check_grpc_classify(status, &message.headers, message.trailers.as_ref());
}

/// What a `grpc-status` says, as tonic reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatus {
    /// No `grpc-status`.
    Missing,
    /// A code from 0 to 16.
    Code(u8),
    /// A number that is not a gRPC code.
    OutOfRange,
    /// Not a number.
    Malformed,
}

/// The first `grpc-status` in `map`.
pub fn grpc_status(map: &HeaderMap) -> GrpcStatus {
    let Some(value) = map.get("grpc-status") else {
        return GrpcStatus::Missing;
    };
    match value.as_bytes() {
        [d @ b'0'..=b'9'] => GrpcStatus::Code(d - b'0'),
        [b'1', d @ b'0'..=b'6'] => GrpcStatus::Code(10 + d - b'0'),
        bytes if !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit) => {
            GrpcStatus::OutOfRange
        }
        _ => GrpcStatus::Malformed,
    }
}

/// The codes `HttpClassify::grpc` documents as failures of the server:
/// UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
/// DATA_LOSS.
pub const GRPC_FAILURE_CODES: [u8; 6] = [2, 4, 12, 13, 14, 15];

/// RESOURCE_EXHAUSTED: documented as an overload of the server, which
/// raises its cost and is no failure.
pub const GRPC_RESOURCE_EXHAUSTED: u8 = 8;

/// The documented verdict (`Some(true)` a success), or `None` where the
/// docs say nothing.
pub fn expected_grpc_verdict(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Option<bool> {
    if status != StatusCode::OK {
        return Some(false);
    }
    let found = match grpc_status(headers) {
        GrpcStatus::Missing => trailers.map_or(GrpcStatus::Missing, grpc_status),
        found => found,
    };
    match found {
        GrpcStatus::Missing => Some(false),
        // RESOURCE_EXHAUSTED is reported as an overload, neither a success
        // nor a failure: the classifier's verdict does not say it.
        GrpcStatus::Code(GRPC_RESOURCE_EXHAUSTED) => None,
        GrpcStatus::Code(code) => Some(!GRPC_FAILURE_CODES.contains(&code)),
        // Not a gRPC code: a failed call, as a gRPC client reads it.
        GrpcStatus::OutOfRange | GrpcStatus::Malformed => Some(false),
    }
}

/// `HttpClassify::grpc()` judges the response as documented, and its body
/// wrapper (with ORCA load reports read from headers and trailers) hands
/// the body through unchanged.
pub fn check_grpc_classify(status: StatusCode, headers: &HeaderMap, trailers: Option<&HeaderMap>) {
    let classify = HttpClassify::grpc();
    let response = grpc_response(status, headers, trailers);
    let verdict = match classify.classifier().clone().classify_response(&response) {
        ClassifiedResponse::Ready(verdict) => verdict.is_ok(),
        ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(trailers).is_ok(),
    };
    if let Some(expected) = expected_grpc_verdict(status, headers, trailers) {
        assert_eq!(
            verdict, expected,
            "{status} {headers:?} trailers {trailers:?}: success {verdict}"
        );
    }

    let classify = classify.load_reports(OrcaLoadReports);
    let response = Classify::classify_response(
        &classify,
        grpc_response(status, headers, trailers),
        OutcomeReport::detached(),
    );
    assert_eq!(response.status(), status);
    assert_eq!(response.headers(), headers);
    let mut body = response.into_body();
    let mut cx = Context::from_waker(Waker::noop());
    let mut frames = Vec::new();
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        let Ok(frame) = frame;
        frames.push(frame);
    }
    let mut frames = frames.into_iter();
    let data = frames.next().and_then(|f| f.into_data().ok());
    assert_eq!(data, Some(GRPC_MESSAGE));
    let last = frames.next().and_then(|f| f.into_trailers().ok());
    assert_eq!(last.as_ref(), trailers);
    assert!(frames.next().is_none());
}

/// One gRPC message frame (its bytes do not matter to the classifier).
const GRPC_MESSAGE: &[u8] = b"\0\0\0\0\x01x";

fn grpc_response(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Response<Frames> {
    let mut frames = vec![Frame::data(GRPC_MESSAGE)];
    frames.extend(trailers.cloned().map(Frame::trailers));
    frames.reverse();
    let mut response = Response::new(Frames(frames));
    *response.status_mut() = status;
    *response.headers_mut() = headers.clone();
    response
}

/// A body of frames known in advance (kept in reverse order).
#[derive(Debug)]
pub struct Frames(Vec<Frame<&'static [u8]>>);

impl Body for Frames {
    type Data = &'static [u8];
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.pop().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Request safety: MethodSafety, Safety::of_http
// ---------------------------------------------------------------------------

/// `data` as a request (`METHOD path` line, headers) through
/// `MethodSafety` and `Safety::of_http`.
pub fn method_safety(data: &[u8]) {
    let message = Message::parse(data);
    let start = &message.start;
    let (method, path) = match start.iter().position(|&b| b == b' ') {
        Some(at) => (&start[..at], &start[at + 1..]),
        None => (&b"POST"[..], &start[..]),
    };
    if let Ok(path) = std::str::from_utf8(path) {
        check_method_table(path);
    }
    if let Ok(method) = Method::from_bytes(method) {
        check_request_safety(&method, path, &message.headers);
    }
}

/// The table every path is looked up in: `(table, methods, services)`, the
/// entries as they are looked up (method paths with one leading `/`,
/// services without slashes around them).
/// Table entries as `(key, class)`.
type Entries = Vec<(&'static str, Safety)>;

fn method_table() -> (MethodSafety, Entries, Entries) {
    let table = MethodSafety::new()
        .service("grpc.health.v1.Health", Safety::Safe)
        .service("/shop.Orders/", Safety::Idempotent)
        .service("odd/name", Safety::Safe)
        .method("/shop.Orders/Create", Safety::Unsafe)
        .method("shop.Orders/Get", Safety::Safe)
        .method("//pkg.S/M", Safety::Idempotent);
    let methods = vec![
        ("/shop.Orders/Create", Safety::Unsafe),
        ("/shop.Orders/Get", Safety::Safe),
        ("/pkg.S/M", Safety::Idempotent),
    ];
    let services = vec![
        ("grpc.health.v1.Health", Safety::Safe),
        ("shop.Orders", Safety::Idempotent),
        ("odd/name", Safety::Safe),
    ];
    (table, methods, services)
}

/// `MethodSafety::of(path)`: a method entry for exactly `path`, else the
/// entry of the service in `/service/method`, else nothing.
pub fn check_method_table(path: &str) {
    let (table, methods, services) = method_table();
    let lookup = |entries: &[(&str, Safety)], key: &str| {
        entries.iter().find(|(k, _)| *k == key).map(|&(_, s)| s)
    };
    let expected = lookup(&methods, path).or_else(|| {
        let (service, _method) = path.strip_prefix('/')?.rsplit_once('/')?;
        lookup(&services, service)
    });
    assert_eq!(table.of(path), expected, "MethodSafety::of({path:?})");
    if !path.starts_with('/') {
        assert_eq!(table.of(path), None, "{path:?} is not a gRPC path");
    }
}

/// `Safety::of_http` follows RFC 9110 (and `Idempotency-Key`), an explicit
/// class wins, and the `MethodSafety` layer gives a call its table class
/// unless it has one.
pub fn check_request_safety(method: &Method, path: &[u8], headers: &HeaderMap) {
    let request = || {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .body(())
            .ok()?;
        *req.headers_mut() = headers.clone();
        Some(req)
    };
    let Some(req) = request() else {
        return;
    };
    let by_rfc = match *method {
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE => Safety::Safe,
        Method::PUT | Method::DELETE => Safety::Idempotent,
        _ if headers.contains_key("idempotency-key") => Safety::Idempotent,
        _ => Safety::Unsafe,
    };
    assert_eq!(
        Safety::of_http(&req),
        by_rfc,
        "{method} {path:?} {headers:?}"
    );

    let (table, _, _) = method_table();
    let from_table = table.of(req.uri().path());
    let inner = tower::service_fn(|req: Request<()>| {
        std::future::ready(Ok::<_, Infallible>((
            // The class the layer gave the call: the caller's explicit
            // one, else the table's, in the call's context.
            req.extensions()
                .get::<Safety>()
                .copied()
                .or_else(|| req.call_context().and_then(CallContext::safety)),
            Safety::of_http(&req),
        )))
    });
    let mut service = table.layer(inner);
    let Ok((inserted, class)) = ready_now(service.call(req));
    assert_eq!(inserted, from_table, "{method} {path:?}");
    assert_eq!(class, from_table.unwrap_or(by_rfc));

    for explicit in [Safety::Safe, Safety::Idempotent, Safety::Unsafe] {
        let Some(mut marked) = request() else {
            unreachable!("built once already");
        };
        marked.extensions_mut().insert(explicit);
        assert_eq!(Safety::of_http(&marked), explicit);
        let Ok((kept, class)) = ready_now(service.call(marked));
        assert_eq!(
            (kept, class),
            (Some(explicit), explicit),
            "{method} {path:?}"
        );
    }
}
