use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::request::{CallContext, HasCallContext, Safety};

/// Which gRPC methods may be sent twice: a [`Safety`] class per method or
/// per service, given to each call by its path, and a [`Layer`] that does
/// it.
///
/// Every gRPC call is an HTTP POST, so without this a call is
/// [`Safety::Unsafe`]: sent again only when it provably never left, and
/// never hedged. gRPC itself has no way to say a method is idempotent (the
/// proto option `idempotency_level` does not reach the wire), so the client
/// says it here. A [`Safety`] the caller put in the request's extensions
/// (`request.extensions_mut().insert(Safety::Idempotent)` on a
/// `tonic::Request`) wins over the table.
///
/// ```
/// use tower_lb::grpc::MethodSafety;
/// use tower_lb::request::Safety;
///
/// let table = MethodSafety::new()
///     .service("grpc.health.v1.Health", Safety::Safe)
///     .method("/shop.Orders/Cancel", Safety::Idempotent);
/// assert_eq!(table.of("/grpc.health.v1.Health/Check"), Some(Safety::Safe));
/// assert_eq!(table.of("/shop.Orders/Cancel"), Some(Safety::Idempotent));
/// assert_eq!(table.of("/shop.Orders/Create"), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct MethodSafety {
    methods: Arc<HashMap<Box<str>, Safety>>,
    services: Arc<HashMap<Box<str>, Safety>>,
}

impl MethodSafety {
    /// An empty table: every call is unsafe unless its caller says
    /// otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// `method`, a path like `/package.Service/Method` (the leading `/` may
    /// be left out), has class `safety`.
    pub fn method(mut self, method: &str, safety: Safety) -> Self {
        let path = format!("/{}", method.trim_start_matches('/'));
        Arc::make_mut(&mut self.methods).insert(path.into(), safety);
        self
    }

    /// Every method of `service` (`package.Service`) has class `safety`,
    /// unless [`method`](Self::method) says otherwise for one of them.
    pub fn service(mut self, service: &str, safety: Safety) -> Self {
        let name = service.trim_matches('/');
        Arc::make_mut(&mut self.services).insert(name.into(), safety);
        self
    }

    /// The class of a call to `path`, if the table has one.
    pub fn of(&self, path: &str) -> Option<Safety> {
        if self.is_empty() {
            return None;
        }
        if let Some(safety) = self.methods.get(path) {
            return Some(*safety);
        }
        let service = path.strip_prefix('/')?.rsplit_once('/')?.0;
        self.services.get(service).copied()
    }

    /// No class for any call: the `GrpcChannel` default, which asks for
    /// every call. Checked first: the lookups would look for the call in
    /// its extensions and cut the service name out of its path for nothing.
    fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.services.is_empty()
    }
}

impl<S> Layer<S> for MethodSafety {
    type Service = WithMethodSafety<S>;

    fn layer(&self, inner: S) -> WithMethodSafety<S> {
        WithMethodSafety {
            inner,
            table: self.clone(),
        }
    }
}

/// Gives each call the [`Safety`] class its method has in a
/// [`MethodSafety`] table, unless the call carries one.
#[derive(Debug, Clone)]
pub struct WithMethodSafety<S> {
    inner: S,
    table: MethodSafety,
}

impl<S, B> Service<http::Request<B>> for WithMethodSafety<S>
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
        // An empty table gives no call a class: nothing to look up.
        if self.table.is_empty() {
            return self.inner.call(req);
        }
        let explicit = req.extensions().get::<Safety>().is_some()
            || req.call_context().and_then(CallContext::safety).is_some();
        if !explicit {
            if let Some(safety) = self.table.of(req.uri().path()) {
                // Into the call's context, which the retry and hedge layers
                // beneath would make anyway: no allocation of its own.
                req.call_context_mut().set_safety(safety);
            }
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_entry_wins_over_its_service() {
        let table = MethodSafety::new()
            .service("shop.Orders", Safety::Safe)
            .method("shop.Orders/Create", Safety::Unsafe);
        assert_eq!(table.of("/shop.Orders/Create"), Some(Safety::Unsafe));
        assert_eq!(table.of("/shop.Orders/List"), Some(Safety::Safe));
    }

    #[test]
    fn a_path_that_is_not_a_grpc_method_has_no_class() {
        let table = MethodSafety::new().service("shop.Orders", Safety::Safe);
        assert_eq!(table.of("shop.Orders/List"), None);
        assert_eq!(table.of("/"), None);
        assert_eq!(table.of(""), None);
        assert_eq!(table.of("/shop.Orders"), None);
        assert_eq!(MethodSafety::new().of("/shop.Orders/List"), None);
    }

    #[tokio::test]
    async fn the_callers_class_wins_over_the_table() {
        use tower::ServiceExt;

        let echo = tower::service_fn(|req: http::Request<()>| async move {
            let class = req.call_context().and_then(CallContext::safety);
            Ok::<_, std::convert::Infallible>(class.or(req.extensions().get::<Safety>().copied()))
        });
        let service = MethodSafety::new()
            .service("shop.Orders", Safety::Safe)
            .layer(echo);

        let plain = http::Request::post("/shop.Orders/List")
            .body(())
            .unwrap_or_default();
        assert_eq!(service.clone().oneshot(plain).await, Ok(Some(Safety::Safe)));

        let mut marked = http::Request::post("/shop.Orders/List")
            .body(())
            .unwrap_or_default();
        marked.extensions_mut().insert(Safety::Unsafe);
        assert_eq!(
            service.oneshot(marked.clone()).await,
            Ok(Some(Safety::Unsafe))
        );

        // An empty table classes nothing, and the caller's class stands.
        let empty = MethodSafety::new().layer(echo);
        let plain = http::Request::post("/shop.Orders/List")
            .body(())
            .unwrap_or_default();
        assert_eq!(empty.clone().oneshot(plain).await, Ok(None));
        assert_eq!(empty.oneshot(marked).await, Ok(Some(Safety::Unsafe)));
    }
}
