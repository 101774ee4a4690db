//! Topology: what discovery says about where an endpoint stands
//! ([`EndpointMetadata`]: zone, region, priority, weight, labels, and the
//! platform's [`Readiness`]), and the routing above the strategy that reads
//! it.
//!
//! **Priority levels.** Endpoints of priority 0 take the traffic while
//! enough of them are in service; as they fail (ejected, failing their
//! active check, not serving), traffic moves to priority 1 and on, by
//! Envoy's rule: a level takes its share in service times the
//! [overprovisioning factor](crate::balance::Builder::overprovisioning_factor)
//! (1.4), capped at 100 %, and the next level the rest. The strategy then
//! picks within the level a request was given. The panic threshold applies
//! per level, and only while the levels together fall short. With every
//! endpoint at priority 0 (the default) nothing changes.
//!
//! **Zones.** With [`ZoneAware`] on the builder, each level keeps requests
//! in the client's own zone while that zone has the capacity for its share
//! of the client fleet, and spills the rest to the zones with capacity to
//! spare, as Envoy's zone-aware routing does; the strategy picks within the
//! zone a request was given.

mod metadata;
pub(crate) mod priority;
pub(crate) mod zone;

pub use self::metadata::{EndpointMetadata, Readiness};
pub use self::zone::ZoneAware;
