//! Sources of endpoints.
//!
//! The balancer consumes any [`tower::discover::Discover`], that is any
//! `TryStream<Ok = Change<K, S>>`. This module adds four ready-made ones:
//!
//! - [`fixed`]: a list known up front;
//! - [`channel`]: a handle your code pushes changes through (insert, remove,
//!   replace the whole set);
//! - [`Dns`] (feature `dns`, on by default): A/AAAA or SRV records,
//!   re-resolved when their TTL runs out;
//! - [`EndpointSlices`] (feature `kubernetes`): the endpoints of a
//!   Kubernetes Service, watched through the API server, with their
//!   readiness and zone.
//!
//! and one adapter over any of them: [`Subset`], which passes on only the
//! backends of one client's subset (Finagle's deterministic aperture, or
//! gRPC's random subsetting), for fleets of many clients over many
//! backends.
//!
//! How the balancer treats what a stream yields:
//!
//! | the stream yields | the balancer |
//! |---|---|
//! | `Insert` of a new key | adds the endpoint |
//! | `Insert` of a known key | replaces the service; the old one drains |
//! | `Remove` of a known key | stops sending to it; in-flight requests finish |
//! | `Remove` of an unknown key | ignores it (a `debug` event) |
//! | an error | keeps the last good set (a `warn` event), polls again after a back-off |
//! | an [`Empty`] error (discovery found nothing) | with no endpoints: fails requests at once with its reason ([`Error::DiscoveredNone`](crate::Error::DiscoveredNone)); with some: keeps them (a `warn` event) |
//! | the end of the stream | keeps the last set (a `debug` event) |
//!
//! Requests that arrive while the set is empty wait for an endpoint, up to
//! the [startup wait](crate::balance::Builder::startup_wait), only until discovery
//! has said something. Once it has said there is nothing, they fail at once
//! with [`Error::DiscoveredNone`](crate::Error::DiscoveredNone), as gRPC
//! fails calls on a channel whose resolver produced no addresses and Envoy
//! answers 503 when a cluster has no hosts: waiting would only hold every
//! caller for the startup wait and end in the same error. Discovery says
//! so when
//!
//! - the stream ends with no endpoint (an empty [`fixed`] list): "the
//!   discovery stream ended without any endpoint";
//! - it removes the last endpoint (a [`DiscoveryHandle::remove`], a
//!   [`DiscoveryHandle::replace_all`] with nothing, a DNS name gone to
//!   nothing with [`Dns::apply_empty_answers`]): "discovery removed every
//!   endpoint", or the stream's own reason;
//! - it yields an [`Empty`] error: a [`Dns`] name with no records
//!   (NXDOMAIN, or none of the type asked), a Kubernetes Service with no
//!   endpoints, or a `replace_all` with nothing at startup.
//!
//! Entering that state is one `warn` event with the reason. The first
//! endpoint inserted afterwards ends it. A DNS resolver that fails
//! or times out is not an answer: requests keep waiting, and a name that had
//! records keeps them; after an empty answer, the last answer stands, so
//! requests keep failing at once until a later answer has records.
//!
#![cfg_attr(
    feature = "dns",
    doc = "
[`Dns`]: Dns
[`Dns::apply_empty_answers`]: Dns::apply_empty_answers
"
)]
#![cfg_attr(feature = "kubernetes", doc = "[`EndpointSlices`]: EndpointSlices")]
#![cfg_attr(
    not(feature = "kubernetes"),
    doc = "[`EndpointSlices`]: crate#cargo-features"
)]
#![cfg_attr(
    not(feature = "dns"),
    doc = "
[`Dns`]: crate#cargo-features
[`Dns::apply_empty_answers`]: crate#cargo-features
"
)]

mod channel;
#[cfg(feature = "dns")]
mod dns;
mod fixed;
#[cfg(feature = "kubernetes")]
mod kubernetes;
mod subset;

pub use self::channel::{channel, ChannelDiscover, DiscoveryClosed, DiscoveryHandle};
#[cfg(feature = "dns")]
#[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
pub use self::dns::{Dns, DnsDiscover, DnsEndpoint, DnsError, DnsRecords, ResolveNow};
pub use self::fixed::{fixed, Fixed};
#[cfg(feature = "kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "kubernetes")))]
pub use self::kubernetes::{
    EndpointSlices, KubernetesDiscover, KubernetesEndpoint, KubernetesError,
};
pub use self::subset::{Subset, SubsetDiscover};
pub use crate::error::Empty;
pub use tower::discover::{Change, Discover};
