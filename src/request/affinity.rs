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
        // A request without a key makes no context for it.
        if let Some(key) = self.source.hash_key(&req) {
            req.call_context_mut().set_hash_key(key);
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

    #[test]
    fn keys_are_xxhash64_with_seed_zero() {
        // The reference value of XXH64("", 0).
        assert_eq!(hash_key_of(b""), 0xEF46_DB37_51D8_E999);
    }
}
