//! Load reports that endpoints send about themselves, and how to find them
//! in responses: [`LoadExtractor`], a bare utilization header, and (feature
//! `orca`) ORCA's own forms, in the `orca` submodule.
//!
//! A server knows its own utilization far better than any client can guess
//! from latency: weighted round robin (gRPC A58) weights each endpoint by the
//! rate it serves divided by the utilization that rate costs it. With the
//! `orca` feature this module reads those reports in every form the ORCA
//! specification allows, the `endpoint-load-metrics` response header
//! (`TEXT`, `JSON` or `BIN`) and the gRPC trailer
//! `endpoint-load-metrics-bin`; any other header can be read through
//! [`LoadExtractor`].
//!
//! Parsing is strict about values and lenient about names: a number that is
//! not finite and non-negative, a duplicate key or a broken encoding makes the
//! whole report an error (a half-read report would skew the weights), while
//! keys this version does not know are skipped, so servers can add fields
//! without breaking older clients. No input makes a parser panic.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};

#[cfg(feature = "orca")]
mod orca;

#[cfg(feature = "orca")]
pub use self::orca::OrcaLoadReports;

/// Longest piece of offending input quoted in an error message, in
/// characters: enough to recognise it in a log, not a whole header.
const EXCERPT_CHARS: usize = 64;

/// One load report from an endpoint: the fields of ORCA's
/// `xds.data.orca.v3.OrcaLoadReport`.
///
/// Every number is finite and non-negative (the parsers reject anything
/// else), and a field the server did not send is 0, as in proto3. The
/// deprecated integer `rps` field is folded into
/// [`rps_fractional`](Self::rps_fractional).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LoadReport {
    /// CPU utilization as a fraction of the endpoint's CPU; may exceed 1 when
    /// the endpoint runs past its soft limit. The weight uses it when the
    /// server reports no application utilization.
    pub cpu_utilization: f64,
    /// Memory utilization as a fraction of the endpoint's memory.
    pub mem_utilization: f64,
    /// The utilization the application itself considers limiting (for
    /// example the larger of CPU and memory); preferred over CPU for the
    /// weight when it is set. May exceed 1.
    pub application_utilization: f64,
    /// Requests per second the endpoint serves, all clients together: the
    /// rate in A58's weight. Filled from the deprecated integer `rps` field
    /// when a server sends only that.
    pub rps_fractional: f64,
    /// Errors per second the endpoint serves, which A58 turns into a weight
    /// penalty.
    pub eps: f64,
    /// Application-defined absolute costs of the request (for example bytes
    /// of storage), by name.
    pub request_cost: HashMap<String, f64>,
    /// Utilization of named resources, each a fraction of the total.
    pub utilization: HashMap<String, f64>,
    /// Application-defined metrics, opaque to the balancer, by name.
    pub named_metrics: HashMap<String, f64>,
    /// The report has a utilization but cannot have a rate (a bare
    /// utilization header), so the balancer weighs it by the rate this
    /// client sends. An ORCA report without a rate is ignored instead, as
    /// A58 says.
    pub(crate) rate_from_client: bool,
}

/// Why a load report could not be read. The balancer ignores such a report
/// (it never fails the request for it), so the message only has to tell an
/// operator what the server sent wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadReportError {
    /// The header was present but blank.
    #[error("empty load report")]
    Empty,

    /// The header bytes are not UTF-8, so no text form can be read.
    #[error("load report is not valid UTF-8")]
    NotUtf8,

    /// The header did not start with `TEXT`, `JSON` or `BIN`.
    #[error("unknown load report format {format:?}")]
    UnknownFormat {
        /// The first word of the header (shortened if long).
        format: String,
    },

    /// A value is not a number, or is NaN, infinite or negative.
    #[error("load report field {field} is not a finite non-negative number: {value}")]
    InvalidNumber {
        /// The field, `map.NAME` for a map entry, or the header name for a
        /// plain utilization header.
        field: String,
        /// The value as sent (shortened if long).
        value: String,
    },

    /// The same key appears twice, so which one the server meant is unknown.
    #[error("duplicate key {key} in load report")]
    DuplicateKey {
        /// The key, under its snake_case name.
        key: String,
    },

    /// A `TEXT` entry is not `key=value` (or `key:value`), or names a map
    /// without an entry (`named_metrics` instead of `named_metrics.NAME`).
    #[error("malformed load report entry {entry:?}: expected key=value")]
    MalformedEntry {
        /// The entry (shortened if long).
        entry: String,
    },

    /// A `JSON` map field is not an object of names to numbers.
    #[error("load report field {field} is not a map of names to numbers")]
    NotAMap {
        /// The map field.
        field: String,
    },

    /// The `JSON` form is not a JSON object.
    #[error("invalid JSON in load report: {reason}")]
    InvalidJson {
        /// What the JSON parser objected to.
        reason: String,
    },

    /// The `BIN` form or the gRPC metadata is not valid base64.
    #[error("invalid base64 in load report: {reason}")]
    InvalidBase64 {
        /// What the base64 decoder objected to.
        reason: String,
    },

    /// The binary form is not a valid `OrcaLoadReport` protobuf.
    #[error("invalid protobuf in load report: {reason}")]
    InvalidProtobuf {
        /// What the protobuf decoder objected to.
        reason: String,
    },
}

impl LoadReport {
    /// The utilization A58 divides the rate by: `application_utilization`
    /// when the server reports it (it knows what limits it), otherwise
    /// `cpu_utilization`.
    pub fn utilization_for_weight(&self) -> f64 {
        if self.application_utilization > 0.0 {
            self.application_utilization
        } else {
            self.cpu_utilization
        }
    }
}

/// Finds the load report in a response, so that the balancer can weight
/// endpoints by what they say about themselves.
///
/// [`OrcaLoadReports`] (feature `orca`) reads the ORCA headers and
/// trailers; implement this for servers that report load some other way. `None` means the response
/// carries no report (the endpoint's last weight stands); `Some(Err(_))`
/// means it carries one that cannot be read, which the balancer counts and
/// otherwise ignores.
///
// `from_headers` reads "the report from the headers"; it converts nothing,
// so clippy's naming rule for `from_*` constructors does not apply.
#[allow(clippy::wrong_self_convention)]
#[cfg_attr(
    feature = "orca",
    doc = "[`OrcaLoadReports`]: self::orca::OrcaLoadReports"
)]
#[cfg_attr(
    not(feature = "orca"),
    doc = "[`OrcaLoadReports`]: crate#cargo-features"
)]
pub trait LoadExtractor: Clone + Send + Sync + 'static {
    /// The report in the response headers, if any.
    fn from_headers(&self, headers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>>;

    /// The report in the response trailers, if any. gRPC servers send their
    /// reports here, since the load is known only once the call is done.
    /// By default there is none.
    fn from_trailers(&self, trailers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        let _ = trailers;
        None
    }
}

/// Reads a bare utilization from a header of the user's choice, such as
/// `x-server-load: 0.7`, for servers that report how busy they are but do
/// not speak ORCA.
///
/// The number becomes the report's
/// [`application_utilization`](LoadReport::application_utilization); nothing
/// else is set, in particular not the request rate, so the balancer uses the
/// rate it observes itself sending the endpoint instead. From one client's
/// view that is the right rate: capacity is what it sends divided by the
/// utilization that causes. The header is looked for in trailers too.
#[derive(Debug, Clone)]
pub struct UtilizationHeader {
    name: HeaderName,
}

impl UtilizationHeader {
    /// Reads the utilization from the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }

    fn read(&self, map: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        let value = map.get(&self.name)?;
        Some(self.parse(value))
    }

    fn parse(&self, value: &HeaderValue) -> Result<LoadReport, LoadReportError> {
        let text = std::str::from_utf8(value.as_bytes()).map_err(|_| LoadReportError::NotUtf8)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(LoadReportError::Empty);
        }
        let utilization = parse_number(self.name.as_str(), text)?;
        Ok(LoadReport {
            application_utilization: utilization,
            rate_from_client: true,
            ..LoadReport::default()
        })
    }
}

impl LoadExtractor for UtilizationHeader {
    fn from_headers(&self, headers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        self.read(headers)
    }

    fn from_trailers(&self, trailers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        self.read(trailers)
    }
}

/// Reads no load reports, for strategies that do not weight endpoints by
/// them: every response counts as carrying none, and no header is parsed.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLoadReports;

impl LoadExtractor for NoLoadReports {
    fn from_headers(&self, _headers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        None
    }
}

/// Parses a number written as text and checks it is finite and
/// non-negative.
fn parse_number(field: &str, text: &str) -> Result<f64, LoadReportError> {
    match text.parse::<f64>() {
        Ok(value) => checked(field, value, || text.to_owned()),
        Err(_) => Err(invalid_number(field, text)),
    }
}

/// `value` if it is finite and non-negative (with -0 made +0), else an
/// error quoting the value as `shown` renders it.
fn checked(
    field: &str,
    value: f64,
    shown: impl FnOnce() -> String,
) -> Result<f64, LoadReportError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value.abs())
    } else {
        Err(invalid_number(field, &shown()))
    }
}

fn invalid_number(field: &str, value: &str) -> LoadReportError {
    LoadReportError::InvalidNumber {
        field: excerpt(field),
        value: excerpt(value),
    }
}

/// `text`, cut to [`EXCERPT_CHARS`] characters for an error message.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field an `InvalidNumber` error names (the ORCA tests use it too).
    pub(super) fn field_of(e: &LoadReportError) -> &str {
        match e {
            LoadReportError::InvalidNumber { field, .. } => field,
            other => panic!("expected InvalidNumber, got {other:?}"),
        }
    }

    /// A header map of `entries` (the ORCA tests use it too).
    pub(super) fn headers(entries: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in entries {
            let value = HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{e}"));
            map.append(HeaderName::from_static(name), value);
        }
        map
    }

    #[test]
    fn utilization_for_weight_prefers_application_utilization() {
        let mut report = LoadReport {
            cpu_utilization: 0.4,
            ..LoadReport::default()
        };
        assert_eq!(report.utilization_for_weight(), 0.4);
        report.application_utilization = 0.9;
        assert_eq!(report.utilization_for_weight(), 0.9);
    }

    #[test]
    fn utilization_header_reads_application_utilization_only() {
        let extractor = UtilizationHeader::new(HeaderName::from_static("x-server-load"));
        let map = headers(&[("x-server-load", " 0.7 ")]);
        let report = extractor.from_headers(&map).map(|r| r.ok());
        let expected = LoadReport {
            application_utilization: 0.7,
            rate_from_client: true,
            ..LoadReport::default()
        };
        assert_eq!(report, Some(Some(expected.clone())));
        assert_eq!(
            extractor.from_trailers(&map).map(|r| r.ok()),
            Some(Some(expected))
        );
        assert!(extractor.from_headers(&HeaderMap::new()).is_none());
    }

    #[test]
    fn utilization_header_rejects_invalid_numbers() {
        let extractor = UtilizationHeader::new(HeaderName::from_static("x-server-load"));
        for bad in ["busy", "NaN", "-0.5", "inf", "70%"] {
            let map = headers(&[("x-server-load", bad)]);
            let e = extractor.from_headers(&map).and_then(|r| r.err());
            assert_eq!(
                e.as_ref().map(field_of),
                Some("x-server-load"),
                "{bad:?} accepted"
            );
        }
        let map = headers(&[("x-server-load", "")]);
        assert!(matches!(
            extractor.from_headers(&map),
            Some(Err(LoadReportError::Empty))
        ));
    }

    #[test]
    fn no_load_reports_finds_nothing() {
        let map = headers(&[("endpoint-load-metrics", "TEXT eps=1")]);
        assert!(NoLoadReports.from_headers(&map).is_none());
        assert!(NoLoadReports.from_trailers(&map).is_none());
    }
}
