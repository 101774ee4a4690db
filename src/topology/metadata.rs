//! What discovery says about an endpoint besides its address.

use std::fmt;
use std::sync::Arc;

use crate::setting::{self, InvalidSetting};

/// Where an endpoint stands in the deployment: its zone and region, its
/// priority level, its weight, free-form labels, and what the platform says
/// of its readiness.
///
/// Discovery gives it (see
/// [`Builder::metadata`](crate::balance::Builder::metadata)); strategies read
/// it through [`Candidates::metadata`](crate::strategy::Candidates::metadata),
/// and [`EndpointStats::metadata`](crate::balance::EndpointStats::metadata)
/// shows it. An endpoint nobody describes has the defaults: no zone or
/// region, priority 0, weight 1, no labels, ready.
///
/// ```
/// use tower_lb::topology::{EndpointMetadata, Readiness};
///
/// let metadata = EndpointMetadata::new()
///     .with_zone("eu-west-1a")
///     .with_region("eu-west-1")
///     .with_priority(1)
///     .with_weight(2.0)?
///     .with_label("version", "v2")
///     .with_readiness(Readiness::Terminating);
/// assert_eq!(metadata.zone(), Some("eu-west-1a"));
/// assert_eq!(metadata.label("version"), Some("v2"));
/// assert_eq!(metadata.priority(), 1);
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Clone, PartialEq)]
pub struct EndpointMetadata {
    zone: Option<Arc<str>>,
    region: Option<Arc<str>>,
    priority: u32,
    weight: Option<f64>,
    labels: Option<Arc<[Label]>>,
    readiness: Readiness,
}

/// One label: a name and its value.
type Label = (Box<str>, Box<str>);

/// What the platform says of an endpoint (Kubernetes' EndpointSlice
/// conditions, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Readiness {
    /// Ready for traffic: the default.
    #[default]
    Ready,
    /// Being stopped, but still serving (Kubernetes' `serving: true,
    /// terminating: true`): it gets new requests only while no endpoint of
    /// its priority level is ready, as kube-proxy sends to terminating
    /// endpoints only then; requests under way finish.
    Terminating,
    /// Not serving (`serving: false`): out of service, as if its active
    /// check failed; requests under way finish.
    NotServing,
}

/// An endpoint nobody described.
static DEFAULT: EndpointMetadata = EndpointMetadata::new();

impl EndpointMetadata {
    /// The defaults: no zone or region, priority 0, weight 1, no labels,
    /// ready.
    pub const fn new() -> Self {
        Self {
            zone: None,
            region: None,
            priority: 0,
            weight: None,
            labels: None,
            readiness: Readiness::Ready,
        }
    }

    /// The defaults, shared: what an undescribed endpoint reads.
    pub(crate) fn default_ref() -> &'static Self {
        &DEFAULT
    }

    /// The zone it runs in (an availability zone, a rack).
    pub fn with_zone(mut self, zone: impl Into<Arc<str>>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The region its zone is in.
    pub fn with_region(mut self, region: impl Into<Arc<str>>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Its priority level: 0 (the default) is the first choice, 1 takes
    /// what level 0 cannot, and so on (see
    /// [`Builder::overprovisioning_factor`](crate::balance::Builder::overprovisioning_factor)).
    pub fn with_priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Its weight relative to the others (default 1), as
    /// [`Builder::static_weights`](crate::balance::Builder::static_weights)
    /// gives it.
    ///
    /// # Errors
    ///
    /// When `weight` is not finite and positive.
    pub fn with_weight(mut self, weight: f64) -> Result<Self, InvalidSetting> {
        let valid = weight.is_finite() && weight > 0.0;
        self.weight = Some(setting::check(
            "EndpointMetadata::with_weight",
            weight,
            valid,
            "a finite number above 0",
        )?);
        Ok(self)
    }

    /// Its weight as given, checked by whoever reads it (the balancer's
    /// driver refuses a bad one with a warning, as for static weights).
    pub(crate) fn with_unchecked_weight(mut self, weight: f64) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Adds the label `name` = `value` (a later label of the same name
    /// replaces it).
    pub fn with_label(mut self, name: impl Into<Box<str>>, value: impl Into<Box<str>>) -> Self {
        let name = name.into();
        let mut labels: Vec<Label> = self
            .labels
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|(n, _)| *n != name)
            .cloned()
            .collect();
        labels.push((name, value.into()));
        self.labels = Some(labels.into());
        self
    }

    /// What the platform says of it.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }
}

/// Reading it back.
impl EndpointMetadata {
    /// Its zone, if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Its region, if known.
    pub fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// Its priority level.
    pub fn priority(&self) -> u32 {
        self.priority
    }

    /// Its weight, if discovery gave one.
    pub fn weight(&self) -> Option<f64> {
        self.weight
    }

    /// The value of label `name`.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels()
            .find(|(n, _)| *n == name)
            .map(|(_, value)| value)
    }

    /// Every label, in the order they were added.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|(n, v)| (&**n, &**v))
    }

    /// What the platform says of it.
    pub fn readiness(&self) -> Readiness {
        self.readiness
    }
}

impl Default for EndpointMetadata {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for EndpointMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("EndpointMetadata");
        if let Some(zone) = &self.zone {
            s.field("zone", zone);
        }
        if let Some(region) = &self.region {
            s.field("region", region);
        }
        s.field("priority", &self.priority);
        if let Some(weight) = self.weight {
            s.field("weight", &weight);
        }
        if self.labels.is_some() {
            s.field("labels", &self.labels().collect::<Vec<_>>());
        }
        s.field("readiness", &self.readiness).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weight_that_is_not_finite_and_positive_is_refused_by_name() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let error = EndpointMetadata::new().with_weight(bad).unwrap_err();
            assert_eq!(error.setting(), "EndpointMetadata::with_weight");
        }
    }

    #[test]
    fn a_label_given_twice_keeps_the_later_value() {
        let metadata = EndpointMetadata::new()
            .with_label("track", "stable")
            .with_label("version", "2")
            .with_label("track", "canary");
        assert_eq!(metadata.label("track"), Some("canary"));
        assert_eq!(metadata.labels().count(), 2);
    }

    #[test]
    fn an_undescribed_endpoint_has_the_defaults() {
        let metadata = EndpointMetadata::default();
        assert_eq!(
            (metadata.zone(), metadata.priority(), metadata.weight()),
            (None, 0, None)
        );
        assert_eq!(metadata.readiness(), Readiness::Ready);
        assert_eq!(&metadata, EndpointMetadata::default_ref());
    }
}
