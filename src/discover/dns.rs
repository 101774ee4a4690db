//! Endpoints from DNS: A/AAAA records of a name (with a port), or SRV
//! records (ports and weights from the records), re-resolved when the
//! records' TTL runs out.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tower::discover::Change;

use super::Empty;
use crate::setting::{self, InvalidSetting};

/// One endpoint found in DNS: its address, and its SRV weight and priority
/// (1 and 0 for A and AAAA records).
///
/// Two endpoints are the same endpoint when their addresses are: a weight
/// that changes in DNS re-inserts the key, which replaces the service and
/// keeps its health, and the balancer reads the new weight (see
/// [`DnsEndpoint::static_weight`] and
/// [`Builder::static_weights`](crate::balance::Builder::static_weights)).
#[derive(Debug, Clone, Copy)]
pub struct DnsEndpoint {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// The SRV record's weight; 1 for A and AAAA records.
    pub weight: u16,
    /// The SRV record's priority (lower first); 0 for A and AAAA records.
    /// Only [`Dns::every_priority`] finds endpoints of more than one.
    pub priority: u16,
}

/// Active health checks reach the record's address.
impl crate::health::CheckAddress for DnsEndpoint {
    fn check_address(&self) -> SocketAddr {
        self.addr
    }
}

impl DnsEndpoint {
    /// The weight to balance by: the SRV weight, with 0 (which RFC 2782
    /// gives "a very small chance") as 1/100.
    pub fn static_weight(&self) -> f64 {
        match self.weight {
            0 => 0.01,
            w => f64::from(w),
        }
    }

    /// The endpoint's metadata: the SRV priority as its priority level and
    /// its [`static_weight`](Self::static_weight), for
    /// [`Builder::metadata`](crate::balance::Builder::metadata). With
    /// [`Dns::every_priority`], the balancer then fails over from one SRV
    /// priority to the next as their endpoints fail, as RFC 2782 asks of a
    /// client (see [`crate::topology`]).
    pub fn metadata(&self) -> crate::topology::EndpointMetadata {
        crate::topology::EndpointMetadata::new()
            .with_priority(u32::from(self.priority))
            .with_unchecked_weight(self.static_weight())
    }
}

/// What DNS says of one address: its SRV weight and priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    weight: u16,
    priority: u16,
}

impl Found {
    /// An A or AAAA record's.
    const ADDRESS: Found = Found {
        weight: 1,
        priority: 0,
    };
}

impl PartialEq for DnsEndpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

impl Eq for DnsEndpoint {}

impl Hash for DnsEndpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
    }
}

/// What a name resolves to.
#[derive(Debug, Clone)]
enum Target {
    /// A and AAAA records, at this port.
    Host { port: u16 },
    /// SRV records: ports and weights from the records, addresses from
    /// their targets' A and AAAA records.
    Srv,
}

/// Why DNS discovery could not start ([`Dns::build`]), or why it found no
/// endpoints (the reason of the [`Empty`] answer its stream yields).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The system's resolver configuration could not be read.
    #[error("could not read the system's DNS configuration")]
    SystemConfig(#[source] ResolveError),
    /// The settings make no sense.
    #[error("invalid DNS discovery settings: {0}")]
    Settings(String),
    /// The DNS server says the name does not exist (NXDOMAIN).
    #[error("DNS name {name} does not exist (NXDOMAIN)")]
    NxDomain {
        /// The name resolved.
        name: String,
    },
    /// The name exists but has no records of the type asked (a NOERROR
    /// answer with no answers).
    #[error("DNS name {name} has no {records} records")]
    NoRecords {
        /// The name resolved.
        name: String,
        /// The record types asked.
        records: DnsRecords,
    },
    /// The name has SRV records, but none of their targets has an A or
    /// AAAA record.
    #[error("no SRV target of DNS name {name} has an A or AAAA record")]
    NoTargetAddresses {
        /// The name resolved.
        name: String,
    },
}

/// The record types a DNS discovery asks for a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DnsRecords {
    /// A and AAAA ([`Dns::host`]).
    Address,
    /// SRV ([`Dns::srv`]).
    Srv,
}

impl fmt::Display for DnsRecords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DnsRecords::Address => "A or AAAA",
            DnsRecords::Srv => "SRV",
        })
    }
}

/// DNS discovery settings; [`build`](Dns::build) starts it.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_lb::discover::Dns;
/// # use tower::service_fn;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_lb::BoxError> {
/// let (refresh, discover) = Dns::host("api.internal.example", 8080)
///     .ttl_bounds(Duration::from_secs(5), Duration::from_secs(60))?
///     .build(|addr| service_fn(move |_: ()| async move { Ok::<_, std::convert::Infallible>(addr) }))?;
/// // Something changed? Look again now rather than at the TTL.
/// refresh.resolve_now();
/// # let _ = discover;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Dns {
    name: String,
    target: Target,
    name_servers: Option<Vec<SocketAddr>>,
    resolver: Option<TokioResolver>,
    min_ttl: Duration,
    max_ttl: Duration,
    jitter: f64,
    timeout: Duration,
    apply_empty: bool,
    every_priority: bool,
}

/// The longest pause between two resolutions, whatever the settings.
const MAX_TTL: Duration = Duration::from_secs(86_400);

/// The shortest pause between two resolutions, whatever the settings.
const MIN_PAUSE: Duration = Duration::from_millis(100);

/// The shortest and longest pause after a failure.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Dns {
    fn new(name: String, target: Target) -> Self {
        Self {
            name,
            target,
            name_servers: None,
            resolver: None,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            jitter: 0.1,
            timeout: Duration::from_secs(5),
            apply_empty: false,
            every_priority: false,
        }
    }

    /// For SRV: every record's endpoints, each with its priority (see
    /// [`DnsEndpoint::priority`]), rather than only those of the lowest
    /// priority that has addresses. Give the balancer the priorities with
    /// [`Builder::metadata`](crate::balance::Builder::metadata)`(DnsEndpoint::metadata)`
    /// and it keeps the traffic on the lowest priority while enough of its
    /// endpoints are in service, and moves it to the next as they fail
    /// (ejected, or failing an active check), where without it the next
    /// priority is used only once DNS has no address for the lowest.
    ///
    /// ```
    /// use tower_lb::discover::{Dns, DnsEndpoint};
    /// use tower_lb::Balancer;
    ///
    /// let dns = Dns::srv("_http._tcp.api.internal.").every_priority();
    /// let builder = Balancer::builder().metadata(DnsEndpoint::metadata);
    /// # let _ = (dns, builder);
    /// ```
    pub fn every_priority(mut self) -> Self {
        self.every_priority = true;
        self
    }

    /// The A and AAAA records of `name`, each at `port`.
    pub fn host(name: impl Into<String>, port: u16) -> Self {
        Self::new(name.into(), Target::Host { port })
    }

    /// The SRV records of `name` (like `_http._tcp.api.internal.`): each
    /// record's target's addresses, at the record's port, with its weight.
    /// Only the records of the lowest priority are used, as RFC 2782 says;
    /// the others are fallbacks.
    pub fn srv(name: impl Into<String>) -> Self {
        Self::new(name.into(), Target::Srv)
    }

    /// The name and port as a URI authority (`api.internal:8080`), for an
    /// A/AAAA lookup: what requests to its addresses should say they are
    /// for. `None` for SRV, whose targets differ from record to record.
    #[cfg(feature = "grpc")]
    pub(crate) fn authority(&self) -> Option<http::uri::Authority> {
        match self.target {
            Target::Host { port } => {
                let host = self.name.trim_end_matches('.');
                http::uri::Authority::try_from(format!("{host}:{port}")).ok()
            }
            Target::Srv => None,
        }
    }

    /// Asks these name servers (over UDP, and TCP for long answers) instead
    /// of the system's configuration.
    pub fn name_servers(mut self, servers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.name_servers = Some(servers.into_iter().collect());
        self
    }

    /// Uses this resolver, configured as you like (its cache included:
    /// the ones this module builds cache nothing, since it only asks when
    /// the answer has expired or it is told to).
    pub fn resolver(mut self, resolver: TokioResolver) -> Self {
        self.resolver = Some(resolver);
        self
    }

    /// Re-resolves when the records' TTL runs out, but never sooner than
    /// `min` nor later than `max`. Defaults: 1 s and 5 min. Whatever `min`,
    /// two resolutions are at least 100 ms apart.
    ///
    /// # Errors
    ///
    /// When `max` is below `min`, or either is above a day.
    pub fn ttl_bounds(mut self, min: Duration, max: Duration) -> Result<Self, InvalidSetting> {
        (self.min_ttl, self.max_ttl) = setting::check(
            "Dns::ttl_bounds",
            (min, max),
            min <= max && max <= MAX_TTL,
            "a minimum and a maximum, in that order, each at most a day",
        )?;
        Ok(self)
    }

    /// Re-resolves up to this fraction of the TTL early, at random, so that
    /// a fleet of clients started together does not ask in lockstep.
    /// Default 0.1; 0 turns it off.
    ///
    /// # Errors
    ///
    /// When `fraction` is not within 0 to 0.5 (NaN included).
    pub fn jitter(mut self, fraction: f64) -> Result<Self, InvalidSetting> {
        self.jitter = setting::within("Dns::jitter", fraction, 0.0, 0.5, "a fraction, 0 to 0.5")?;
        Ok(self)
    }

    /// How long one resolution may take before it counts as failed.
    /// Default 5 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether an empty answer (NXDOMAIN, or no records) after a non-empty
    /// one removes every endpoint. Default false: an empty answer is more
    /// often a DNS outage or a bad deploy of the zone than a service with no
    /// instances, so the last set stays (with a `warn` event). When true,
    /// the endpoints go, and requests fail at once with the answer (see
    /// [`Empty`]).
    ///
    /// Whatever this says, an empty answer while there are no endpoints
    /// (at startup) is a `warn` event, and requests fail at once with it
    /// rather than wait the [startup wait](crate::balance::Builder::startup_wait).
    pub fn apply_empty_answers(mut self, apply: bool) -> Self {
        self.apply_empty = apply;
        self
    }

    /// Starts resolving (on a task spawned on the current tokio runtime):
    /// returns a handle to ask for a resolution now, and the discovery
    /// stream for [`Balancer::builder().build`](crate::balance::Builder::build), whose
    /// services `make` builds from each address. Handle first, stream
    /// second, as [`discover::channel`](crate::discover::channel) and
    /// tokio's channels return them.
    ///
    /// # Errors
    ///
    /// When neither name servers nor a resolver were given and the system's
    /// DNS configuration cannot be read.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn build<S, F>(self, make: F) -> Result<(ResolveNow, DnsDiscover<S>), DnsError>
    where
        F: Fn(SocketAddr) -> S + Send + Sync + 'static,
        S: Send + 'static,
    {
        if self.name.trim().is_empty() {
            return Err(DnsError::Settings("the name to resolve is empty".into()));
        }
        if self.timeout.is_zero() {
            return Err(DnsError::Settings(
                "a resolution timeout of zero fails every resolution".into(),
            ));
        }
        let resolver = match (self.resolver.clone(), &self.name_servers) {
            (Some(resolver), _) => resolver,
            (None, Some(servers)) => {
                let mut group = NameServerConfigGroup::new();
                for server in servers {
                    group.merge(NameServerConfigGroup::from_ips_clear(
                        &[server.ip()],
                        server.port(),
                        true,
                    ));
                }
                let config = ResolverConfig::from_parts(None, vec![], group);
                TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
                    .with_options(self.options())
                    .build()
            }
            (None, None) => TokioResolver::builder_tokio()
                .map_err(DnsError::SystemConfig)?
                .with_options(self.options())
                .build(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Arc::new(Notify::new());
        let task = Resolution {
            settings: self,
            resolver,
            make,
            tx,
            now: now.clone(),
            current: HashMap::new(),
            srv_targets: HashMap::new(),
        };
        tokio::spawn(task.run());
        Ok((ResolveNow::new(now), DnsDiscover { rx }))
    }

    fn options(&self) -> ResolverOpts {
        let mut options = ResolverOpts::default();
        // This module asks only when the answer expired or it was told to;
        // a cache would answer `resolve_now` with the stale set.
        options.cache_size = 0;
        options.timeout = self.timeout;
        options
    }
}

/// Asks a [`Dns`] discovery to resolve now rather than when the TTL runs
/// out (a deploy just finished, a connection was refused). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResolveNow {
    now: Arc<Notify>,
    /// When a failed connection last asked for a resolution (read by the
    /// ready-made clients, feature `http`).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    failures: Arc<FailureGate>,
}

/// Lets failed connections ask for a resolution at most once per
/// [`RESOLVE_AFTER_FAILURE_EVERY`].
#[derive(Debug)]
#[cfg_attr(not(feature = "http"), allow(dead_code))]
struct FailureGate {
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch` of the last ask, plus one (0: never).
    last_ms: AtomicU64,
}

/// How often failed connections may ask for a resolution: a dead address
/// fails every connection attempt to it, and a fleet of clients must not
/// turn that into a DNS storm.
const RESOLVE_AFTER_FAILURE_EVERY: Duration = Duration::from_secs(1);

impl ResolveNow {
    fn new(now: Arc<Notify>) -> Self {
        Self {
            now,
            failures: Arc::new(FailureGate {
                epoch: tokio::time::Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
        }
    }

    /// Resolves as soon as the current resolution (if any) is over.
    pub fn resolve_now(&self) {
        self.now.notify_one();
    }

    /// A connection to one of the name's addresses could not be made: the
    /// address may be gone for good (a pod rescheduled, a host replaced),
    /// and the records may already name its successor. Resolves now, at
    /// most once per [`RESOLVE_AFTER_FAILURE_EVERY`].
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn connection_failed(&self) {
        let gate = &*self.failures;
        let now_ms = u64::try_from(gate.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = gate.last_ms.load(Ordering::Relaxed);
        let every = RESOLVE_AFTER_FAILURE_EVERY.as_millis() as u64;
        if last != 0 && now_ms.saturating_sub(last) < every {
            return;
        }
        // One of several failures at once asks.
        if gate
            .last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::debug!("a connection to the name's address failed: resolving it again now");
            self.resolve_now();
        }
    }
}

/// The discovery stream of [`Dns::build`]: only changes (an endpoint added,
/// removed, or its weight changed), so unchanged endpoints keep their
/// connections and health. Never fails: resolution errors keep the last set.
/// Its one error is an answer: an [`Empty`] (whose reason is a
/// [`DnsError`]) when the name resolved to nothing and there are no
/// endpoints (or, with [`Dns::apply_empty_answers`], no longer are).
pub struct DnsDiscover<S> {
    rx: mpsc::UnboundedReceiver<Result<Change<DnsEndpoint, S>, Empty>>,
}

impl<S> fmt::Debug for DnsDiscover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsDiscover").finish_non_exhaustive()
    }
}

impl<S> Stream for DnsDiscover<S> {
    type Item = Result<Change<DnsEndpoint, S>, Empty>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// What one resolution found: addresses with weights, and how long the
/// answer is good for.
struct Answer {
    endpoints: BTreeMap<SocketAddr, Found>,
    ttl: Duration,
}

/// The resolution task.
struct Resolution<S, F> {
    settings: Dns,
    resolver: TokioResolver,
    make: F,
    tx: mpsc::UnboundedSender<Result<Change<DnsEndpoint, S>, Empty>>,
    now: Arc<Notify>,
    /// The set the stream has announced: address to weight.
    current: HashMap<SocketAddr, Found>,
    /// Each SRV target's addresses at its last successful lookup.
    srv_targets: HashMap<String, Vec<IpAddr>>,
}

impl<S, F> Resolution<S, F>
where
    F: Fn(SocketAddr) -> S,
{
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let timeout = self.settings.timeout;
            let resolved = tokio::time::timeout(timeout, self.resolve()).await;
            let name = &self.settings.name;
            let pause = match resolved {
                Ok(Ok(answer)) if !answer.endpoints.is_empty() => {
                    backoff = BACKOFF_MIN;
                    let ttl = answer.ttl;
                    if !self.apply(answer.endpoints) {
                        return;
                    }
                    self.next_refresh(ttl)
                }
                Ok(Ok(_)) => {
                    // Only SRV answers with records and no address.
                    if !self.resolved_to_nothing(NoAnswer::NoTargetAddresses, backoff) {
                        return;
                    }
                    next_backoff(&mut backoff)
                }
                Ok(Err(Failure::NoRecords(answer))) => {
                    if !self.resolved_to_nothing(answer, backoff) {
                        return;
                    }
                    next_backoff(&mut backoff)
                }
                Ok(Err(Failure::Error(error))) => {
                    // Not an answer: requests keep waiting for one, and a
                    // name that had records keeps them.
                    tracing::warn!(%name, %error, endpoints = self.current.len(), retry_in = ?backoff,
                        "DNS resolution failed; keeping the last known endpoints");
                    next_backoff(&mut backoff)
                }
                Err(_) => {
                    tracing::warn!(%name, timeout = ?self.settings.timeout, endpoints = self.current.len(), retry_in = ?backoff,
                        "DNS resolution timed out; keeping the last known endpoints");
                    next_backoff(&mut backoff)
                }
            };
            let woken_early = tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = self.now.notified() => true,
                // The balancer is gone: nobody listens any more.
                _ = self.tx.closed() => return,
            };
            if woken_early {
                // `resolve_now` in a loop must not become a query storm.
                tokio::select! {
                    _ = tokio::time::sleep_until(started + MIN_PAUSE) => {}
                    _ = self.tx.closed() => return,
                }
            }
        }
    }

    /// When to ask again: the TTL within bounds, up to `jitter` of it early,
    /// and never sooner than `MIN_PAUSE` (TTL 0 with a minimum of 0 must not
    /// turn into a resolution loop).
    fn next_refresh(&self, ttl: Duration) -> Duration {
        let ttl = ttl.clamp(self.settings.min_ttl, self.settings.max_ttl);
        let early = rand::rng().random_range(0.0..=self.settings.jitter);
        // Jittered after the clamp, so that a fleet asking about a TTL-0
        // name (Consul's default) does not ask at the same instant either.
        Duration::try_from_secs_f64(ttl.as_secs_f64() * (1.0 - early))
            .unwrap_or(MAX_TTL)
            .max(MIN_PAUSE)
    }

    /// The name resolved to nothing (`answer`): a `warn` event, and, unless
    /// a set is kept, no endpoints and the [`Empty`] answer that fails
    /// requests at once. False once nobody listens.
    fn resolved_to_nothing(&mut self, answer: NoAnswer, retry_in: Duration) -> bool {
        let name = &self.settings.name;
        let endpoints = self.current.len();
        if endpoints > 0 && !self.settings.apply_empty {
            tracing::warn!(%name, %answer, endpoints, ?retry_in,
                "DNS name resolved to nothing; keeping the last known endpoints");
            return true;
        }
        if endpoints > 0 {
            tracing::warn!(%name, %answer, endpoints, ?retry_in,
                "DNS name resolved to nothing; removing every endpoint, as configured");
        } else {
            tracing::warn!(%name, %answer, ?retry_in,
                "DNS name resolved to nothing; no endpoints");
        }
        let reason = answer.error(&self.settings);
        self.apply(BTreeMap::new()) && self.tx.send(Err(Empty::new(reason))).is_ok()
    }

    /// Announces the difference between the current set and `found`; false
    /// once nobody listens.
    ///
    /// Inserts first, then removes: a balancer that saw the removal of a
    /// name's only address before the insertion of its new one would have no
    /// endpoint for a moment, and fail requests at once (see
    /// [`Empty`](super::Empty)).
    fn apply(&mut self, found: BTreeMap<SocketAddr, Found>) -> bool {
        let removed: Vec<SocketAddr> = self
            .current
            .keys()
            .filter(|addr| !found.contains_key(addr))
            .copied()
            .collect();
        let mut inserted = 0;
        for (addr, record) in found {
            if self.current.get(&addr) == Some(&record) {
                continue;
            }
            self.current.insert(addr, record);
            inserted += 1;
            let service = (self.make)(addr);
            let key = DnsEndpoint {
                addr,
                weight: record.weight,
                priority: record.priority,
            };
            if self.tx.send(Ok(Change::Insert(key, service))).is_err() {
                return false;
            }
        }
        for addr in removed {
            self.current.remove(&addr);
            let key = DnsEndpoint {
                addr,
                weight: 0,
                priority: 0,
            };
            if self.tx.send(Ok(Change::Remove(key))).is_err() {
                return false;
            }
        }
        if inserted > 0 {
            tracing::debug!(name = %self.settings.name, inserted, endpoints = self.current.len(), "DNS answer changed");
        }
        true
    }

    async fn resolve(&mut self) -> Result<Answer, Failure> {
        match self.settings.target {
            Target::Host { port } => {
                let (ips, ttl) = self.lookup_ips(&self.settings.name).await?;
                let endpoints = ips
                    .into_iter()
                    .map(|ip| (SocketAddr::new(ip, port), Found::ADDRESS))
                    .collect();
                Ok(Answer { endpoints, ttl })
            }
            Target::Srv => self.resolve_srv().await,
        }
    }

    /// The A and AAAA records of `name`, asked separately: hickory's
    /// combined lookup answers with the AAAA result when the A query fails,
    /// which would turn a SERVFAIL into "no records".
    async fn lookup_ips(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), Failure> {
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name),
            self.resolver.ipv6_lookup(name)
        );
        let now = std::time::Instant::now();
        let mut ips = Vec::new();
        let mut ttl: Option<Duration> = None;
        // NXDOMAIN from either query: the name does not exist.
        let mut nothing = NoAnswer::NoData(DnsRecords::Address);
        match v4.map_err(Failure::from) {
            Ok(found) => {
                ttl = shorter(ttl, found.valid_until(), now);
                ips.extend(found.iter().map(|a| IpAddr::V4(a.0)));
            }
            Err(Failure::NoRecords(NoAnswer::NxDomain)) => nothing = NoAnswer::NxDomain,
            Err(Failure::NoRecords(_)) => {}
            Err(error) => return Err(error),
        }
        match v6.map_err(Failure::from) {
            Ok(found) => {
                ttl = shorter(ttl, found.valid_until(), now);
                ips.extend(found.iter().map(|aaaa| IpAddr::V6(aaaa.0)));
            }
            Err(Failure::NoRecords(NoAnswer::NxDomain)) => nothing = NoAnswer::NxDomain,
            Err(Failure::NoRecords(_)) => {}
            Err(error) => return Err(error),
        }
        match ttl {
            Some(ttl) if !ips.is_empty() => Ok((ips, ttl)),
            _ => Err(Failure::NoRecords(nothing)),
        }
    }

    /// The SRV records' targets, by priority: the lowest priority whose
    /// targets have addresses (the others are fallbacks, RFC 2782). A target
    /// whose lookup fails keeps the addresses it had, so one broken name
    /// does not freeze the whole set.
    async fn resolve_srv(&mut self) -> Result<Answer, Failure> {
        let found = self
            .resolver
            .srv_lookup(self.settings.name.as_str())
            .await
            .map_err(|error| match Failure::from(error) {
                Failure::NoRecords(NoAnswer::NoData(_)) => {
                    Failure::NoRecords(NoAnswer::NoData(DnsRecords::Srv))
                }
                other => other,
            })?;
        let mut ttl = found
            .as_lookup()
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        let mut records: Vec<_> = found.iter().cloned().collect();
        records.sort_by_key(|r| r.priority());
        let mut endpoints = BTreeMap::new();
        // A target that did not resolve may have addresses: with none found
        // at all, the resolution failed rather than answered "nothing".
        let mut target_error = None;
        let mut priorities: Vec<u16> = records.iter().map(|r| r.priority()).collect();
        priorities.dedup();
        for priority in priorities {
            for record in records.iter().filter(|r| r.priority() == priority) {
                let target = record.target().to_utf8();
                let ips = match self.lookup_ips(&target).await {
                    Ok((ips, target_ttl)) => {
                        ttl = ttl.min(target_ttl);
                        self.srv_targets.insert(target, ips.clone());
                        ips
                    }
                    Err(Failure::NoRecords(answer)) => {
                        tracing::debug!(%target, %answer, "SRV target has no addresses");
                        self.srv_targets.remove(&target);
                        Vec::new()
                    }
                    Err(Failure::Error(error)) => {
                        tracing::warn!(%target, %error, "SRV target did not resolve; keeping its last addresses");
                        ttl = ttl.min(BACKOFF_MIN);
                        let last = self.srv_targets.get(&target).cloned();
                        target_error.get_or_insert(error);
                        last.unwrap_or_default()
                    }
                };
                let found = Found {
                    weight: record.weight(),
                    priority,
                };
                for ip in ips {
                    // An address also under a lower priority keeps that one.
                    let addr = SocketAddr::new(ip, record.port());
                    match endpoints.get(&addr) {
                        Some(Found {
                            priority: lower, ..
                        }) if *lower < priority => {}
                        _ => {
                            endpoints.insert(addr, found);
                        }
                    }
                }
            }
            if !endpoints.is_empty() && !self.settings.every_priority {
                break;
            }
        }
        match target_error {
            Some(error) if endpoints.is_empty() => Err(Failure::Error(error)),
            _ => Ok(Answer { endpoints, ttl }),
        }
    }
}

/// The shorter of `ttl` and what is left of `valid_until`.
fn shorter(
    ttl: Option<Duration>,
    valid_until: std::time::Instant,
    now: std::time::Instant,
) -> Option<Duration> {
    let left = valid_until.saturating_duration_since(now);
    Some(ttl.map_or(left, |t| t.min(left)))
}

fn next_backoff(backoff: &mut Duration) -> Duration {
    let now = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    now
}

/// A resolution that found nothing.
enum Failure {
    /// NXDOMAIN, or the name has no records of the type asked.
    NoRecords(NoAnswer),
    /// The resolver failed (no answer, SERVFAIL, a network error).
    Error(ResolveError),
}

/// How DNS said a name has nothing: the `answer` of the `warn` event.
#[derive(Debug, Clone, Copy)]
enum NoAnswer {
    /// NXDOMAIN.
    NxDomain,
    /// NOERROR with no answers, for these record types.
    NoData(DnsRecords),
    /// SRV records whose targets have no addresses.
    NoTargetAddresses,
}

impl NoAnswer {
    /// The reason requests fail with.
    fn error(self, settings: &Dns) -> DnsError {
        let name = settings.name.clone();
        match self {
            NoAnswer::NxDomain => DnsError::NxDomain { name },
            NoAnswer::NoData(records) => DnsError::NoRecords { name, records },
            NoAnswer::NoTargetAddresses => DnsError::NoTargetAddresses { name },
        }
    }
}

impl fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoAnswer::NxDomain => f.write_str("NXDOMAIN"),
            NoAnswer::NoData(records) => write!(f, "no {records} records"),
            NoAnswer::NoTargetAddresses => f.write_str("no SRV target has an address"),
        }
    }
}

impl From<ResolveError> for Failure {
    /// hickory reports a SERVFAIL or REFUSED answer as "no records found"
    /// too; only NXDOMAIN and an empty NOERROR answer really mean the name
    /// has none.
    fn from(error: ResolveError) -> Self {
        let kind = error.proto().map(|e| e.kind());
        match kind {
            Some(ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain,
                ..
            }) => Failure::NoRecords(NoAnswer::NxDomain),
            // The address queries' answer; the SRV query says "SRV".
            Some(ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NoError,
                ..
            }) => Failure::NoRecords(NoAnswer::NoData(DnsRecords::Address)),
            _ => Failure::Error(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `notify` holds a wake-up, taking it.
    async fn woken(notify: &Notify) -> bool {
        tokio::time::timeout(Duration::ZERO, notify.notified())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connections_ask_for_a_resolution_at_most_once_a_second() {
        let notify = Arc::new(Notify::new());
        let resolve = ResolveNow::new(notify.clone());
        resolve.connection_failed();
        assert!(woken(&notify).await, "the first failure asks");
        for _ in 0..50 {
            resolve.clone().connection_failed();
        }
        assert!(
            !woken(&notify).await,
            "failures within the second ask again"
        );
        tokio::time::advance(RESOLVE_AFTER_FAILURE_EVERY).await;
        resolve.connection_failed();
        assert!(woken(&notify).await, "a failure a second later asks again");
    }

    #[test]
    fn a_jitter_outside_0_to_half_is_refused_by_name() {
        for bad in [0.6, -0.1, f64::NAN] {
            let error = Dns::host("a.test", 80).jitter(bad).unwrap_err();
            assert_eq!(error.setting(), "Dns::jitter");
        }
    }

    #[test]
    fn ttl_bounds_upside_down_or_above_a_day_are_refused_by_name() {
        let (second, minute) = (Duration::from_secs(1), Duration::from_secs(60));
        for (min, max) in [(minute, second), (second, MAX_TTL + second)] {
            let error = Dns::host("a.test", 80).ttl_bounds(min, max).unwrap_err();
            assert_eq!(error.setting(), "Dns::ttl_bounds");
        }
    }

    #[test]
    fn srv_weight_zero_is_a_small_weight_not_none() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 80));
        assert_eq!(
            DnsEndpoint {
                addr,
                weight: 0,
                priority: 0
            }
            .static_weight(),
            0.01
        );
        assert_eq!(
            DnsEndpoint {
                addr,
                weight: 7,
                priority: 0
            }
            .static_weight(),
            7.0
        );
    }

    #[test]
    fn endpoints_are_the_same_endpoint_by_address() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 80));
        assert_eq!(
            DnsEndpoint {
                addr,
                weight: 1,
                priority: 0
            },
            DnsEndpoint {
                addr,
                weight: 9,
                priority: 3
            }
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = BACKOFF_MIN;
        let pauses: Vec<Duration> = (0..7).map(|_| next_backoff(&mut backoff)).collect();
        assert_eq!(pauses[0], Duration::from_secs(1));
        assert_eq!(pauses[1], Duration::from_secs(2));
        assert_eq!(pauses[6], BACKOFF_MAX);
    }
}
