//! Request affinity: a hash key per call, read from the request, that a
//! hashing strategy sends to the same endpoint every time.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::HeaderName;
use tower::{Layer, Service};

use super::HasCallContext;
use crate::setting::InvalidSetting;

/// The hash key of `bytes`: xxHash64 with seed 0, as gRPC's `ring_hash`
/// (A42) and Envoy hash a request's key, so that every client of a fleet
/// maps a key to the same place on the ring.
///
/// ```
/// use tower_lb::request::{hash_key_of, CallContext};
///
/// let mut context = CallContext::new();
/// context.set_hash_key(hash_key_of(b"user-42"));
/// assert_eq!(context.hash_key(), Some(hash_key_of(b"user-42")));
/// ```
pub fn hash_key_of(bytes: &[u8]) -> u64 {
    twox_hash::XxHash64::oneshot(0, bytes)
}

/// `key`'s hash, the same in every process and on every platform for the
/// same key: xxHash64 (seed 0) of what its `Hash` writes, with every
/// integer written as little-endian bytes and `usize` and `isize` as 64
/// bits, so that 32- and 64-bit, little- and big-endian clients of a fleet
/// agree (std's own hashers are seeded at random, and `Hash` writes
/// integers as the machine stores them). It follows the key type's `Hash`,
/// so a change of that (std does not promise its derived hashes across
/// versions) would move endpoints on a ring.
pub(crate) fn stable_hash<K: std::hash::Hash + ?Sized>(key: &K) -> u64 {
    use std::hash::Hasher;
    let mut hasher = StableHasher(twox_hash::XxHash64::with_seed(0));
    key.hash(&mut hasher);
    hasher.finish()
}

/// xxHash64 over integers written the same way on every platform.
struct StableHasher(twox_hash::XxHash64);

impl std::hash::Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0.finish()
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
    fn write_u8(&mut self, n: u8) {
        self.0.write(&[n]);
    }
    fn write_u16(&mut self, n: u16) {
        self.0.write(&n.to_le_bytes());
    }
    fn write_u32(&mut self, n: u32) {
        self.0.write(&n.to_le_bytes());
    }
    fn write_u64(&mut self, n: u64) {
        self.0.write(&n.to_le_bytes());
    }
    fn write_u128(&mut self, n: u128) {
        self.0.write(&n.to_le_bytes());
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_i8(&mut self, n: i8) {
        self.write_u8(n as u8);
    }
    fn write_i16(&mut self, n: i16) {
        self.write_u16(n as u16);
    }
    fn write_i32(&mut self, n: i32) {
        self.write_u32(n as u32);
    }
    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
    fn write_i128(&mut self, n: i128) {
        self.write_u128(n as u128);
    }
    fn write_isize(&mut self, n: isize) {
        self.write_u64(n as i64 as u64);
    }
}

/// Where a [`HashKeyLayer`] finds a request's key.
pub trait HashKeySource<Req>: Send + Sync + 'static {
    /// The request's hash key, if it has one.
    fn hash_key(&self, req: &Req) -> Option<u64>;
}

/// A key from a closure over the request.
impl<Req, F> HashKeySource<Req> for F
where
    F: Fn(&Req) -> Option<u64> + Send + Sync + 'static,
{
    fn hash_key(&self, req: &Req) -> Option<u64> {
        self(req)
    }
}

/// The key of an HTTP header (or gRPC metadata entry, which travels as
/// one): the hash of its value's bytes, or none when the request lacks it.
/// Of a header given more than once, the first value.
#[derive(Debug, Clone)]
pub struct FromHeader(HeaderName);

impl<B> HashKeySource<http::Request<B>> for FromHeader {
    fn hash_key(&self, req: &http::Request<B>) -> Option<u64> {
        let value = req.headers().get(&self.0)?;
        Some(hash_key_of(value.as_bytes()))
    }
}

/// Gives each call the hash key its request carries, in the call's
/// [`CallContext`](super::CallContext), where a hashing strategy finds it
/// (through [`CallHints`](crate::balance::CallHints)): from a header, from
/// a closure, or set directly with
/// [`CallContext::set_hash_key`](super::CallContext::set_hash_key).
///
/// A request without a key gets none: a hashing strategy sends it as P2C
/// would.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_lb::request::{hash_key_of, HashKeyLayer};
///
/// // By a header; a gRPC metadata key works the same way.
/// let by_user = HashKeyLayer::header("x-user-id")?;
/// // Or by anything in the request: here the first path segment.
/// let by_tenant = HashKeyLayer::from_fn(|req: &http::Request<()>| {
///     let tenant = req.uri().path().split('/').nth(1)?;
///     Some(hash_key_of(tenant.as_bytes()))
/// });
/// # let _ = ServiceBuilder::new().layer(by_user).layer(by_tenant);
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
pub struct HashKeyLayer<K> {
    source: Arc<K>,
}

impl HashKeyLayer<FromHeader> {
    /// Keys from the header `name`.
    ///
    /// # Errors
    ///
    /// When `name` is not a valid header name.
    pub fn header(name: &str) -> Result<Self, InvalidSetting> {
        let parsed = HeaderName::try_from(name).map_err(|_| {
            InvalidSetting::new("HashKeyLayer::header", name, "a valid HTTP header name")
        })?;
        Ok(Self {
            source: Arc::new(FromHeader(parsed)),
        })
    }
}

impl<F> HashKeyLayer<F> {
    /// Keys from `key`, a closure over the request.
    pub fn from_fn<Req>(key: F) -> Self
    where
        F: Fn(&Req) -> Option<u64> + Send + Sync + 'static,
    {
        Self {
            source: Arc::new(key),
        }
    }
}

impl<K> Clone for HashKeyLayer<K> {
    fn clone(&self) -> Self {
        Self {
            source: Arc::clone(&self.source),
        }
    }
}

impl<K> fmt::Debug for HashKeyLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashKeyLayer").finish_non_exhaustive()
    }
}

impl<S, K> Layer<S> for HashKeyLayer<K> {
    type Service = HashKey<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        HashKey {
            inner,
            source: Arc::clone(&self.source),
        }
    }
}

/// The service of [`HashKeyLayer`]: its future is the inner service's.
pub struct HashKey<S, K> {
    inner: S,
    source: Arc<K>,
}

impl<S: Clone, K> Clone for HashKey<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            source: Arc::clone(&self.source),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for HashKey<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashKey")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, K, Req> Service<Req> for HashKey<S, K>
where
    S: Service<Req>,
    K: HashKeySource<Req>,
    Req: HasCallContext,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> S::Future {
        // A key the caller set stands, as an explicit class does; a request
        // without a key makes no context for it.
        let explicit = req.call_context().and_then(|c| c.hash_key()).is_some();
        if !explicit {
            if let Some(key) = self.source.hash_key(&req) {
                req.call_context_mut().set_hash_key(key);
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    /// The hash key the service beneath saw.
    async fn seen_key<K>(layer: HashKeyLayer<K>, req: http::Request<()>) -> Option<u64>
    where
        K: HashKeySource<http::Request<()>>,
    {
        let inner = service_fn(|req: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req.call_context().and_then(|c| c.hash_key()))
        });
        layer.layer(inner).oneshot(req).await.unwrap_or(None)
    }

    #[tokio::test]
    async fn a_header_value_becomes_the_calls_hash_key() {
        let layer = HashKeyLayer::header("x-user-id").expect("a header name");
        let req = http::Request::get("/")
            .header("x-user-id", "42")
            .body(())
            .expect("request");
        assert_eq!(seen_key(layer.clone(), req).await, Some(hash_key_of(b"42")));
        let without = http::Request::new(());
        assert_eq!(seen_key(layer, without).await, None);
    }

    #[tokio::test]
    async fn a_closure_decides_the_key() {
        let layer = HashKeyLayer::from_fn(|req: &http::Request<()>| {
            req.uri()
                .path()
                .strip_prefix("/t/")
                .map(|t| hash_key_of(t.as_bytes()))
        });
        let req = http::Request::get("/t/acme").body(()).expect("request");
        assert_eq!(seen_key(layer, req).await, Some(hash_key_of(b"acme")));
    }

    #[test]
    fn a_header_name_that_is_not_one_is_refused_by_name() {
        let error = HashKeyLayer::header("not a header").expect_err("invalid");
        assert_eq!(error.setting(), "HashKeyLayer::header");
    }

    /// `stable_hash` of 10.0.0.1:8080, as std's `Hash` for `SocketAddr`
    /// writes it today.
    const GOLDEN_ADDR: u64 = 0xee49_b5dd_a114_e7be;

    #[test]
    fn an_endpoints_identity_is_the_same_on_every_platform() {
        // Golden values: a change of either (a std `Hash` impl, this
        // hasher) would move every endpoint of a fleet's rings.
        // Integers as little-endian bytes, `usize` as 64 bits.
        assert_eq!(stable_hash(&7usize), hash_key_of(&7u64.to_le_bytes()));
        assert_eq!(stable_hash(&7u16), hash_key_of(&[7, 0]));
        let addr: std::net::SocketAddr = "10.0.0.1:8080".parse().expect("address");
        assert_eq!(stable_hash(&addr), GOLDEN_ADDR, "{:#x}", stable_hash(&addr));
    }

    #[tokio::test]
    async fn a_key_the_caller_set_stands() {
        let layer = HashKeyLayer::header("x-user-id").expect("a header name");
        let mut req = http::Request::get("/")
            .header("x-user-id", "42")
            .body(())
            .expect("request");
        req.call_context_mut().set_hash_key(7);
        assert_eq!(seen_key(layer, req).await, Some(7));
    }

    #[test]
    fn keys_are_xxhash64_with_seed_zero() {
        // The reference value of XXH64("", 0).
        assert_eq!(hash_key_of(b""), 0xEF46_DB37_51D8_E999);
    }
}
