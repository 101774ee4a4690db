//! Sources of endpoints.
//!
//! The balancer consumes any [`tower::discover::Discover`], that is any
//! `TryStream<Ok = Change<K, S>>`. This module adds two ready-made ones:
//!
//! - [`fixed`]: a list known up front;
//! - [`channel`]: a handle your code pushes changes through (insert, remove,
//!   replace the whole set);
//! - [`Dns`] (feature `dns`, on by default): A/AAAA or SRV records,
//!   re-resolved when their TTL runs out.
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
//! | the end of the stream | keeps the last set |

mod channel;
#[cfg(feature = "dns")]
mod dns;
mod fixed;

pub use self::channel::{channel, ChannelDiscover, DiscoveryClosed, DiscoveryHandle};
#[cfg(feature = "dns")]
pub use self::dns::{Dns, DnsDiscover, DnsEndpoint, DnsError, ResolveNow};
pub use self::fixed::{fixed, Fixed};
pub use tower::discover::{Change, Discover};
