//! Header lookups by a walk over a small map's names, for the few headers
//! every call looks for and nearly never finds (or finds in a map of two
//! or three entries).
//!
//! `HeaderMap::get` hashes the whole name byte by byte before it probes,
//! even to find nothing. A request or a response usually has a handful of
//! entries, and a walk comparing names (most differ in kind or length at
//! once) costs less than the hash: a call looks up `grpc-timeout` twice,
//! `idempotency-key` once and `grpc-status` three times.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Maps up to this many entries are searched by a walk over their names;
/// larger ones by the map's own lookup.
pub(crate) const WALKED: usize = 16;

/// What `headers.get(name)` gives: the first value of `name`.
pub(crate) fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.keys_len() > WALKED {
        return headers.get(name);
    }
    // The map yields each name's first value before its others, so the
    // first match is the value `get` would give.
    headers
        .iter()
        .find_map(|(key, value)| (key == name).then_some(value))
}

/// What `headers.contains_key(name)` says.
pub(crate) fn contains(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() > WALKED {
        return headers.contains_key(name);
    }
    headers.keys().any(|key| key == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

    /// A map of `n` other names, then two values of `grpc-status`.
    fn map(n: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("a"));
        for i in 0..n {
            let name = HeaderName::try_from(format!("x-{i}")).unwrap_or_else(|e| panic!("{e}"));
            headers.insert(name, HeaderValue::from(i));
        }
        headers.append(GRPC_STATUS, HeaderValue::from_static("14"));
        headers.append(GRPC_STATUS, HeaderValue::from_static("0"));
        headers
    }

    #[test]
    fn walked_or_hashed_the_answer_is_the_maps_own() {
        for n in [0, 3, WALKED - 2, WALKED, WALKED + 5] {
            let headers = map(n);
            assert_eq!(
                get(&headers, &GRPC_STATUS),
                headers.get(&GRPC_STATUS),
                "{n}"
            );
            assert_eq!(
                get(&headers, &GRPC_STATUS).map(HeaderValue::as_bytes),
                Some(&b"14"[..])
            );
            assert!(contains(&headers, &GRPC_STATUS));
            let absent = HeaderName::from_static("idempotency-key");
            assert_eq!(get(&headers, &absent), None);
            assert!(!contains(&headers, &absent));
            assert_eq!(
                get(&headers, &http::header::CONTENT_TYPE),
                headers.get(http::header::CONTENT_TYPE)
            );
        }
        assert_eq!(get(&HeaderMap::new(), &GRPC_STATUS), None);
    }
}
