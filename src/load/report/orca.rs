//! ORCA's load reports: the `endpoint-load-metrics` header in its `TEXT`,
//! `JSON` and `BIN` forms, and gRPC's `endpoint-load-metrics-bin`
//! metadata. Behind the `orca` feature (on by default, and with `http`),
//! which brings the parsers' dependencies: prost, serde, serde_json and
//! base64.

use std::collections::{HashMap, HashSet};
use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message as _;

use super::{
    checked, excerpt, invalid_number, parse_number, LoadExtractor, LoadReport, LoadReportError,
};
use crate::header::WALKED;

/// The response header that carries an ORCA report in text, JSON or binary
/// form.
const ENDPOINT_LOAD_METRICS: HeaderName = HeaderName::from_static("endpoint-load-metrics");

/// The gRPC metadata key that carries a binary ORCA report (base64 on the
/// wire, as all `-bin` metadata).
const ENDPOINT_LOAD_METRICS_BIN: HeaderName = HeaderName::from_static("endpoint-load-metrics-bin");

/// Standard-alphabet base64 that accepts input with or without padding: gRPC
/// requires receivers to accept both, and servers differ in what they send.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl LoadReport {
    /// Reads the `endpoint-load-metrics` response header, in whichever of
    /// its three forms the server chose; the first word says which:
    ///
    /// - `TEXT`: comma-separated `key=value` entries (`key:value`, as older
    ///   Envoy writes, is accepted too). Keys are field names, or
    ///   `named_metrics.NAME`, `utilization.NAME`, `request_cost.NAME` for map
    ///   entries.
    /// - `JSON`: the proto3 JSON form of `OrcaLoadReport`, with snake_case or
    ///   lowerCamelCase field names and maps as objects.
    /// - `BIN`: base64 (padded or not) of the protobuf `OrcaLoadReport`.
    ///
    /// The format word is case-sensitive, as in the ORCA specification.
    /// Unknown keys are skipped so that newer servers do not break older
    /// clients; bad numbers, duplicate keys and broken encodings are errors.
    ///
    /// ```
    /// use http::HeaderValue;
    /// use tower_lb::load::LoadReport;
    ///
    /// let header = HeaderValue::from_static(
    ///     "TEXT cpu_utilization=0.3, rps_fractional=10, named_metrics.queue=4",
    /// );
    /// let report = LoadReport::from_header(&header)?;
    /// assert_eq!(report.rps_fractional, 10.0);
    /// assert_eq!(report.named_metrics["queue"], 4.0);
    /// // No application utilization was reported, so the weight uses CPU.
    /// assert_eq!(report.utilization_for_weight(), 0.3);
    ///
    /// let json = HeaderValue::from_static(r#"JSON {"applicationUtilization": 0.5}"#);
    /// assert_eq!(LoadReport::from_header(&json)?.utilization_for_weight(), 0.5);
    ///
    /// assert!(LoadReport::from_header(&HeaderValue::from_static("XML <load/>")).is_err());
    /// # Ok::<(), tower_lb::load::LoadReportError>(())
    /// ```
    pub fn from_header(value: &HeaderValue) -> Result<LoadReport, LoadReportError> {
        let text = std::str::from_utf8(value.as_bytes()).map_err(|_| LoadReportError::NotUtf8)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(LoadReportError::Empty);
        }
        let (format, body) = match text.find(|c: char| c.is_ascii_whitespace()) {
            Some(at) => (&text[..at], text[at..].trim_start()),
            None => (text, ""),
        };
        let parse = match format {
            "TEXT" => parse_text,
            "JSON" => parse_json,
            "BIN" => parse_base64,
            _ => {
                return Err(LoadReportError::UnknownFormat {
                    format: excerpt(format),
                })
            }
        };
        if body.is_empty() {
            return Err(LoadReportError::Empty);
        }
        parse(body)
    }

    /// Decodes a protobuf `xds.data.orca.v3.OrcaLoadReport`, for reports
    /// that arrive already decoded from base64 (for example from a gRPC
    /// library's metadata map, or ORCA's out-of-band stream).
    ///
    /// An empty slice is a valid, empty report, as in protobuf. Unknown
    /// fields are skipped; a later entry for the same map key replaces an
    /// earlier one, as protobuf specifies.
    pub fn from_protobuf(bytes: &[u8]) -> Result<LoadReport, LoadReportError> {
        let proto =
            OrcaLoadReportProto::decode(bytes).map_err(|e| LoadReportError::InvalidProtobuf {
                reason: e.to_string(),
            })?;
        let mut report = LoadReport {
            cpu_utilization: checked_proto("cpu_utilization", proto.cpu_utilization)?,
            mem_utilization: checked_proto("mem_utilization", proto.mem_utilization)?,
            application_utilization: checked_proto(
                "application_utilization",
                proto.application_utilization,
            )?,
            rps_fractional: checked_proto("rps_fractional", proto.rps_fractional)?,
            eps: checked_proto("eps", proto.eps)?,
            request_cost: checked_proto_map("request_cost", proto.request_cost)?,
            utilization: checked_proto_map("utilization", proto.utilization)?,
            named_metrics: checked_proto_map("named_metrics", proto.named_metrics)?,
            rate_from_client: false,
        };
        if report.rps_fractional == 0.0 {
            report.rps_fractional = proto.rps as f64;
        }
        Ok(report)
    }

    /// Reads the `endpoint-load-metrics-bin` gRPC metadata: base64 (padded
    /// or not, as gRPC requires receivers to accept both) of the protobuf
    /// report. It arrives in the trailers, or in the headers of a
    /// trailers-only response.
    pub fn from_grpc_trailer(value: &HeaderValue) -> Result<LoadReport, LoadReportError> {
        let bytes = value.as_bytes().trim_ascii();
        if bytes.is_empty() {
            return Err(LoadReportError::Empty);
        }
        decode_base64_report(bytes)
    }
}

/// Reads ORCA load reports: the `endpoint-load-metrics` header (HTTP
/// servers) and the `endpoint-load-metrics-bin` metadata (gRPC servers).
///
/// In headers the text header comes first, then the binary one (a gRPC
/// trailers-only response puts its trailers in the headers); in trailers the
/// binary one comes first, as gRPC sends it there.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrcaLoadReports;

impl LoadExtractor for OrcaLoadReports {
    fn from_headers(&self, headers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        let (text, binary) = orca_values(headers);
        if let Some(value) = text {
            return Some(LoadReport::from_header(value));
        }
        binary.map(LoadReport::from_grpc_trailer)
    }

    fn from_trailers(&self, trailers: &HeaderMap) -> Option<Result<LoadReport, LoadReportError>> {
        let (text, binary) = orca_values(trailers);
        if let Some(value) = binary {
            return Some(LoadReport::from_grpc_trailer(value));
        }
        text.map(LoadReport::from_header)
    }
}

/// The first `endpoint-load-metrics` and `endpoint-load-metrics-bin`
/// values in `headers`. Nearly every response has neither, and a miss by
/// `get` hashes the 21- or 25-byte name, twice per map: for the few
/// entries a response or its trailers usually have, one walk comparing
/// names (most differ in length at once) costs less.
fn orca_values(headers: &HeaderMap) -> (Option<&HeaderValue>, Option<&HeaderValue>) {
    if headers.keys_len() > WALKED {
        return (
            headers.get(ENDPOINT_LOAD_METRICS),
            headers.get(ENDPOINT_LOAD_METRICS_BIN),
        );
    }
    let (mut text, mut binary) = (None, None);
    for (name, value) in headers {
        if text.is_none() && *name == ENDPOINT_LOAD_METRICS {
            text = Some(value);
        } else if binary.is_none() && *name == ENDPOINT_LOAD_METRICS_BIN {
            binary = Some(value);
        }
    }
    (text, binary)
}

/// `xds.data.orca.v3.OrcaLoadReport`, written by hand so that building the
/// crate needs no `protoc`. Field numbers as in cncf/xds
/// `xds/data/orca/v3/orca_load_report.proto`.
#[derive(Clone, PartialEq, prost::Message)]
struct OrcaLoadReportProto {
    #[prost(double, tag = "1")]
    cpu_utilization: f64,
    #[prost(double, tag = "2")]
    mem_utilization: f64,
    /// Deprecated in favour of `rps_fractional`, still sent by old servers.
    #[prost(uint64, tag = "3")]
    rps: u64,
    #[prost(map = "string, double", tag = "4")]
    request_cost: HashMap<String, f64>,
    #[prost(map = "string, double", tag = "5")]
    utilization: HashMap<String, f64>,
    #[prost(double, tag = "6")]
    rps_fractional: f64,
    #[prost(double, tag = "7")]
    eps: f64,
    #[prost(map = "string, double", tag = "8")]
    named_metrics: HashMap<String, f64>,
    #[prost(double, tag = "9")]
    application_utilization: f64,
}

/// The fields of a report, as named in the text and JSON forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    CpuUtilization,
    MemUtilization,
    ApplicationUtilization,
    RpsFractional,
    Eps,
    Rps,
    RequestCost,
    Utilization,
    NamedMetrics,
}

impl Field {
    /// The field named `name`, in snake_case or in proto3 JSON's
    /// lowerCamelCase.
    fn from_name(name: &str) -> Option<Field> {
        Some(match name {
            "cpu_utilization" | "cpuUtilization" => Field::CpuUtilization,
            "mem_utilization" | "memUtilization" => Field::MemUtilization,
            "application_utilization" | "applicationUtilization" => Field::ApplicationUtilization,
            "rps_fractional" | "rpsFractional" => Field::RpsFractional,
            "eps" => Field::Eps,
            "rps" => Field::Rps,
            "request_cost" | "requestCost" => Field::RequestCost,
            "utilization" => Field::Utilization,
            "named_metrics" | "namedMetrics" => Field::NamedMetrics,
            _ => return None,
        })
    }

    /// The snake_case name, used in error messages and to spot a field sent
    /// under both of its names.
    fn name(self) -> &'static str {
        match self {
            Field::CpuUtilization => "cpu_utilization",
            Field::MemUtilization => "mem_utilization",
            Field::ApplicationUtilization => "application_utilization",
            Field::RpsFractional => "rps_fractional",
            Field::Eps => "eps",
            Field::Rps => "rps",
            Field::RequestCost => "request_cost",
            Field::Utilization => "utilization",
            Field::NamedMetrics => "named_metrics",
        }
    }

    fn is_map(self) -> bool {
        matches!(
            self,
            Field::RequestCost | Field::Utilization | Field::NamedMetrics
        )
    }
}

/// A report being assembled from text or JSON entries, checking that no key
/// comes twice.
#[derive(Default)]
struct Builder {
    report: LoadReport,
    /// The deprecated integer rate, used when `rps_fractional` is absent.
    rps: f64,
    /// The known fields seen so far, a bit each: the usual report has only
    /// these, and checking them allocates nothing.
    seen_fields: u16,
    /// Map entries (and, in TEXT, unknown keys) seen so far.
    seen: HashSet<String>,
    /// Unknown top-level JSON keys seen so far: a namespace of their own, as
    /// `"named_metrics.x"` there is an unknown key, not a map entry.
    seen_unknown: HashSet<String>,
}

impl Builder {
    fn see_field(&mut self, field: Field) -> Result<(), LoadReportError> {
        let bit = 1u16 << (field as u16);
        if self.seen_fields & bit != 0 {
            return Err(LoadReportError::DuplicateKey {
                key: field.name().to_owned(),
            });
        }
        self.seen_fields |= bit;
        Ok(())
    }

    fn see(&mut self, key: &str) -> Result<(), LoadReportError> {
        if self.seen.insert(key.to_owned()) {
            Ok(())
        } else {
            Err(LoadReportError::DuplicateKey { key: excerpt(key) })
        }
    }

    fn see_unknown_json_key(&mut self, key: &str) -> Result<(), LoadReportError> {
        if self.seen_unknown.insert(key.to_owned()) {
            Ok(())
        } else {
            Err(LoadReportError::DuplicateKey { key: excerpt(key) })
        }
    }

    /// Sets a scalar field to an already checked value.
    fn set(&mut self, field: Field, value: f64) {
        let slot = match field {
            Field::CpuUtilization => &mut self.report.cpu_utilization,
            Field::MemUtilization => &mut self.report.mem_utilization,
            Field::ApplicationUtilization => &mut self.report.application_utilization,
            Field::RpsFractional => &mut self.report.rps_fractional,
            Field::Eps => &mut self.report.eps,
            Field::Rps => &mut self.rps,
            Field::RequestCost | Field::Utilization | Field::NamedMetrics => return,
        };
        *slot = value;
    }

    fn map(&mut self, field: Field) -> Option<&mut HashMap<String, f64>> {
        match field {
            Field::RequestCost => Some(&mut self.report.request_cost),
            Field::Utilization => Some(&mut self.report.utilization),
            Field::NamedMetrics => Some(&mut self.report.named_metrics),
            _ => None,
        }
    }

    fn finish(mut self) -> LoadReport {
        if self.report.rps_fractional == 0.0 {
            self.report.rps_fractional = self.rps;
        }
        self.report
    }
}

/// The `TEXT` form: `key=value, key=value, ...`.
fn parse_text(body: &str) -> Result<LoadReport, LoadReportError> {
    let mut builder = Builder::default();
    for entry in body.split(',') {
        let entry = entry.trim();
        // Tolerate a trailing or doubled comma.
        if entry.is_empty() {
            continue;
        }
        let malformed = || LoadReportError::MalformedEntry {
            entry: excerpt(entry),
        };
        let (key, value) = entry
            .split_once(['=', ':'])
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(malformed)?;
        if key.is_empty() {
            return Err(malformed());
        }
        match key.split_once('.') {
            None => match Field::from_name(key) {
                Some(field) if field.is_map() => return Err(malformed()),
                Some(field) => {
                    builder.see_field(field)?;
                    builder.set(field, parse_number(field.name(), value)?);
                }
                None => builder.see(key)?,
            },
            Some((prefix, name)) => match Field::from_name(prefix).filter(|f| f.is_map()) {
                Some(field) => {
                    let key = format!("{}.{name}", field.name());
                    builder.see(&key)?;
                    let value = parse_number(&key, value)?;
                    if let Some(map) = builder.map(field) {
                        map.insert(name.to_owned(), value);
                    }
                }
                None => builder.see(key)?,
            },
        }
    }
    Ok(builder.finish())
}

/// The `JSON` form: proto3 JSON of `OrcaLoadReport`.
fn parse_json(body: &str) -> Result<LoadReport, LoadReportError> {
    let json: Json = serde_json::from_str(body).map_err(|e| LoadReportError::InvalidJson {
        reason: e.to_string(),
    })?;
    let Json::Object(entries) = json else {
        return Err(LoadReportError::InvalidJson {
            reason: format!("expected an object, found {}", json.describe()),
        });
    };
    let mut builder = Builder::default();
    for (key, value) in entries {
        let Some(field) = Field::from_name(&key) else {
            builder.see_unknown_json_key(&key)?;
            continue;
        };
        builder.see_field(field)?;
        // proto3 JSON: null stands for the default value.
        if value == Json::Null {
            continue;
        }
        if !field.is_map() {
            builder.set(field, json_number(field.name(), &value)?);
            continue;
        }
        let Json::Object(map_entries) = value else {
            return Err(LoadReportError::NotAMap {
                field: field.name().to_owned(),
            });
        };
        for (name, value) in map_entries {
            let key = format!("{}.{name}", field.name());
            builder.see(&key)?;
            let value = json_number(&key, &value)?;
            if let Some(map) = builder.map(field) {
                map.insert(name, value);
            }
        }
    }
    Ok(builder.finish())
}

/// The `BIN` form: base64 of the protobuf.
fn parse_base64(body: &str) -> Result<LoadReport, LoadReportError> {
    decode_base64_report(body.as_bytes())
}

fn decode_base64_report(encoded: &[u8]) -> Result<LoadReport, LoadReportError> {
    let bytes = BASE64
        .decode(encoded)
        .map_err(|e| LoadReportError::InvalidBase64 {
            reason: e.to_string(),
        })?;
    LoadReport::from_protobuf(&bytes)
}

fn json_number(field: &str, value: &Json) -> Result<f64, LoadReportError> {
    match value {
        Json::Number(n) => checked(field, *n, || n.to_string()),
        // proto3 JSON writes 64-bit integers, NaN and the infinities as
        // strings; any number may be quoted.
        Json::String(s) => parse_number(field, s),
        other => Err(invalid_number(field, other.describe())),
    }
}

fn checked_proto(field: &str, value: f64) -> Result<f64, LoadReportError> {
    checked(field, value, || value.to_string())
}

/// The map's values checked, -0 made +0. With several bad values the error
/// names the first by name, so the same bytes always give the same error
/// (the map's own order is random).
fn checked_proto_map(
    field: &str,
    mut map: HashMap<String, f64>,
) -> Result<HashMap<String, f64>, LoadReportError> {
    let first_bad = map
        .iter()
        .filter(|(_, value)| !(value.is_finite() && **value >= 0.0))
        .min_by(|a, b| a.0.cmp(b.0));
    if let Some((name, value)) = first_bad {
        return Err(invalid_number(
            &format!("{field}.{name}"),
            &value.to_string(),
        ));
    }
    for value in map.values_mut() {
        *value = value.abs();
    }
    Ok(map)
}

/// A JSON value that, unlike `serde_json::Value`, keeps every key of an
/// object, so that duplicates can be reported rather than silently
/// resolved. Array contents are never needed and are skipped.
#[derive(Debug, PartialEq)]
enum Json {
    Null,
    Bool,
    Number(f64),
    String(String),
    Array,
    Object(Vec<(String, Json)>),
}

impl Json {
    fn describe(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array => "an array",
            Json::Object(_) => "an object",
        }
    }
}

impl<'de> serde::Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> serde::de::Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Json, D::Error> {
        serde::Deserialize::deserialize(deserializer)
    }

    fn visit_bool<E>(self, _value: bool) -> Result<Json, E> {
        Ok(Json::Bool)
    }

    fn visit_i64<E>(self, value: i64) -> Result<Json, E> {
        Ok(Json::Number(value as f64))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Json, E> {
        Ok(Json::Number(value as f64))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Json, E> {
        Ok(Json::Number(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Json, E> {
        Ok(Json::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Json, E> {
        Ok(Json::String(value))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Json::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<String, Json>()? {
            entries.push(entry);
        }
        Ok(Json::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{field_of, headers};
    use super::super::UtilizationHeader;
    use super::*;

    fn header(text: &str) -> Result<LoadReport, LoadReportError> {
        let value = HeaderValue::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        LoadReport::from_header(&value)
    }

    fn ok(text: &str) -> LoadReport {
        header(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> LoadReportError {
        match header(text) {
            Ok(report) => panic!("{text:?} parsed as {report:?}"),
            Err(e) => e,
        }
    }

    fn map(entries: &[(&str, f64)]) -> HashMap<String, f64> {
        entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// A report with every field set, and its protobuf encoding.
    fn full_proto() -> OrcaLoadReportProto {
        OrcaLoadReportProto {
            cpu_utilization: 0.25,
            mem_utilization: 0.5,
            rps: 0,
            request_cost: map(&[("db", 3.0)]),
            utilization: map(&[("disk", 0.75)]),
            rps_fractional: 100.5,
            eps: 2.0,
            named_metrics: map(&[("queue", 7.0), ("q2", 0.0)]),
            application_utilization: 0.625,
        }
    }

    fn full_report() -> LoadReport {
        LoadReport {
            cpu_utilization: 0.25,
            mem_utilization: 0.5,
            application_utilization: 0.625,
            rps_fractional: 100.5,
            eps: 2.0,
            request_cost: map(&[("db", 3.0)]),
            utilization: map(&[("disk", 0.75)]),
            named_metrics: map(&[("queue", 7.0), ("q2", 0.0)]),
            rate_from_client: false,
        }
    }

    fn b64_padded(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn b64_unpadded(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
    }

    // ---- TEXT ----

    #[test]
    fn text_with_equals_reads_every_field() {
        let report = ok("TEXT cpu_utilization=0.25,mem_utilization=0.5,\
             application_utilization=0.625,rps_fractional=100.5,eps=2,\
             request_cost.db=3,utilization.disk=0.75,named_metrics.queue=7,named_metrics.q2=0");
        assert_eq!(report, full_report());
    }

    #[test]
    fn text_with_colons_is_accepted_as_older_envoy_writes_it() {
        let report = ok("TEXT cpu_utilization:0.3, rps_fractional:10, named_metrics.foo:0.4");
        assert_eq!(report.cpu_utilization, 0.3);
        assert_eq!(report.rps_fractional, 10.0);
        assert_eq!(report.named_metrics, map(&[("foo", 0.4)]));
    }

    #[test]
    fn text_tolerates_spaces_around_tokens_and_the_whole_value() {
        let report = ok("  TEXT   cpu_utilization = 0.3 ,  eps :1 ,named_metrics.foo= 0.4 , ");
        assert_eq!(report.cpu_utilization, 0.3);
        assert_eq!(report.eps, 1.0);
        assert_eq!(report.named_metrics, map(&[("foo", 0.4)]));
    }

    #[test]
    fn text_matches_the_reference_example() {
        let report = ok(
            "TEXT cpu_utilization=0.3, mem_utilization=0.8, rps_fractional=10.0, \
             eps=1, named_metrics.foo=0.4",
        );
        assert_eq!(report.cpu_utilization, 0.3);
        assert_eq!(report.mem_utilization, 0.8);
        assert_eq!(report.rps_fractional, 10.0);
        assert_eq!(report.eps, 1.0);
        assert_eq!(report.named_metrics["foo"], 0.4);
    }

    #[test]
    fn text_map_entry_names_may_contain_dots() {
        let report = ok("TEXT named_metrics.a.b=1");
        assert_eq!(report.named_metrics, map(&[("a.b", 1.0)]));
    }

    #[test]
    fn text_unknown_keys_are_ignored_whatever_their_value() {
        let report = ok("TEXT future_field=whatever, foo.bar=1, cpu_utilization=0.5");
        assert_eq!(report.cpu_utilization, 0.5);
    }

    #[test]
    fn text_nan_is_rejected_naming_the_field() {
        let e = err("TEXT cpu_utilization=NaN");
        assert_eq!(field_of(&e), "cpu_utilization");
        assert_eq!(
            e.to_string(),
            "load report field cpu_utilization is not a finite non-negative number: NaN"
        );
    }

    #[test]
    fn text_infinity_is_rejected() {
        assert_eq!(field_of(&err("TEXT eps=inf")), "eps");
        assert_eq!(field_of(&err("TEXT eps=-inf")), "eps");
        assert_eq!(
            field_of(&err("TEXT rps_fractional=1e400")),
            "rps_fractional"
        );
    }

    #[test]
    fn text_negative_values_are_rejected() {
        assert_eq!(
            field_of(&err("TEXT mem_utilization=-0.1")),
            "mem_utilization"
        );
        assert_eq!(
            field_of(&err("TEXT named_metrics.foo=-1")),
            "named_metrics.foo"
        );
    }

    #[test]
    fn text_negative_zero_is_zero() {
        let report = ok("TEXT cpu_utilization=-0");
        assert!(report.cpu_utilization.is_sign_positive());
    }

    #[test]
    fn text_non_numbers_are_rejected() {
        assert_eq!(field_of(&err("TEXT eps=lots")), "eps");
        assert_eq!(field_of(&err("TEXT eps=")), "eps");
    }

    #[test]
    fn text_duplicate_keys_are_rejected() {
        let e = err("TEXT eps=1, eps=2");
        assert!(matches!(e, LoadReportError::DuplicateKey { ref key } if key == "eps"));
        assert_eq!(e.to_string(), "duplicate key eps in load report");
        assert!(matches!(
            err("TEXT named_metrics.a=1, named_metrics.a=2"),
            LoadReportError::DuplicateKey { .. }
        ));
        assert!(matches!(
            err("TEXT cpu_utilization=1, cpuUtilization=1"),
            LoadReportError::DuplicateKey { .. }
        ));
    }

    #[test]
    fn text_entries_without_a_separator_are_rejected() {
        assert!(matches!(
            err("TEXT cpu_utilization"),
            LoadReportError::MalformedEntry { .. }
        ));
        assert!(matches!(
            err("TEXT =1"),
            LoadReportError::MalformedEntry { .. }
        ));
    }

    #[test]
    fn text_a_map_field_without_an_entry_name_is_rejected() {
        assert!(matches!(
            err("TEXT named_metrics=1"),
            LoadReportError::MalformedEntry { .. }
        ));
    }

    #[test]
    fn text_deprecated_rps_is_the_rate_when_rps_fractional_is_absent() {
        assert_eq!(ok("TEXT rps=42").rps_fractional, 42.0);
        assert_eq!(ok("TEXT rps=42, rps_fractional=7.5").rps_fractional, 7.5);
        assert_eq!(ok("TEXT rps_fractional=7.5, rps=42").rps_fractional, 7.5);
    }

    #[test]
    fn text_with_nothing_after_the_format_word_is_rejected() {
        assert!(matches!(err("TEXT"), LoadReportError::Empty));
        assert!(matches!(err("TEXT   "), LoadReportError::Empty));
    }

    #[test]
    fn text_with_non_utf8_bytes_is_rejected() {
        let value = HeaderValue::from_bytes(b"TEXT cpu_utilization=\xff")
            .unwrap_or_else(|e| panic!("obs-text is a valid header value: {e}"));
        assert!(matches!(
            LoadReport::from_header(&value),
            Err(LoadReportError::NotUtf8)
        ));
    }

    // ---- JSON ----

    #[test]
    fn json_snake_case_reads_every_field() {
        let report = ok(r#"JSON {"cpu_utilization": 0.25, "mem_utilization": 0.5,
            "application_utilization": 0.625, "rps_fractional": 100.5, "eps": 2,
            "request_cost": {"db": 3}, "utilization": {"disk": 0.75},
            "named_metrics": {"queue": 7, "q2": 0}}"#
            .replace('\n', " ")
            .as_str());
        assert_eq!(report, full_report());
    }

    #[test]
    fn json_camel_case_reads_every_field() {
        let report = ok(r#"JSON {"cpuUtilization": 0.25, "memUtilization": 0.5,
            "applicationUtilization": 0.625, "rpsFractional": 100.5, "eps": 2,
            "requestCost": {"db": 3}, "utilization": {"disk": 0.75},
            "namedMetrics": {"queue": 7, "q2": 0}}"#
            .replace('\n', " ")
            .as_str());
        assert_eq!(report, full_report());
    }

    #[test]
    fn json_matches_the_reference_example() {
        let report = ok(
            r#"JSON {"cpu_utilization": 0.3, "rps_fractional": 10.0, "named_metrics": {"foo": 0.4}}"#,
        );
        assert_eq!(report.cpu_utilization, 0.3);
        assert_eq!(report.rps_fractional, 10.0);
        assert_eq!(report.named_metrics, map(&[("foo", 0.4)]));
    }

    #[test]
    fn json_numbers_may_be_quoted_as_proto3_json_allows() {
        let report = ok(r#"JSON {"rps": "12", "eps": "0.5"}"#);
        assert_eq!(report.rps_fractional, 12.0);
        assert_eq!(report.eps, 0.5);
    }

    #[test]
    fn json_null_fields_are_defaults() {
        let report = ok(r#"JSON {"cpu_utilization": null, "named_metrics": null, "eps": 1}"#);
        assert_eq!(report.cpu_utilization, 0.0);
        assert!(report.named_metrics.is_empty());
        assert_eq!(report.eps, 1.0);
    }

    #[test]
    fn json_unicode_map_names_are_kept() {
        let value = HeaderValue::from_bytes("JSON {\"named_metrics\": {\"größe\": 1}}".as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let report = LoadReport::from_header(&value).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.named_metrics, map(&[("größe", 1.0)]));
    }

    #[test]
    fn json_unknown_keys_are_ignored_whatever_their_value() {
        let report = ok(r#"JSON {"future": {"a": [1, {"b": null}]}, "other": "x", "eps": 3}"#);
        assert_eq!(report.eps, 3.0);
    }

    #[test]
    fn json_nan_and_infinity_strings_are_rejected() {
        assert_eq!(
            field_of(&err(r#"JSON {"cpuUtilization": "NaN"}"#)),
            "cpu_utilization"
        );
        assert_eq!(field_of(&err(r#"JSON {"eps": "Infinity"}"#)), "eps");
        assert_eq!(field_of(&err(r#"JSON {"eps": "-Infinity"}"#)), "eps");
    }

    #[test]
    fn json_negative_values_are_rejected() {
        assert_eq!(field_of(&err(r#"JSON {"eps": -1}"#)), "eps");
        assert_eq!(
            field_of(&err(r#"JSON {"utilization": {"disk": -0.5}}"#)),
            "utilization.disk"
        );
    }

    #[test]
    fn json_values_of_the_wrong_type_are_rejected() {
        assert_eq!(field_of(&err(r#"JSON {"eps": true}"#)), "eps");
        assert_eq!(field_of(&err(r#"JSON {"eps": [1]}"#)), "eps");
        assert_eq!(
            field_of(&err(r#"JSON {"named_metrics": {"a": null}}"#)),
            "named_metrics.a"
        );
        assert!(matches!(
            err(r#"JSON {"named_metrics": 1}"#),
            LoadReportError::NotAMap { .. }
        ));
    }

    #[test]
    fn json_duplicate_keys_are_rejected() {
        assert!(matches!(
            err(r#"JSON {"eps": 1, "eps": 2}"#),
            LoadReportError::DuplicateKey { ref key } if key == "eps"
        ));
        assert!(matches!(
            err(r#"JSON {"cpu_utilization": 1, "cpuUtilization": 1}"#),
            LoadReportError::DuplicateKey { ref key } if key == "cpu_utilization"
        ));
        assert!(matches!(
            err(r#"JSON {"named_metrics": {"a": 1, "a": 2}}"#),
            LoadReportError::DuplicateKey { ref key } if key == "named_metrics.a"
        ));
    }

    #[test]
    fn json_that_is_not_an_object_is_rejected() {
        assert!(matches!(
            err("JSON [1, 2]"),
            LoadReportError::InvalidJson { .. }
        ));
        assert!(matches!(
            err("JSON 0.5"),
            LoadReportError::InvalidJson { .. }
        ));
    }

    #[test]
    fn json_syntax_errors_are_rejected() {
        assert!(matches!(
            err(r#"JSON {"eps": 1"#),
            LoadReportError::InvalidJson { .. }
        ));
        assert!(matches!(
            err(r#"JSON {"eps": 1} trailing"#),
            LoadReportError::InvalidJson { .. }
        ));
    }

    #[test]
    fn json_deeply_nested_objects_are_an_error_not_a_stack_overflow() {
        let deep = format!("JSON {}{}", "{\"x\": ".repeat(5000), "}".repeat(5000));
        assert!(matches!(err(&deep), LoadReportError::InvalidJson { .. }));
    }

    #[test]
    fn json_deeply_nested_arrays_under_an_unknown_key_are_skipped() {
        let deep = format!(
            "JSON {{\"x\": {}{}, \"eps\": 1}}",
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(ok(&deep).eps, 1.0);
    }

    // ---- BIN and protobuf ----

    #[test]
    fn bin_padded_base64_reads_every_field() {
        let encoded = b64_padded(&full_proto().encode_to_vec());
        assert!(encoded.ends_with('='), "the test needs padding: {encoded}");
        assert_eq!(ok(&format!("BIN {encoded}")), full_report());
    }

    #[test]
    fn bin_unpadded_base64_reads_every_field() {
        let encoded = b64_unpadded(&full_proto().encode_to_vec());
        assert_eq!(ok(&format!("BIN {encoded}")), full_report());
    }

    #[test]
    fn protobuf_reads_every_field() {
        let bytes = full_proto().encode_to_vec();
        assert_eq!(LoadReport::from_protobuf(&bytes).ok(), Some(full_report()));
    }

    #[test]
    fn protobuf_field_numbers_match_the_orca_proto() {
        // cpu_utilization = 1 (fixed64 wire type 1): tag byte 0x09, then
        // application_utilization = 9: tag byte 0x49, rps = 3 varint: 0x18.
        let mut bytes = vec![0x09];
        bytes.extend_from_slice(&0.5f64.to_le_bytes());
        bytes.push(0x49);
        bytes.extend_from_slice(&0.75f64.to_le_bytes());
        bytes.extend_from_slice(&[0x18, 42]);
        // named_metrics = 8 (length-delimited): {key "a" (1), value 2.0 (2)}.
        bytes.extend_from_slice(&[0x42, 12, 0x0a, 1, b'a', 0x11]);
        bytes.extend_from_slice(&2.0f64.to_le_bytes());
        let report = LoadReport::from_protobuf(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.cpu_utilization, 0.5);
        assert_eq!(report.application_utilization, 0.75);
        assert_eq!(report.rps_fractional, 42.0);
        assert_eq!(report.named_metrics, map(&[("a", 2.0)]));
    }

    #[test]
    fn protobuf_empty_is_an_empty_report() {
        assert_eq!(
            LoadReport::from_protobuf(&[]).ok(),
            Some(LoadReport::default())
        );
    }

    #[test]
    fn protobuf_deprecated_rps_is_the_rate_when_rps_fractional_is_absent() {
        let proto = OrcaLoadReportProto {
            rps: 42,
            ..OrcaLoadReportProto::default()
        };
        let report = LoadReport::from_protobuf(&proto.encode_to_vec());
        assert_eq!(report.map(|r| r.rps_fractional).ok(), Some(42.0));

        let proto = OrcaLoadReportProto {
            rps: 42,
            rps_fractional: 7.5,
            ..OrcaLoadReportProto::default()
        };
        let report = LoadReport::from_protobuf(&proto.encode_to_vec());
        assert_eq!(report.map(|r| r.rps_fractional).ok(), Some(7.5));
    }

    #[test]
    fn protobuf_unknown_fields_are_ignored() {
        let mut bytes = OrcaLoadReportProto {
            eps: 1.0,
            ..OrcaLoadReportProto::default()
        }
        .encode_to_vec();
        // Field 99, varint 7; field 100, length-delimited "hi".
        bytes.extend_from_slice(&[0x98, 0x06, 7, 0xa2, 0x06, 2, b'h', b'i']);
        let report = LoadReport::from_protobuf(&bytes);
        assert_eq!(report.map(|r| r.eps).ok(), Some(1.0));
    }

    #[test]
    fn protobuf_nan_infinity_and_negative_values_are_rejected() {
        for (value, shown) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf"), (-1.0, "-1")] {
            let proto = OrcaLoadReportProto {
                cpu_utilization: value,
                ..OrcaLoadReportProto::default()
            };
            let e = LoadReport::from_protobuf(&proto.encode_to_vec())
                .err()
                .unwrap_or_else(|| panic!("{value} accepted"));
            assert_eq!(
                e.to_string(),
                format!("load report field cpu_utilization is not a finite non-negative number: {shown}")
            );
        }
        let proto = OrcaLoadReportProto {
            request_cost: map(&[("db", f64::NEG_INFINITY)]),
            ..OrcaLoadReportProto::default()
        };
        let e = LoadReport::from_protobuf(&proto.encode_to_vec()).err();
        assert_eq!(e.as_ref().map(field_of), Some("request_cost.db"));
    }

    #[test]
    fn protobuf_truncated_in_a_field_is_rejected() {
        let bytes = full_proto().encode_to_vec();
        // The last field is a double: cutting one byte leaves it short.
        let e = LoadReport::from_protobuf(&bytes[..bytes.len() - 1]);
        assert!(matches!(e, Err(LoadReportError::InvalidProtobuf { .. })));
        assert!(e.err().is_some_and(|e| e
            .to_string()
            .starts_with("invalid protobuf in load report: ")));
    }

    #[test]
    fn bin_with_truncated_protobuf_is_rejected() {
        let bytes = full_proto().encode_to_vec();
        let encoded = b64_padded(&bytes[..bytes.len() - 3]);
        assert!(matches!(
            err(&format!("BIN {encoded}")),
            LoadReportError::InvalidProtobuf { .. }
        ));
    }

    #[test]
    fn bin_with_truncated_base64_is_rejected() {
        let encoded = b64_padded(&full_proto().encode_to_vec());
        // A base64 string one character past a multiple of four is never
        // valid.
        let cut = encoded.len() / 4 * 4 - 3;
        let e = err(&format!("BIN {}", &encoded[..cut]));
        assert!(matches!(e, LoadReportError::InvalidBase64 { .. }), "{e:?}");
        assert!(e.to_string().starts_with("invalid base64 in load report"));
    }

    #[test]
    fn bin_with_characters_outside_the_alphabet_is_rejected() {
        assert!(matches!(
            err("BIN ab$d"),
            LoadReportError::InvalidBase64 { .. }
        ));
        // The URL-safe alphabet is not the standard one.
        assert!(matches!(
            err("BIN -_-_"),
            LoadReportError::InvalidBase64 { .. }
        ));
    }

    // ---- the gRPC trailer ----

    #[test]
    fn grpc_trailer_padded_and_unpadded_read_every_field() {
        let bytes = full_proto().encode_to_vec();
        for encoded in [b64_padded(&bytes), b64_unpadded(&bytes)] {
            let value = HeaderValue::from_str(&encoded).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                LoadReport::from_grpc_trailer(&value).ok(),
                Some(full_report())
            );
        }
    }

    #[test]
    fn grpc_trailer_errors_are_reported() {
        let from = |s: &'static str| LoadReport::from_grpc_trailer(&HeaderValue::from_static(s));
        assert!(matches!(from(""), Err(LoadReportError::Empty)));
        assert!(matches!(
            from("!!!"),
            Err(LoadReportError::InvalidBase64 { .. })
        ));
        // "CQ" is the tag of a double with no bytes after it.
        assert!(matches!(
            from("CQ"),
            Err(LoadReportError::InvalidProtobuf { .. })
        ));
    }

    // ---- the header as a whole ----

    #[test]
    fn an_unknown_format_word_is_rejected() {
        let e = err("XML <load/>");
        assert!(matches!(e, LoadReportError::UnknownFormat { ref format } if format == "XML"));
        assert_eq!(e.to_string(), "unknown load report format \"XML\"");
    }

    #[test]
    fn the_format_word_is_case_sensitive() {
        assert!(matches!(
            err("text cpu_utilization=1"),
            LoadReportError::UnknownFormat { .. }
        ));
        assert!(matches!(
            err("TEXTcpu_utilization=1"),
            LoadReportError::UnknownFormat { .. }
        ));
    }

    #[test]
    fn an_empty_value_is_rejected() {
        assert!(matches!(err(""), LoadReportError::Empty));
        assert!(matches!(err("   "), LoadReportError::Empty));
        assert_eq!(LoadReportError::Empty.to_string(), "empty load report");
    }

    #[test]
    fn long_offending_input_is_shortened_in_messages() {
        let e = err(&format!("{} x", "X".repeat(1000)));
        assert!(e.to_string().len() < 120, "{e}");
    }

    // ---- extractors ----

    fn eps_of(found: Option<Result<LoadReport, LoadReportError>>) -> Option<f64> {
        found.map(|r| r.unwrap_or_else(|e| panic!("{e}")).eps)
    }

    fn bin_with_eps(eps: f64) -> String {
        b64_unpadded(
            &OrcaLoadReportProto {
                eps,
                ..OrcaLoadReportProto::default()
            }
            .encode_to_vec(),
        )
    }

    #[test]
    fn orca_headers_prefer_the_text_header_over_the_binary_one() {
        let map = headers(&[
            ("endpoint-load-metrics", "TEXT eps=1"),
            ("endpoint-load-metrics-bin", &bin_with_eps(2.0)),
        ]);
        assert_eq!(eps_of(OrcaLoadReports.from_headers(&map)), Some(1.0));
    }

    #[test]
    fn maps_too_large_to_walk_find_the_same_reports() {
        // Past `WALKED` names the reports are found by lookup, not by a walk.
        let mut map = headers(&[
            ("endpoint-load-metrics", "TEXT eps=1"),
            ("endpoint-load-metrics-bin", &bin_with_eps(2.0)),
        ]);
        for i in 0..WALKED {
            let name = HeaderName::from_bytes(format!("x-filler-{i}").as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            map.insert(name, HeaderValue::from_static("1"));
        }
        assert!(map.keys_len() > WALKED);
        assert_eq!(eps_of(OrcaLoadReports.from_headers(&map)), Some(1.0));
        assert_eq!(eps_of(OrcaLoadReports.from_trailers(&map)), Some(2.0));
    }

    #[test]
    fn orca_headers_fall_back_to_the_binary_one_for_trailers_only_responses() {
        let map = headers(&[("endpoint-load-metrics-bin", &bin_with_eps(2.0))]);
        assert_eq!(eps_of(OrcaLoadReports.from_headers(&map)), Some(2.0));
    }

    #[test]
    fn orca_trailers_prefer_the_binary_one_over_the_text_header() {
        let map = headers(&[
            ("endpoint-load-metrics", "TEXT eps=1"),
            ("endpoint-load-metrics-bin", &bin_with_eps(2.0)),
        ]);
        assert_eq!(eps_of(OrcaLoadReports.from_trailers(&map)), Some(2.0));
        let map = headers(&[("endpoint-load-metrics", "JSON {\"eps\": 3}")]);
        assert_eq!(eps_of(OrcaLoadReports.from_trailers(&map)), Some(3.0));
    }

    #[test]
    fn orca_finds_nothing_when_no_report_is_present() {
        let map = headers(&[("x-server-load", "0.5")]);
        assert!(OrcaLoadReports.from_headers(&map).is_none());
        assert!(OrcaLoadReports.from_trailers(&map).is_none());
    }

    #[test]
    fn orca_a_malformed_report_is_some_error() {
        let map = headers(&[("endpoint-load-metrics", "TEXT eps=-1")]);
        assert!(matches!(
            OrcaLoadReports.from_headers(&map),
            Some(Err(LoadReportError::InvalidNumber { .. }))
        ));
    }

    // ---- robustness ----

    /// xorshift64*: deterministic, so a failure can be reproduced.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn try_everything(bytes: &[u8]) {
        let _ = LoadReport::from_protobuf(bytes);
        if let Ok(value) = HeaderValue::from_bytes(bytes) {
            let _ = LoadReport::from_header(&value);
            let _ = LoadReport::from_grpc_trailer(&value);
            let mut map = HeaderMap::new();
            map.insert(ENDPOINT_LOAD_METRICS, value.clone());
            map.insert(ENDPOINT_LOAD_METRICS_BIN, value.clone());
            map.insert(HeaderName::from_static("x-server-load"), value);
            let _ = OrcaLoadReports.from_headers(&map);
            let _ = OrcaLoadReports.from_trailers(&map);
            let _ =
                UtilizationHeader::new(HeaderName::from_static("x-server-load")).from_headers(&map);
        }
    }

    #[test]
    fn no_input_makes_a_parser_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let prefixes: [&[u8]; 5] = [b"TEXT ", b"JSON ", b"BIN ", b"", b"  TEXT\t"];
        let alphabet: &[u8] =
            b"=:,.{}[]\"-+eE0123456789 \tnamed_metrics.cpu_utilizationNaNinf\\/\x80\xff";
        for round in 0..5000 {
            let mut bytes = prefixes[rng.below(prefixes.len())].to_vec();
            let len = rng.below(64);
            for _ in 0..len {
                let byte = if round % 2 == 0 {
                    alphabet[rng.below(alphabet.len())]
                } else {
                    rng.next() as u8
                };
                bytes.push(byte);
            }
            try_everything(&bytes);
        }
    }

    #[test]
    fn no_truncation_or_bit_flip_of_a_valid_report_makes_a_parser_panic() {
        let proto = full_proto().encode_to_vec();
        let valid = [
            "TEXT cpu_utilization=0.25, mem_utilization:0.5, named_metrics.queue=7, rps=3"
                .to_owned(),
            r#"JSON {"cpuUtilization": 0.25, "named_metrics": {"queue": 7}, "rps": "3"}"#
                .to_owned(),
            format!("BIN {}", b64_padded(&proto)),
            b64_unpadded(&proto),
        ];
        for text in &valid {
            let bytes = text.as_bytes();
            for cut in 0..=bytes.len() {
                try_everything(&bytes[..cut]);
            }
        }
        for cut in 0..=proto.len() {
            let _ = LoadReport::from_protobuf(&proto[..cut]);
        }
        let mut rng = Rng(42);
        for _ in 0..2000 {
            let mut bytes = proto.clone();
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
            let _ = LoadReport::from_protobuf(&bytes);
            let _ = LoadReport::from_grpc_trailer(
                &HeaderValue::from_str(&b64_padded(&bytes)).unwrap_or_else(|e| panic!("{e}")),
            );
        }
    }
}
