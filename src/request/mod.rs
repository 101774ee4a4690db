//! What the layers of a tower-lb stack read from and write into a request:
//! its [`CallContext`] (deadline, safety class, attempts, hash key), its
//! [`Safety`] class, and how to copy it for another attempt.
//!
//! `http::Request` (hyper and tonic alike) has all of this built in. A
//! request type of your own joins in by implementing [`HasCallContext`]
//! (for the deadline and the balancer's hints) and [`Replayable`] (for
//! retries and hedges).

mod affinity;
mod context;

pub(crate) use self::affinity::stable_hash;
pub use self::affinity::{hash_key_of, FromHeader, HashKey, HashKeyLayer, HashKeySource};
pub use self::context::{CallContext, CallDeadline, HasCallContext, TriedEndpoints};

pub(crate) use self::context::far_future;

use std::fmt;

use http::Method;

/// What sending a request more than once may do: the fact that decides
/// whether it may be retried or hedged.
///
/// Set it explicitly in the call's [`CallContext`]
/// ([`CallContext::set_safety`]) or, for an `http::Request`, by inserting it
/// into the request's extensions; without it, an `http::Request` is
/// classified by its method and headers (see [`Safety::of_http`]), and any
/// other request counts as [`Unsafe`](Safety::Unsafe).
///
/// ```
/// use tower_lb::request::Safety;
///
/// let mut req = http::Request::post("/charges").body(()).unwrap();
/// assert_eq!(Safety::of_http(&req), Safety::Unsafe);
///
/// req.headers_mut().insert("idempotency-key", "8e03978e".parse().unwrap());
/// assert_eq!(Safety::of_http(&req), Safety::Idempotent);
///
/// req.extensions_mut().insert(Safety::Safe);
/// assert_eq!(Safety::of_http(&req), Safety::Safe);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Safety {
    /// Has no effect on the server (GET, HEAD, OPTIONS, TRACE): may be
    /// retried and hedged.
    Safe,
    /// Has the same effect however often it arrives (PUT, DELETE, a request
    /// with an `Idempotency-Key`): may be retried and hedged.
    Idempotent,
    /// May have an effect each time it arrives (POST, PATCH, ...): sent again
    /// only when the error proves it never reached the endpoint, and never
    /// hedged.
    Unsafe,
}

impl Safety {
    /// True for [`Safe`](Self::Safe) and [`Idempotent`](Self::Idempotent):
    /// requests that may arrive twice.
    pub fn may_repeat(self) -> bool {
        !matches!(self, Safety::Unsafe)
    }

    /// The class of an HTTP request: the class in its [`CallContext`] (set
    /// by the caller, given by a layer such as the gRPC `MethodSafety`, or
    /// found by an earlier layer and kept), else an explicit [`Safety`] in
    /// its extensions, else by RFC 9110: GET, HEAD, OPTIONS and TRACE are
    /// safe; PUT, DELETE and any request with an `Idempotency-Key` header are
    /// idempotent; everything else is unsafe. The context comes first, as it
    /// does for the retry and hedge layers, so that every layer of a call
    /// sees one class.
    pub fn of_http<B>(req: &http::Request<B>) -> Safety {
        if let Some(known) = req.call_context().and_then(CallContext::safety) {
            return known;
        }
        if let Some(explicit) = req.extensions().get::<Safety>() {
            return *explicit;
        }
        match *req.method() {
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE => Safety::Safe,
            Method::PUT | Method::DELETE => Safety::Idempotent,
            // By a walk: every POST looks, few have one (see `crate::header`).
            _ if crate::header::contains(req.headers(), &IDEMPOTENCY_KEY) => Safety::Idempotent,
            _ => Safety::Unsafe,
        }
    }
}

/// The header's name as a constant: a lookup by it neither parses nor
/// lowercases a string, and every POST's class is looked up by it.
const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

impl fmt::Display for Safety {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Safety::Safe => "safe",
            Safety::Idempotent => "idempotent",
            Safety::Unsafe => "unsafe",
        })
    }
}

/// Why a request cannot be sent again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotReplayable {
    /// Its body outgrew the replay buffer, so only the first attempt had it
    /// all.
    #[error("the request body exceeded the {cap}-byte replay buffer")]
    BodyOverCap {
        /// The buffer's size in bytes.
        cap: usize,
    },
    /// Its body was not yet fully sent, so a copy could not be complete
    /// (a hedge needs a body it can replay whole, and skips the call
    /// otherwise).
    #[error("the request body is still being sent")]
    BodyIncomplete,
    /// The request type cannot be copied.
    #[error("the request cannot be copied")]
    Unsupported,
}

/// A request the retry and hedge layers can send more than once.
///
/// `http::Request<ReplayBody<B>>` implements it: put a
/// [`ReplayLayer`](crate::retry::ReplayLayer) in front of the retry and
/// hedge layers, which do not add one themselves (the ready-made clients
/// do). A request type of your own implements it by saying how to copy it
/// and, if it can repeat at all, what its safety class is. It needs no
/// `http::Extensions`: a field holding its [`CallContext`] will do.
///
/// ```
/// use tower_lb::request::{CallContext, HasCallContext, NotReplayable, Replayable, Safety};
///
/// #[derive(Clone)]
/// struct Lookup {
///     key: String,
///     call: Option<CallContext>,
/// }
///
/// impl HasCallContext for Lookup {
///     fn call_context(&self) -> Option<&CallContext> { self.call.as_ref() }
///     fn call_context_mut(&mut self) -> &mut CallContext {
///         self.call.get_or_insert_with(CallContext::new)
///     }
/// }
///
/// impl Replayable for Lookup {
///     fn safety(&self) -> Safety {
///         Safety::Safe
///     }
///     fn replay(&self) -> Result<Self, NotReplayable> {
///         Ok(self.clone())
///     }
/// }
/// ```
pub trait Replayable: HasCallContext + Sized {
    /// The request's safety class. The default reads an explicit class
    /// from the call's [`CallContext`] and otherwise says
    /// [`Unsafe`](Safety::Unsafe).
    fn safety(&self) -> Safety {
        self.call_context()
            .and_then(CallContext::safety)
            .unwrap_or(Safety::Unsafe)
    }

    /// A copy of the request for another attempt, its [`CallContext`]
    /// included (so every attempt shares the deadline and the endpoints
    /// tried).
    fn replay(&self) -> Result<Self, NotReplayable>;

    /// A copy to send *beside* an attempt still running (a hedge): it must
    /// be whole now, not depend on the running attempt to pull the rest of
    /// the body. The default is [`replay`](Self::replay), right for requests
    /// held whole in memory.
    fn replay_complete(&self) -> Result<Self, NotReplayable> {
        self.replay()
    }

    /// The copy the [retry layer](crate::retry) keeps for the attempts to
    /// come, made once per call: each retry is a [`replay`](Self::replay)
    /// of it, given the call's [`CallContext`] (which the layer keeps
    /// beside it) when the copy has none. The default is
    /// [`replay`](Self::replay). `http::Request` leaves its extensions out
    /// of this copy when the context is all they hold: most calls are never
    /// retried, and copying a map of extensions costs three allocations.
    fn replay_kept(&self) -> Result<Self, NotReplayable> {
        self.replay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri("/")
            .body(())
            .unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn safe_methods_are_safe() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert_eq!(Safety::of_http(&request(method)), Safety::Safe);
        }
    }

    #[test]
    fn put_and_delete_are_idempotent() {
        for method in [Method::PUT, Method::DELETE] {
            assert_eq!(Safety::of_http(&request(method)), Safety::Idempotent);
        }
    }

    #[test]
    fn post_and_patch_are_unsafe() {
        for method in [Method::POST, Method::PATCH] {
            assert_eq!(Safety::of_http(&request(method)), Safety::Unsafe);
        }
    }

    #[test]
    fn an_idempotency_key_makes_a_post_idempotent() {
        let mut req = request(Method::POST);
        req.headers_mut()
            .insert("idempotency-key", http::HeaderValue::from_static("k-1"));
        assert_eq!(Safety::of_http(&req), Safety::Idempotent);
    }

    #[test]
    fn the_class_in_the_call_context_wins_over_the_extension_and_the_method() {
        let mut req = request(Method::GET);
        req.extensions_mut().insert(Safety::Safe);
        req.call_context_mut().set_safety(Safety::Unsafe);
        assert_eq!(Safety::of_http(&req), Safety::Unsafe);
    }

    #[test]
    fn an_explicit_class_wins_over_the_method() {
        let mut req = request(Method::GET);
        req.extensions_mut().insert(Safety::Unsafe);
        assert_eq!(Safety::of_http(&req), Safety::Unsafe);
    }
}
