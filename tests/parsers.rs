//! Property tests for every parser of outside input: ORCA load reports in
//! all their forms, `Retry-After` and `grpc-retry-pushback-ms`,
//! `grpc-timeout`, `grpc-status` (for retries and for classification) and
//! the request's safety class.
//!
//! The invariants are the ones the cargo-fuzz targets check, from the same
//! file (`fuzz/src/lib.rs`, included below as `checks`): here proptest drives
//! them with arbitrary bytes and with structured but hostile inputs, within
//! a few seconds, on every CI run. The fuzzers go further; see
//! `fuzz/README.md`.

#![cfg(feature = "grpc")]

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::Config;
use tower_lb::load::{LoadReport, LoadReportError};
use tower_lb::retry::{pushback, Pushback};

/// Cases per property: the inputs are cheap, so the whole file runs in a
/// few seconds.
const CASES: u32 = 512;

fn config() -> Config {
    Config {
        // A failure prints its minimal input; a case worth keeping becomes a
        // plain test at the end of this file, not a file proptest writes.
        failure_persistence: None,
        ..Config::with_cases(CASES)
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn report_of(text: &str) -> Result<LoadReport, LoadReportError> {
    LoadReport::from_header(&header_value(text))
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Finite, non-negative numbers, edge cases included.
fn valid_number() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0..1e6f64,
        1 => (0.0..f64::MAX).prop_map(f64::abs),
        1 => prop::sample::select(vec![0.0, 1.0, f64::MAX, f64::MIN_POSITIVE, 5e-324, 1e300]),
    ]
}

/// A number written as the text forms accept it: plain, with an exponent,
/// or with a `+`.
fn written(value: f64) -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        format!("{value}"),
        format!("{value:e}"),
        format!("{value:E}"),
        format!("+{value}"),
    ])
}

/// Text that is not a finite non-negative number (for every parser that
/// reads numbers from text).
fn invalid_number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "NaN",
            "nan",
            "inf",
            "-inf",
            "+inf",
            "infinity",
            "-Infinity",
            "1e309",
            "-1e309",
            "-1",
            "-0.5",
            "-1e-300",
            "0x10",
            "",
            "1.2.3",
            "--1",
            "1e",
            "e5",
            "70%",
        ])
        .prop_map(str::to_owned),
        (1e-300..f64::MAX).prop_map(|v| format!("-{v}")),
        "[a-zA-Z_]{1,8}",
    ]
}

/// The scalar fields, as `(snake_case, lowerCamelCase)`.
const SCALARS: [(&str, &str); 6] = [
    ("cpu_utilization", "cpuUtilization"),
    ("mem_utilization", "memUtilization"),
    ("application_utilization", "applicationUtilization"),
    ("rps_fractional", "rpsFractional"),
    ("eps", "eps"),
    ("rps", "rps"),
];

/// The map fields, as `(snake_case, lowerCamelCase)`.
const MAPS: [(&str, &str); 3] = [
    ("request_cost", "requestCost"),
    ("utilization", "utilization"),
    ("named_metrics", "namedMetrics"),
];

fn is_field_name(key: &str) -> bool {
    SCALARS
        .iter()
        .chain(&MAPS)
        .any(|&(snake, camel)| key == snake || key == camel)
}

/// A load report as a server might send it: some scalar fields (by index in
/// [`SCALARS`]) and map entries (by index in [`MAPS`]), all valid.
#[derive(Debug, Clone)]
struct Fields {
    scalars: BTreeMap<usize, f64>,
    maps: BTreeMap<(usize, String), f64>,
}

impl Fields {
    /// The report every parser must read from these fields.
    fn expected(&self) -> LoadReport {
        let mut report = LoadReport::default();
        let get = |i: usize| self.scalars.get(&i).copied().unwrap_or(0.0);
        report.cpu_utilization = get(0);
        report.mem_utilization = get(1);
        report.application_utilization = get(2);
        report.rps_fractional = get(3);
        report.eps = get(4);
        if report.rps_fractional == 0.0 {
            report.rps_fractional = get(5);
        }
        for ((map, name), &value) in &self.maps {
            let map = match map {
                0 => &mut report.request_cost,
                1 => &mut report.utilization,
                _ => &mut report.named_metrics,
            };
            map.insert(name.clone(), value);
        }
        report
    }
}

fn map_entry_name() -> impl Strategy<Value = String> {
    // Any text a TEXT key can carry after the dot: no separator, no space at
    // the ends (they are trimmed).
    prop_oneof![
        "[a-z][a-z0-9_.-]{0,10}",
        "[^,=: \t\\\\\"\u{0}-\u{1f}\u{7f}\u{85}\u{a0}\u{1680}\u{2000}-\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}]{1,6}",
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    (
        prop::collection::btree_map(0..SCALARS.len(), valid_number(), 0..=SCALARS.len()),
        prop::collection::btree_map((0..MAPS.len(), map_entry_name()), valid_number(), 0..5),
    )
        .prop_map(|(scalars, maps)| Fields { scalars, maps })
}

/// One TEXT entry: key, separator, value, with optional spaces.
fn text_entry(key: String, value: String) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["=", ":", " = ", "= ", " :"]),
        prop::sample::select(vec!["", " ", "\t"]),
    )
        .prop_map(move |(sep, pad)| format!("{pad}{key}{sep}{value}{pad}"))
}

/// Keys of `fields` (snake or camel), each with its value written some way.
fn text_entries(fields: &Fields) -> Vec<BoxedStrategy<String>> {
    let mut entries = Vec::new();
    for (&i, &value) in &fields.scalars {
        let (snake, camel) = SCALARS[i];
        entries.push(
            (prop::sample::select(vec![snake, camel]), written(value))
                .prop_flat_map(|(key, value)| text_entry(key.to_owned(), value))
                .boxed(),
        );
    }
    for ((map, name), &value) in &fields.maps {
        let (snake, camel) = MAPS[*map];
        let name = name.clone();
        entries.push(
            (prop::sample::select(vec![snake, camel]), written(value))
                .prop_flat_map(move |(key, value)| text_entry(format!("{key}.{name}"), value))
                .boxed(),
        );
    }
    entries
}

/// The `TEXT` form of `fields`, entries in any order, with any of the
/// separators and spacing the format allows (and stray commas).
fn text_form(fields: Fields) -> impl Strategy<Value = (Fields, String)> {
    let entries = text_entries(&fields);
    (
        entries.prop_shuffle(),
        prop::sample::select(vec![",", ", ", " ,", ",,"]),
        prop::sample::select(vec!["", ","]),
    )
        .prop_map(move |(entries, comma, trailing)| {
            let body = entries.join(comma);
            (fields.clone(), format!("TEXT {body}{trailing}"))
        })
}

/// Keys no version of ORCA knows, none of them twice.
fn unknown_keys() -> impl Strategy<Value = BTreeSet<String>> {
    prop::collection::btree_set("[a-z][a-zA-Z0-9_]{0,12}(\\.[a-z0-9]{1,4})?", 0..4).prop_map(
        |keys| {
            keys.into_iter()
                // A known field, or a map entry of one, is not unknown.
                .filter(|k| !is_field_name(k.split('.').next().unwrap_or(k)))
                .collect()
        },
    )
}

/// A JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            // Control characters, which a header value cannot carry either.
            c if c.is_ascii_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A number as proto3 JSON allows: a number, or a string holding one.
fn json_number(value: f64) -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        format!("{value:e}"),
        format!("\"{value}\""),
        format!("\"{value:e}\""),
    ])
}

/// The `JSON` form of `fields`: keys in any order, snake or camel.
fn json_form(fields: Fields) -> impl Strategy<Value = (Fields, String)> {
    let mut members: Vec<BoxedStrategy<String>> = Vec::new();
    for (&i, &value) in &fields.scalars {
        let (snake, camel) = SCALARS[i];
        members.push(
            (prop::sample::select(vec![snake, camel]), json_number(value))
                .prop_map(|(key, value)| format!("{}: {value}", json_string(key)))
                .boxed(),
        );
    }
    for (map, (snake, camel)) in MAPS.iter().enumerate() {
        let entries: Vec<_> = fields
            .maps
            .iter()
            .filter(|((m, _), _)| *m == map)
            .map(|((_, name), &value)| (name.clone(), value))
            .collect();
        if entries.is_empty() {
            continue;
        }
        let values: Vec<_> = entries.iter().map(|&(_, v)| json_number(v)).collect();
        members.push(
            (prop::sample::select(vec![*snake, *camel]), values)
                .prop_map(move |(key, values)| {
                    let inner: Vec<String> = entries
                        .iter()
                        .zip(values)
                        .map(|((name, _), value)| format!("{}:{value}", json_string(name)))
                        .collect();
                    format!("{}: {{{}}}", json_string(key), inner.join(", "))
                })
                .boxed(),
        );
    }
    members
        .prop_shuffle()
        .prop_map(move |members| (fields.clone(), format!("JSON {{{}}}", members.join(", "))))
}

/// JSON values of any shape, for fields nobody reads.
fn any_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| format!("{v:e}")),
        ".{0,8}".prop_map(|s| json_string(&s)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z]{1,4}", inner), 0..4).prop_map(|v| {
                let members: Vec<_> = v
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", json_string(&k)))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// Protobuf wire format, written by hand from the ORCA proto's field numbers.
mod wire {
    pub fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }

    fn key(field: u32, wire_type: u8, out: &mut Vec<u8>) {
        varint(u64::from(field) << 3 | u64::from(wire_type), out);
    }

    pub fn double(field: u32, value: f64, out: &mut Vec<u8>) {
        key(field, 1, out);
        out.extend_from_slice(&value.to_le_bytes());
    }

    pub fn uint64(field: u32, value: u64, out: &mut Vec<u8>) {
        key(field, 0, out);
        varint(value, out);
    }

    pub fn bytes(field: u32, value: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        varint(value.len() as u64, out);
        out.extend_from_slice(value);
    }

    pub fn map_entry(field: u32, name: &str, value: f64, out: &mut Vec<u8>) {
        let mut entry = Vec::new();
        bytes(1, name.as_bytes(), &mut entry);
        double(2, value, &mut entry);
        bytes(field, &entry, out);
    }

    /// A field no version of ORCA has (numbers 10 and up), of any wire type.
    pub fn unknown(field: u32, kind: u8, payload: u64, out: &mut Vec<u8>) {
        match kind % 4 {
            0 => uint64(field, payload, out),
            1 => {
                key(field, 1, out);
                out.extend_from_slice(&payload.to_le_bytes());
            }
            2 => bytes(field, &payload.to_le_bytes(), out),
            _ => {
                key(field, 5, out);
                out.extend_from_slice(&(payload as u32).to_le_bytes());
            }
        }
    }
}

/// ORCA field numbers of the scalars in [`SCALARS`] order (`rps` is a
/// varint), and of the maps in [`MAPS`] order.
const SCALAR_TAGS: [u32; 6] = [1, 2, 9, 6, 7, 3];
const MAP_TAGS: [u32; 3] = [4, 5, 8];

/// `a` and `b` equal, up to the last bits serde_json's float parser may
/// lose (it is not built with `float_roundtrip`).
fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-15 * a.abs().max(b.abs())
}

fn assert_close_reports(got: &LoadReport, want: &LoadReport) {
    let pairs = [
        (got.cpu_utilization, want.cpu_utilization),
        (got.mem_utilization, want.mem_utilization),
        (got.application_utilization, want.application_utilization),
        (got.rps_fractional, want.rps_fractional),
        (got.eps, want.eps),
    ];
    assert!(
        pairs.iter().all(|&(a, b)| close(a, b)),
        "{got:?} != {want:?}"
    );
    for (a, b) in [
        (&got.request_cost, &want.request_cost),
        (&got.utilization, &want.utilization),
        (&got.named_metrics, &want.named_metrics),
    ] {
        let same = a.len() == b.len()
            && a.iter()
                .all(|(k, &v)| b.get(k).is_some_and(|&w| close(v, w)));
        assert!(same, "{got:?} != {want:?}");
    }
}

// ---------------------------------------------------------------------------
// Load reports
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn load_report_parsers_keep_their_invariants_on_any_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        checks::load_report(&bytes);
    }

    #[test]
    fn load_report_parsers_keep_their_invariants_on_header_shaped_bytes(
        prefix in prop::sample::select(vec!["TEXT ", "JSON ", "BIN ", "", "  TEXT\t", "JSON{"]),
        body in prop::collection::vec(
            prop::sample::select(
                b"=:,.{}[]\"-+eE0123456789 \tnamed_metrics.utilizationcpu_rpsNaNinf\\/\x80\xffA=="
                    .to_vec(),
            ),
            0..96,
        ),
    ) {
        checks::load_report(&[prefix.as_bytes(), &body].concat());
    }

    #[test]
    fn text_with_valid_fields_reads_back_every_value(
        (fields, text) in fields().prop_flat_map(text_form),
    ) {
        // A bare `TEXT ` is blank; `TEXT ,` is a report with no entries.
        let expected = if text.trim() == "TEXT" {
            Err(LoadReportError::Empty)
        } else {
            Ok(fields.expected())
        };
        prop_assert_eq!(report_of(&text), expected, "{}", text);
    }

    #[test]
    fn text_with_a_nan_infinite_or_negative_value_is_rejected(
        (fields, text) in fields().prop_flat_map(text_form),
        bad in invalid_number_text(),
        field in 0..SCALARS.len() + MAPS.len(),
    ) {
        // A field the report does not have yet, so that the error is about
        // the number, not a duplicate key.
        let key = if field < SCALARS.len() {
            prop_assume!(!fields.scalars.contains_key(&field));
            SCALARS[field].0.to_owned()
        } else {
            let map = field - SCALARS.len();
            prop_assume!(!fields.maps.contains_key(&(map, "bad".to_owned())));
            format!("{}.bad", MAPS[map].0)
        };
        let text = format!("{text}, {key}={bad}");
        let result = report_of(&text);
        prop_assert!(
            matches!(result, Err(LoadReportError::InvalidNumber { .. })),
            "{} read as {:?}", text, result
        );
    }

    #[test]
    fn text_with_a_repeated_key_is_rejected(
        (fields, text) in fields().prop_flat_map(text_form),
        again in any::<prop::sample::Index>(),
        spelling in any::<bool>(),
    ) {
        let mut keys: Vec<String> = fields.scalars.keys().map(|&i| {
            let (snake, camel) = SCALARS[i];
            (if spelling { snake } else { camel }).to_owned()
        }).collect();
        keys.extend(fields.maps.keys().map(|(m, name)| {
            let (snake, camel) = MAPS[*m];
            format!("{}.{name}", if spelling { snake } else { camel })
        }));
        prop_assume!(!keys.is_empty());
        let key = again.get(&keys);
        let text = format!("{text}, {key}=1");
        let result = report_of(&text);
        prop_assert!(
            matches!(result, Err(LoadReportError::DuplicateKey { .. })),
            "{} read as {:?}", text, result
        );
    }

    #[test]
    fn text_unknown_keys_are_skipped(
        (_, text) in fields().prop_flat_map(text_form),
        unknown in unknown_keys(),
        value in "[a-zA-Z0-9 .=:+-]{0,12}",
    ) {
        prop_assume!(text.trim() != "TEXT");
        let mut with = text.clone();
        for key in &unknown {
            with.push_str(&format!(", {key}={value}"));
        }
        prop_assert_eq!(report_of(&with), report_of(&text), "{}", with);
    }

    #[test]
    fn json_with_valid_fields_reads_back_every_value(
        (fields, text) in fields().prop_flat_map(json_form),
    ) {
        let report = report_of(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_close_reports(&report, &fields.expected());
    }

    #[test]
    fn json_with_a_repeated_key_is_rejected(
        (fields, text) in fields().prop_flat_map(json_form),
        again in any::<prop::sample::Index>(),
        spelling in any::<bool>(),
    ) {
        let keys: Vec<String> = fields.scalars.keys().map(|&i| {
            let (snake, camel) = SCALARS[i];
            json_string(if spelling { snake } else { camel })
        }).collect();
        prop_assume!(!keys.is_empty());
        let key = again.get(&keys);
        let open = text.strip_suffix('}').unwrap_or(&text);
        let text = format!("{open}, {key}: 1}}");
        let result = report_of(&text);
        prop_assert!(
            matches!(result, Err(LoadReportError::DuplicateKey { .. })),
            "{} read as {:?}", text, result
        );
    }

    #[test]
    fn json_with_a_map_entry_twice_is_rejected(
        map in 0..MAPS.len(),
        name in "[a-z]{1,6}",
        a in valid_number(),
        b in valid_number(),
    ) {
        let key = json_string(MAPS[map].0);
        let name = json_string(&name);
        let text = format!("JSON {{{key}: {{{name}: {a:e}, {name}: {b:e}}}}}");
        let result = report_of(&text);
        prop_assert!(
            matches!(result, Err(LoadReportError::DuplicateKey { .. })),
            "{} read as {:?}", text, result
        );
    }

    #[test]
    fn json_unknown_keys_are_skipped(
        (_, text) in fields().prop_flat_map(json_form),
        unknown in unknown_keys(),
        values in prop::collection::vec(any_json(), 4),
    ) {
        let mut with = text.strip_suffix('}').unwrap_or(&text).to_owned();
        for (key, value) in unknown.iter().zip(&values) {
            let comma = if with.ends_with('{') { "" } else { ", " };
            with.push_str(&format!("{comma}{}: {value}", json_string(key)));
        }
        with.push('}');
        prop_assert_eq!(report_of(&with), report_of(&text), "{}", with);
    }

    #[test]
    fn json_with_a_nan_infinite_or_negative_value_is_rejected(
        bad in invalid_number_text(),
        field in prop::sample::select(SCALARS.iter().map(|s| s.1).collect::<Vec<_>>()),
        quoted in any::<bool>(),
    ) {
        let value = if quoted { json_string(&bad) } else { bad.clone() };
        let text = format!("JSON {{\"{field}\": {value}}}");
        let result = report_of(&text);
        // Unquoted, most of these are not JSON at all.
        prop_assert!(
            matches!(
                result,
                Err(LoadReportError::InvalidNumber { .. } | LoadReportError::InvalidJson { .. })
            ),
            "{} read as {:?}", text, result
        );
    }

    #[test]
    fn bin_and_trailer_of_any_protobuf_bytes_agree_with_from_protobuf(
        bytes in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        checks::check_protobuf(&bytes);
    }

    #[test]
    fn protobuf_with_valid_fields_reads_back_every_value(
        fields in fields(),
        earlier in prop::collection::vec((0..5usize, valid_number()), 0..4),
        unknown in prop::collection::vec((10u32..5000, any::<u8>(), any::<u64>()), 0..4),
        rps in any::<u64>(),
    ) {
        let mut bytes = Vec::new();
        // Values sent before the last one of the same field: the last wins.
        for &(i, value) in &earlier {
            wire::double(SCALAR_TAGS[i], value, &mut bytes);
        }
        for &(field, kind, payload) in &unknown {
            wire::unknown(field, kind, payload, &mut bytes);
        }
        let mut fields = fields;
        for (&i, &value) in &fields.scalars {
            if i == 5 {
                wire::uint64(SCALAR_TAGS[i], rps, &mut bytes);
            } else {
                wire::double(SCALAR_TAGS[i], value, &mut bytes);
            }
        }
        if let Some(value) = fields.scalars.get_mut(&5) {
            *value = rps as f64;
        }
        for ((map, name), &value) in &fields.maps {
            wire::map_entry(MAP_TAGS[*map], name, value, &mut bytes);
        }
        // `earlier` values of fields sent once more are overwritten; the
        // others stand.
        for &(i, value) in earlier.iter().rev() {
            fields.scalars.entry(i).or_insert(value);
        }
        prop_assert_eq!(LoadReport::from_protobuf(&bytes), Ok(fields.expected()));
        checks::check_protobuf(&bytes);
    }

    #[test]
    fn protobuf_with_a_nan_infinite_or_negative_double_is_rejected(
        fields in fields(),
        bits in any::<u64>(),
        tag in prop::sample::select(vec![1u32, 2, 6, 7, 9, 4, 5, 8]),
    ) {
        let bad = f64::from_bits(bits | 1 << 63);
        let bad = if bad == 0.0 || bad.is_nan() { f64::NAN } else { bad };
        let bad = if bits % 3 == 0 { f64::INFINITY } else { bad };
        let mut bytes = Vec::new();
        for ((map, name), &value) in &fields.maps {
            wire::map_entry(MAP_TAGS[*map], name, value, &mut bytes);
        }
        if [4, 5, 8].contains(&tag) {
            wire::map_entry(tag, "bad", bad, &mut bytes);
        } else {
            wire::double(tag, bad, &mut bytes);
        }
        let result = LoadReport::from_protobuf(&bytes);
        prop_assert!(
            matches!(result, Err(LoadReportError::InvalidNumber { .. })),
            "{:?} read as {:?}", bad, result
        );
    }

    #[test]
    fn utilization_header_reads_only_finite_non_negative_numbers(
        text in prop_oneof![
            valid_number().prop_flat_map(written),
            invalid_number_text(),
            "[ \t]{0,2}[-+]?[0-9]{0,4}(\\.[0-9]{0,3})?([eE][-+]?[0-9]{1,4})?[ \t]{0,2}",
        ],
    ) {
        checks::check_utilization_header(&header_value(&text));
    }
}

// ---------------------------------------------------------------------------
// Pushback
// ---------------------------------------------------------------------------

/// An HTTP-date in any of the three forms RFC 9110 requires recipients to
/// read, for a moment between 1970 and 9999.
fn http_date() -> impl Strategy<Value = (SystemTime, String)> {
    (0..=checks::LAST_HTTP_DATE_SECS, 0..3u8).prop_map(|(secs, form)| {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let imf = httpdate::fmt_http_date(at);
        // "Sun, 06 Nov 1994 08:49:37 GMT"
        let parts: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
        let text = match (form, parts.as_slice()) {
            (1, [day, dd, mon, yyyy, time, _gmt]) if yyyy.starts_with("19") => {
                // RFC 850, two-digit year: only for the 1900s here, as
                // recipients read 2-digit years within 50 years of now.
                let weekday = long_weekday(day);
                format!("{weekday}, {dd}-{mon}-{} {time} GMT", &yyyy[2..])
            }
            (2, [day, dd, mon, yyyy, time, _gmt]) => {
                let dd = dd.trim_start_matches('0');
                format!("{day} {mon} {dd:>2} {time} {yyyy}")
            }
            _ => imf,
        };
        (at, text)
    })
}

fn long_weekday(day: &str) -> &'static str {
    match day {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    }
}

/// OWS around a value.
fn padded(text: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", " ", "\t", "  "]),
        text,
        prop::sample::select(vec!["", " ", "\t"]),
    )
        .prop_map(|(a, text, b)| format!("{a}{text}{b}"))
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for &(name, value) in pairs {
        map.append(name, header_value(value));
    }
    map
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pushback_of_any_headers_is_as_documented(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        name in prop::sample::select(vec!["retry-after: ", "grpc-retry-pushback-ms: ", ""]),
    ) {
        checks::pushback(&[name.as_bytes(), &bytes].concat());
    }

    #[test]
    fn retry_after_seconds_are_a_delay_capped_at_u32_max(
        digits in padded("[0-9]{1,40}".prop_map(String::from)),
    ) {
        let map = headers(&[("retry-after", &digits)]);
        checks::check_pushback(&map);
        let secs = digits.trim().parse::<u64>().map_or(u64::from(u32::MAX), |s| s.min(u64::from(u32::MAX)));
        prop_assert_eq!(
            pushback(&map, SystemTime::now()),
            Some(Pushback::RetryAfter(Duration::from_secs(secs)))
        );
    }

    #[test]
    fn retry_after_dates_are_the_time_until_them(
        (at, date) in http_date(),
        value in Just(()).prop_flat_map(|()| padded(Just(String::new()))),
        now_secs in 0..=checks::LAST_HTTP_DATE_SECS,
    ) {
        // `value` is only spaces: put the date in their middle.
        let (lead, trail) = value.split_at(value.len() / 2);
        let value = format!("{lead}{date}{trail}");
        let map = headers(&[("retry-after", &value)]);
        checks::check_pushback(&map);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_secs);
        let expected = at.duration_since(now).unwrap_or(Duration::ZERO);
        prop_assert_eq!(pushback(&map, now), Some(Pushback::RetryAfter(expected)), "{}", value);
    }

    #[test]
    fn retry_after_odd_dates_are_read_or_ignored_as_documented(
        day in prop::sample::select(vec!["Mon", "Fri", "Sun", "Xyz", "", "Friday", "fri"]),
        dd in "[0-9]{0,3}",
        mon in prop::sample::select(vec!["Jan", "Feb", "May", "Dec", "Foo", "may", ""]),
        year in prop_oneof!["[0-9]{0,6}", Just("9999".to_owned()), Just("1969".to_owned())],
        time in "[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}",
        zone in prop::sample::select(vec!["GMT", "UTC", "gmt", "+0000", ""]),
        form in 0..3u8,
    ) {
        let value = match form {
            0 => format!("{day}, {dd} {mon} {year} {time} {zone}"),
            1 => format!("{day}, {dd}-{mon}-{year} {time} {zone}"),
            _ => format!("{day} {mon} {dd} {time} {year}"),
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            let mut map = HeaderMap::new();
            map.insert("retry-after", value);
            checks::check_pushback(&map);
        }
    }

    #[test]
    fn grpc_pushback_is_a_delay_only_for_plain_u64_milliseconds(
        value in padded("[-+]?[0-9]{0,25}(\\.[0-9])?(ms)?".prop_map(String::from)),
        retry_after in prop::option::of("[0-9]{1,4}"),
    ) {
        let mut map = headers(&[("grpc-retry-pushback-ms", &value)]);
        if let Some(retry_after) = &retry_after {
            map.insert("retry-after", header_value(retry_after));
        }
        checks::check_pushback(&map);
        let plain = value.trim().parse::<u64>().ok().filter(|_| value.trim().bytes().all(|b| b.is_ascii_digit()));
        let expected = match plain {
            Some(ms) => Pushback::RetryAfter(Duration::from_millis(ms)),
            None => Pushback::DoNotRetry,
        };
        prop_assert_eq!(pushback(&map, SystemTime::now()), Some(expected), "{}", value);
    }
}

// ---------------------------------------------------------------------------
// grpc-timeout
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn grpc_timeout_of_any_bytes_is_read_only_when_well_formed(
        bytes in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        checks::grpc_timeout(&bytes);
    }

    #[test]
    fn grpc_timeout_is_one_to_eight_digits_and_a_unit(
        digits in "[0-9]{0,12}",
        unit in prop::sample::select(vec!["H", "M", "S", "m", "u", "n", "h", "s", "x", "", " ", "mS", "\t"]),
        pad in prop::sample::select(vec!["", " ", "+", "-"]),
    ) {
        let text = format!("{pad}{digits}{unit}");
        if let Ok(value) = HeaderValue::from_str(&text) {
            checks::check_grpc_timeout(&value);
            let read = checks::expected_grpc_timeout(value.as_bytes());
            let well_formed = pad.is_empty()
                && (1..=8).contains(&digits.len())
                && ["H", "M", "S", "m", "u", "n"].contains(&unit);
            prop_assert_eq!(read.is_some(), well_formed, "{:?}", text);
        }
    }
}

// ---------------------------------------------------------------------------
// HttpRetryOn and HttpClassify::grpc: status codes and grpc-status
// ---------------------------------------------------------------------------

/// `grpc-status` values, valid and not.
fn grpc_status_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (0..=20i32).prop_map(|c| c.to_string()),
        prop::sample::select(vec![
            "+14",
            "014",
            "-1",
            "-0",
            "14 ",
            " 14",
            "OK",
            "UNAVAILABLE",
            "",
            "1e1",
            "256",
            "270",
            "4294967310",
            "99999999999",
        ])
        .prop_map(str::to_owned),
        "[0-9a-z+-]{0,4}",
    ]
}

fn status_code() -> impl Strategy<Value = StatusCode> {
    prop_oneof![
        3 => Just(200u16),
        1 => prop::sample::select(vec![100u16, 429, 500, 502, 503, 504, 999]),
        1 => 100..=999u16,
    ]
    .prop_map(|code| StatusCode::from_u16(code).unwrap_or_else(|e| panic!("{code}: {e}")))
}

/// Headers a server may send about retries and load.
fn response_headers() -> impl Strategy<Value = HeaderMap> {
    (
        prop::option::of(grpc_status_text()),
        prop::option::of(prop_oneof![
            "[0-9]{1,12}".prop_map(String::from),
            Just("Fri, 31 Dec 9999 23:59:59 GMT".to_owned()),
            Just("Sun, 06 Nov 1994 08:49:37 GMT".to_owned()),
            Just("soon".to_owned()),
        ]),
        prop::option::of("[-+]?[0-9]{0,22}"),
        prop::option::of(prop::sample::select(vec![
            "TEXT eps=1, rps_fractional=2",
            "TEXT eps=-1",
            "JSON {\"eps\": 1, \"eps\": 2}",
            "CQ",
        ])),
    )
        .prop_map(|(status, retry_after, pushback_ms, load)| {
            let mut map = HeaderMap::new();
            let pairs = [
                ("grpc-status", status),
                ("retry-after", retry_after),
                ("grpc-retry-pushback-ms", pushback_ms),
                ("endpoint-load-metrics", load.map(str::to_owned)),
            ];
            for (name, value) in pairs {
                if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    map.append(HeaderName::from_static(name), value);
                }
            }
            map
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn retry_on_judges_any_response_bytes_as_documented(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        status in prop::sample::select(vec!["200\n", "503\n", "429\ngrpc-status: ", "200\ngrpc-status: "]),
    ) {
        checks::retry_on_response(&[status.as_bytes(), &bytes].concat());
    }

    #[test]
    fn retry_on_retries_listed_statuses_and_codes_after_their_pushback(
        status in status_code(),
        headers in response_headers(),
    ) {
        checks::check_retry_on(status, &headers);
    }

    #[test]
    fn grpc_classify_judges_any_response_bytes_as_documented(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        start in prop::sample::select(vec!["200\n", "200\n\ngrpc-status: ", "200\ngrpc-status: ", "503\n"]),
    ) {
        checks::grpc_classify(&[start.as_bytes(), &bytes].concat());
    }

    #[test]
    fn grpc_classify_judges_status_headers_and_trailers_as_documented(
        status in status_code(),
        headers in response_headers(),
        trailers in prop::option::of(response_headers()),
    ) {
        checks::check_grpc_classify(status, &headers, trailers.as_ref());
    }
}

// ---------------------------------------------------------------------------
// Request safety
// ---------------------------------------------------------------------------

fn grpc_path() -> impl Strategy<Value = String> {
    let segment = prop::sample::select(vec![
        "",
        "shop.Orders",
        "grpc.health.v1.Health",
        "Create",
        "Get",
        "List",
        "pkg.S",
        "M",
        "odd",
        "name",
        "/",
    ]);
    (prop::collection::vec(segment, 0..5), any::<bool>()).prop_map(|(segments, rooted)| {
        let path = segments.join("/");
        if rooted {
            format!("/{path}")
        } else {
            path
        }
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn method_safety_of_any_path_is_as_documented(
        path in prop_oneof![grpc_path(), ".{0,24}"],
    ) {
        checks::check_method_table(&path);
    }

    #[test]
    fn request_safety_follows_rfc_9110_and_the_method_table(
        method in prop_oneof![
            prop::sample::select(vec![
                "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH", "CONNECT",
                "get",
            ])
            .prop_map(str::to_owned),
            "[A-Z]{1,8}",
        ],
        path in grpc_path(),
        key in prop::option::of("[a-zA-Z0-9-]{0,16}"),
    ) {
        let method = Method::from_bytes(method.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut map = HeaderMap::new();
        if let Some(key) = key {
            map.insert("idempotency-key", header_value(&key));
        }
        checks::check_request_safety(&method, path.as_bytes(), &map);
    }

    #[test]
    fn request_safety_keeps_its_invariants_on_any_request_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        start in prop::sample::select(vec!["POST /", "GET /", "PUT ", "POST /shop.Orders/"]),
    ) {
        checks::method_safety(&[start.as_bytes(), &bytes].concat());
    }
}

// ---------------------------------------------------------------------------
// DNS: the one number discovery takes from a server's answer
// ---------------------------------------------------------------------------

#[cfg(feature = "dns")]
proptest! {
    #![proptest_config(config())]

    #[test]
    fn srv_weight_is_always_a_finite_positive_weight(weight in any::<u16>()) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 80));
        let endpoint = tower_lb::discover::DnsEndpoint { addr, weight, priority: 0 };
        let w = endpoint.static_weight();
        prop_assert!(w.is_finite() && w > 0.0, "{} -> {}", weight, w);
    }
}

// ---------------------------------------------------------------------------
// The fuzzers' seeds, and regressions
// ---------------------------------------------------------------------------

/// Every seed the fuzz targets start from keeps the invariants (so a seed
/// that stops parsing, or a check that stops holding, shows in CI).
#[test]
fn the_fuzz_seeds_keep_every_invariant() {
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 6] = [
        ("load_report", checks::load_report),
        ("pushback", checks::pushback),
        ("grpc_timeout", checks::grpc_timeout),
        ("retry_on_response", checks::retry_on_response),
        ("grpc_classify", checks::grpc_classify),
        ("method_safety", checks::method_safety),
    ];
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in targets {
        let dir = corpus.join(target);
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            let is_seed = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"));
            if is_seed {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
                check(&bytes);
                seeds += 1;
            }
        }
        assert!(seeds >= 3, "{target}: {seeds} seeds");
    }
}

/// The seeds are valid inputs, not only inputs that do not panic: each
/// parses.
#[test]
fn the_load_report_seeds_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/load_report");
    for name in ["text", "text-rps", "json", "bin", "bin-unpadded"] {
        let bytes = std::fs::read(dir.join(format!("seed-{name}")))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let value = HeaderValue::from_bytes(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = LoadReport::from_header(&value).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.rps_fractional > 0.0, "{name}: {report:?}");
    }
    let proto = std::fs::read(dir.join("seed-protobuf")).unwrap_or_else(|e| panic!("{e}"));
    let report = LoadReport::from_protobuf(&proto).unwrap_or_else(|e| panic!("{e}"));
    let encoded = base64::engine::general_purpose::STANDARD.encode(&proto);
    assert_eq!(
        LoadReport::from_grpc_trailer(&header_value(&encoded)),
        Ok(report)
    );
}

#[test]
fn huge_numbers_are_read_or_rejected_never_turned_into_infinity() {
    for text in ["TEXT eps=1e308", "TEXT eps=1.7976931348623157e308"] {
        let report = report_of(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(report.eps > 1e307, "{text}: {report:?}");
    }
    for text in [
        "JSON {\"eps\": 1.7976931348623157e308}",
        "JSON {\"eps\": \"1.7976931348623157e308\"}",
        "TEXT eps=1e309",
        "JSON {\"eps\": 1e309}",
        "TEXT eps=4.9e-324, rps=18446744073709551615",
    ] {
        checks::check_load_result(&report_of(text), text);
    }
    let mut bytes = Vec::new();
    wire::uint64(3, u64::MAX, &mut bytes);
    let report = LoadReport::from_protobuf(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.rps_fractional, u64::MAX as f64);
}

#[test]
fn negative_zero_is_read_as_zero() {
    for text in [
        "TEXT eps=-0, named_metrics.q=-0",
        "TEXT eps=-0.0e5",
        "JSON {\"eps\": -0.0, \"named_metrics\": {\"q\": -0.0}}",
        "JSON {\"eps\": \"-0\"}",
    ] {
        let report = report_of(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(report.eps.is_sign_positive(), "{text}: {:?}", report.eps);
        let q = report.named_metrics.get("q").copied().unwrap_or(0.0);
        assert!(q.is_sign_positive(), "{text}: {q:?}");
    }
    let mut bytes = Vec::new();
    wire::double(7, -0.0, &mut bytes);
    let report = LoadReport::from_protobuf(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert!(report.eps.is_sign_positive(), "{:?}", report.eps);
}

/// Finding (fuzz/README.md): `from_protobuf` checks map values but keeps
/// them as sent, so a `-0.0` stays negative zero there, while the text and
/// JSON forms, and protobuf scalars, turn it into `0.0`
/// (`checked_proto_map` in src/load/report.rs discards `checked`'s value).
#[test]
fn negative_zero_in_a_protobuf_map_is_read_as_zero() {
    // named_metrics (8) {"q": -0.0}: 42 0c 0a 01 71 11 <-0.0 LE>
    let bytes = [
        0x42, 0x0c, 0x0a, 0x01, b'q', 0x11, 0, 0, 0, 0, 0, 0, 0, 0x80,
    ];
    let report = LoadReport::from_protobuf(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let q = report.named_metrics.get("q").copied();
    assert_eq!(q.map(f64::is_sign_positive), Some(true), "{q:?}");
}

#[test]
fn an_empty_map_name_and_null_values_are_read() {
    let report =
        report_of("JSON {\"eps\": null, \"named_metrics\": {\"\": 1}, \"utilization\": null}")
            .unwrap_or_else(|e| panic!("{e}"));
    let expected: HashMap<String, f64> = [(String::new(), 1.0)].into_iter().collect();
    assert_eq!(report.named_metrics, expected);
    assert_eq!(report.eps, 0.0);
}

/// Two invalid values in one protobuf map (`request_cost` {"a": -1},
/// {"b": -1}): the input on which the `load_report` fuzzer found that the
/// error is not deterministic (minimized by hand from
/// `crash-928436de10a2a1873e26c4da51f854e402d37838`).
const TWO_BAD_MAP_VALUES: [u8; 28] = [
    0x22, 0x0c, 0x0a, 0x01, b'a', 0x11, 0, 0, 0, 0, 0, 0, 0xf0, 0xbf, //
    0x22, 0x0c, 0x0a, 0x01, b'b', 0x11, 0, 0, 0, 0, 0, 0, 0xf0, 0xbf,
];

#[test]
fn the_fuzzers_crashes_keep_every_invariant_now() {
    checks::load_report(&TWO_BAD_MAP_VALUES);
    let base64 = base64::engine::general_purpose::STANDARD.encode(TWO_BAD_MAP_VALUES);
    checks::load_report(base64.as_bytes());
    checks::load_report(format!("BIN {base64}").as_bytes());
    let result = LoadReport::from_protobuf(&TWO_BAD_MAP_VALUES);
    assert!(
        matches!(&result, Err(LoadReportError::InvalidNumber { field, .. }) if field.starts_with("request_cost.")),
        "{result:?}"
    );
}

/// Finding (fuzz/README.md), from the `load_report` fuzzer: decoding the
/// same bytes twice can give two different errors. `checked_proto_map` in
/// src/load/report.rs walks the decoded `HashMap`, whose order is random per
/// map, and reports the first invalid value it meets, so the error (and the
/// log line an operator sees) names `request_cost.a` on one call and
/// `request_cost.b` on the next.
#[test]
fn a_protobuf_with_two_bad_map_values_gives_the_same_error_every_time() {
    let errors: BTreeSet<String> = (0..64)
        .map(|_| format!("{:?}", LoadReport::from_protobuf(&TWO_BAD_MAP_VALUES)))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

/// Finding (fuzz/README.md): in the JSON form, an unknown key that happens
/// to be spelled like a map entry (`"named_metrics.x"`) shares the
/// duplicate-key set with the real entry `named_metrics: {"x": ..}`, so a
/// report with both is rejected as a duplicate, although unknown keys are
/// documented as skipped (`parse_json` in src/load/report.rs).
#[test]
fn json_unknown_key_spelled_like_a_map_entry_is_skipped() {
    let text = r#"JSON {"named_metrics.x": 5, "named_metrics": {"x": 1}}"#;
    let report = report_of(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(report.named_metrics.get("x"), Some(&1.0));
}

/// Finding (fuzz/README.md): `HttpClassify::grpc()` counts a response whose
/// `grpc-status` is not a number (`OK`, `14 `, empty) as a success, in the
/// headers and in the trailers, because tower-http's
/// `GrpcErrorsAsFailures` does; a gRPC client reads such a status as
/// `INTERNAL` (grpc-go: "malformed grpc-status"), which this classifier
/// counts as a failure, and a response with no `grpc-status` at all is a
/// failure too.
#[test]
fn a_malformed_grpc_status_is_a_failure() {
    use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse};

    for code in ["OK", "14 ", "", "fourteen", "1e1"] {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", header_value(code));
        let classifier = tower_lb::classify::HttpClassify::grpc()
            .classifier()
            .clone();
        let mut response = http::Response::new(());
        *response.headers_mut() = headers.clone();
        let in_headers = match classifier.clone().classify_response(&response) {
            ClassifiedResponse::Ready(verdict) => verdict.is_ok(),
            ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(None).is_ok(),
        };
        let in_trailers = match classifier.classify_response(&http::Response::new(())) {
            ClassifiedResponse::Ready(verdict) => verdict.is_ok(),
            ClassifiedResponse::RequiresEos(eos) => eos.classify_eos(Some(&headers)).is_ok(),
        };
        assert!(
            !in_headers,
            "grpc-status {code:?} in the headers is a success"
        );
        assert!(
            !in_trailers,
            "grpc-status {code:?} in the trailers is a success"
        );
    }
}
