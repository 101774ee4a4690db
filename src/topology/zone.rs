//! Zone-aware routing, as Envoy does it: keep requests in the client's own
//! zone while that zone has enough endpoints in service for the share of
//! the client fleet that runs there, and send the rest to the zones that
//! have endpoints to spare.

use std::sync::Arc;

use crate::setting::{self, InvalidSetting};

/// Zone-aware routing settings: the client's own zone, and what it needs to
/// know of the fleet of clients (see
/// [`Builder::zone_aware`](crate::balance::Builder::zone_aware)).
///
/// Each priority level is routed on its own, before the strategy picks:
///
/// - the *local share* of the clients is the client fleet's share in the
///   local zone: as set by [`client_shares`](Self::client_shares), or by
///   default the local zone's share of the level's endpoints (clients
///   deployed like their servers, as is usual when both scale with one
///   zone spread);
/// - the *local capacity* is the local zone's share of the level's
///   endpoints in service;
/// - while the capacity covers the clients' share, every request stays in
///   the local zone; below it, the local zone takes capacity / share of the
///   requests and the rest goes to the other zones in proportion to what
///   they have to spare (their capacity above their own clients' share).
///
/// **Load-aware spill.** The rule above counts endpoints, not load: a local
/// zone left with one endpoint for a third of the clients keeps 3/7 of the
/// requests whatever that endpoint can take. So while the local zone is
/// short (the rule already sends some requests elsewhere), a request given
/// the local zone also looks at the endpoint the strategy would pick in
/// another zone (drawn by the zones' shares), and goes there instead when
/// the local pick's latency estimate is more than 5 ms above that
/// endpoint's, cross-zone time included (times
/// [`latency_spill_factor`](Self::latency_spill_factor), 1 by default).
/// The margin is there because Peak-EWMA estimates jump to every slow
/// answer and decay over seconds: on fast services one stray answer would
/// otherwise send the zone's requests away for seconds. The local zone
/// sheds requests until its latency is back within the margin. A whole
/// local zone keeps every request, however busy: against idle zones,
/// latency under load says nothing. It needs
/// latency estimates (a Peak-EWMA strategy, or
/// [`Builder::track_latency`](crate::balance::Builder::track_latency)).
///
/// It is not applied (requests go to every zone, as without it) to a level
/// with fewer than [`min_cluster_size`](Self::min_cluster_size) endpoints
/// (6, as Envoy), a level in panic mode, or a level with endpoints in one
/// zone only. Ejections, active checks and connection states change the
/// capacity at once: every change of the set publishes new shares.
///
/// ```
/// use tower_lb::topology::ZoneAware;
///
/// let zones = ZoneAware::new("eu-west-1a")
///     .min_cluster_size(3)
///     .client_shares([("eu-west-1a", 0.5), ("eu-west-1b", 0.25), ("eu-west-1c", 0.25)])?;
/// # let _ = zones;
/// # Ok::<_, tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneAware {
    local: Arc<str>,
    min_cluster_size: usize,
    /// The client fleet's share per zone, adding up to 1; `None`: like the
    /// endpoints.
    client_shares: Option<Arc<[ZoneShare]>>,
    /// Spill a local request when the local pick's latency estimate is
    /// this many times a remote one's; `None`: never.
    latency_spill: Option<f64>,
}

/// A zone and its share of the client fleet.
type ZoneShare = (Arc<str>, f64);

/// Shares of a level's traffic are given in units of 1/10,000, as Envoy's.
pub(crate) const WHOLE: u32 = 10_000;

impl ZoneAware {
    /// Routes by zone for a client in `local_zone`, with Envoy's minimum
    /// cluster size (6) and the client fleet spread like the endpoints.
    pub fn new(local_zone: impl Into<Arc<str>>) -> Self {
        Self {
            local: local_zone.into(),
            min_cluster_size: 6,
            client_shares: None,
            latency_spill: Some(1.0),
        }
    }

    /// How many times slower (by latency estimate, beyond the 5 ms margin)
    /// the local zone's pick may be than a pick in another zone before a
    /// request goes there instead (see "Load-aware spill" above). Default
    /// 1: in the shootout's `zones` scenario, after the local zone lost two
    /// thirds, a factor of 1.25 let the local tail grow to 1.1x – 1.45x the
    /// zone-blind one over five seeds, and 2 to 1.9x.
    ///
    /// # Errors
    ///
    /// When `factor` is below 1, NaN or infinite.
    pub fn latency_spill_factor(mut self, factor: f64) -> Result<Self, InvalidSetting> {
        self.latency_spill = Some(setting::finite_at_least(
            "ZoneAware::latency_spill_factor",
            factor,
            1.0,
            "a finite number, 1 or more",
        )?);
        Ok(self)
    }

    /// Routes by Envoy's rule alone: no load-aware spill.
    pub fn no_latency_spill(mut self) -> Self {
        self.latency_spill = None;
        self
    }

    /// The load-aware spill's factor, if on.
    pub(crate) fn latency_spill(&self) -> Option<f64> {
        self.latency_spill
    }

    /// The fewest endpoints a priority level must have to be routed by
    /// zone (default 6): below it, a zone is a handful of endpoints that
    /// one failure swings.
    pub fn min_cluster_size(mut self, endpoints: usize) -> Self {
        self.min_cluster_size = endpoints;
        self
    }

    /// How the client fleet is spread over zones: each zone's share (any
    /// positive numbers; they are scaled to add up to 1). Zones not named
    /// have no clients. Default: like the endpoints.
    ///
    /// # Errors
    ///
    /// When a share is negative, NaN or infinite, or they add up to 0.
    pub fn client_shares<Z: Into<Arc<str>>>(
        mut self,
        shares: impl IntoIterator<Item = (Z, f64)>,
    ) -> Result<Self, InvalidSetting> {
        let mut all = Vec::new();
        for (zone, share) in shares {
            let share = setting::finite_at_least(
                "ZoneAware::client_shares",
                share,
                0.0,
                "finite numbers of 0 or more, not all 0",
            )?;
            all.push((zone.into(), share));
        }
        let total: f64 = all.iter().map(|(_, share)| share).sum();
        let total = setting::check(
            "ZoneAware::client_shares (their sum)",
            total,
            total > 0.0,
            "finite numbers of 0 or more, not all 0",
        )?;
        for (_, share) in &mut all {
            *share /= total;
        }
        self.client_shares = Some(all.into());
        Ok(self)
    }

    /// The client's own zone.
    pub fn local_zone(&self) -> &str {
        &self.local
    }

    /// The client fleet's share in `zone`, when set.
    fn client_share(&self, zone: Option<&str>) -> Option<f64> {
        let shares = self.client_shares.as_ref()?;
        Some(
            shares
                .iter()
                .find(|(z, _)| Some(&**z) == zone)
                .map_or(0.0, |(_, share)| *share),
        )
    }
}

/// One zone of a level: its name (`None` for endpoints discovery gave no
/// zone), its endpoints known, and those in service (that take requests).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ZoneCounts<'a> {
    pub(crate) zone: Option<&'a str>,
    pub(crate) known: usize,
    pub(crate) in_service: usize,
}

/// Each zone's share of the level's requests, in units of 1/[`WHOLE`], or
/// `None` when the level is not routed by zone (see [`ZoneAware`]).
pub(crate) fn zone_shares(settings: &ZoneAware, zones: &[ZoneCounts<'_>]) -> Option<Vec<u32>> {
    let known: usize = zones.iter().map(|z| z.known).sum();
    let in_service: usize = zones.iter().map(|z| z.in_service).sum();
    if zones.len() < 2 || known < settings.min_cluster_size.max(1) || in_service == 0 {
        return None;
    }
    let local = zones
        .iter()
        .position(|z| z.zone == Some(&*settings.local))?;
    let clients: Vec<f64> = zones
        .iter()
        .map(|z| {
            settings
                .client_share(z.zone)
                .unwrap_or(z.known as f64 / known as f64)
        })
        .collect();
    let capacity: Vec<f64> = zones
        .iter()
        .map(|z| z.in_service as f64 / in_service as f64)
        .collect();
    let mut shares = vec![0; zones.len()];
    if capacity[local] >= clients[local] {
        shares[local] = WHOLE;
        return Some(shares);
    }
    let kept = (f64::from(WHOLE) * capacity[local] / clients[local]) as u32;
    shares[local] = kept;
    let left = WHOLE - kept;
    // What each other zone has to spare; with none anywhere, in
    // proportion to capacity.
    let mut spare: Vec<f64> = (0..zones.len())
        .map(|i| match i == local {
            true => 0.0,
            false => (capacity[i] - clients[i]).max(0.0),
        })
        .collect();
    if spare.iter().sum::<f64>() <= 0.0 {
        spare = (0..zones.len())
            .map(|i| if i == local { 0.0 } else { capacity[i] })
            .collect();
    }
    let total: f64 = spare.iter().sum();
    let mut given = 0;
    for (share, spare) in shares.iter_mut().zip(&spare) {
        if *spare > 0.0 {
            *share = (f64::from(left) * spare / total) as u32;
            given += *share;
        }
    }
    // Rounding: the rest to the zone with the most to spare.
    if let Some(most) = (0..zones.len()).max_by(|&a, &b| spare[a].total_cmp(&spare[b])) {
        shares[most] += left - given;
    }
    Some(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &'static str, known: usize, in_service: usize) -> ZoneCounts<'static> {
        ZoneCounts {
            zone: Some(name),
            known,
            in_service,
        }
    }

    fn three_zones(a_in_service: usize) -> Vec<ZoneCounts<'static>> {
        vec![zone("a", 3, a_in_service), zone("b", 3, 3), zone("c", 3, 3)]
    }

    #[test]
    fn a_whole_local_zone_takes_every_request() {
        let shares = zone_shares(&ZoneAware::new("a"), &three_zones(3));
        assert_eq!(shares, Some(vec![WHOLE, 0, 0]));
    }

    #[test]
    fn a_local_zone_short_of_capacity_keeps_what_it_can_and_the_rest_spills_by_spare_capacity() {
        // One of three left in zone a: 1/7 of the capacity for 1/3 of the
        // clients keeps 3/7 of the requests; b and c have 3/7 each for 1/3
        // of the clients, so they share the rest evenly.
        let shares = zone_shares(&ZoneAware::new("a"), &three_zones(1)).unwrap_or_default();
        assert_eq!(shares.iter().sum::<u32>(), WHOLE);
        assert_eq!(shares[0], 4285);
        assert!(shares[1].abs_diff(shares[2]) <= 1, "{shares:?}");
    }

    #[test]
    fn a_local_zone_with_nothing_in_service_sends_everything_elsewhere() {
        let shares = zone_shares(&ZoneAware::new("a"), &three_zones(0)).unwrap_or_default();
        assert_eq!(shares[0], 0);
        assert_eq!(shares.iter().sum::<u32>(), WHOLE);
    }

    #[test]
    fn set_client_shares_decide_what_the_local_zone_must_cover() {
        // Half the clients in zone a, which has a third of the endpoints:
        // it keeps two thirds of its requests.
        let zones = ZoneAware::new("a")
            .client_shares([("a", 2.0), ("b", 1.0), ("c", 1.0)])
            .unwrap_or_else(|e| panic!("{e}"));
        let shares = zone_shares(&zones, &three_zones(3)).unwrap_or_default();
        assert_eq!(shares[0], 6666);
        assert_eq!(shares.iter().sum::<u32>(), WHOLE);
    }

    #[test]
    fn small_single_zone_or_unknown_zone_levels_are_not_routed_by_zone() {
        let zones = ZoneAware::new("a");
        let small = [zone("a", 2, 2), zone("b", 2, 2)];
        assert_eq!(zone_shares(&zones, &small), None, "below the minimum size");
        assert_eq!(zone_shares(&zones, &[zone("a", 9, 9)]), None, "one zone");
        let elsewhere = [zone("b", 6, 6), zone("c", 6, 6)];
        assert_eq!(zone_shares(&zones, &elsewhere), None, "no local endpoint");
    }

    #[test]
    fn bad_client_shares_are_refused_by_name() {
        let negative = ZoneAware::new("a").client_shares([("a", -1.0)]);
        assert!(negative.is_err());
        let nothing = ZoneAware::new("a").client_shares([("a", 0.0), ("b", 0.0)]);
        let error = nothing.err().map(|e| e.setting());
        assert_eq!(error, Some("ZoneAware::client_shares (their sum)"));
        assert!(ZoneAware::new("a")
            .client_shares([("a", f64::NAN)])
            .is_err());
    }

    #[test]
    fn a_latency_spill_factor_below_1_is_refused_by_name() {
        let slow = ZoneAware::new("a").latency_spill_factor(0.5);
        let error = slow.err().map(|e| e.setting());
        assert_eq!(error, Some("ZoneAware::latency_spill_factor"));
    }
}
