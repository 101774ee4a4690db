//! What a balancer reads from a request before it picks an endpoint.

use crate::request::{HasCallContext, TriedEndpoints};

/// What a balancer reads from a request before it picks an endpoint.
///
/// A balancer is generic over its request type, and most request types
/// carry nothing for it, so reading is opt-in: [`NoHints`] (the default)
/// reads nothing; [`CallHints`] reads the [`TriedEndpoints`] from the
/// request's [`CallContext`](crate::request::CallContext).
pub trait RequestHints<Req>: Send + Sync + 'static {
    /// The endpoints this request's call has been sent to already.
    fn tried<'r>(&self, req: &'r Req) -> Option<&'r TriedEndpoints>;

    /// What the balancer reads for each pick: [`tried`](Self::tried), and
    /// the request's hash key for hashing strategies
    /// ([`PickContext::hash_key`](crate::strategy::PickContext::hash_key)).
    /// Default: `tried` and no key.
    fn read<'r>(&self, req: &'r Req) -> (Option<&'r TriedEndpoints>, Option<u64>) {
        (self.tried(req), None)
    }
}

/// Reads nothing from requests: every pick is independent.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHints;

impl<Req> RequestHints<Req> for NoHints {
    fn tried<'r>(&self, _: &'r Req) -> Option<&'r TriedEndpoints> {
        None
    }
}

/// Reads the [`TriedEndpoints`] the retry and hedge layers record in a
/// request's [`CallContext`](crate::request::CallContext), so that a retry
/// avoids the endpoints that already had the call, and its hash key (see
/// [`HashKeyLayer`](crate::request::HashKeyLayer)).
#[derive(Debug, Clone, Copy, Default)]
pub struct CallHints;

impl<Req: HasCallContext> RequestHints<Req> for CallHints {
    fn tried<'r>(&self, req: &'r Req) -> Option<&'r TriedEndpoints> {
        req.call_context()?.tried()
    }

    /// Both from the context, found once.
    fn read<'r>(&self, req: &'r Req) -> (Option<&'r TriedEndpoints>, Option<u64>) {
        match req.call_context() {
            Some(context) => (context.tried(), context.hash_key()),
            None => (None, None),
        }
    }
}
