//! Endpoints of a Kubernetes Service, from its EndpointSlices.
//!
//! kube-runtime's watcher does the protocol: it lists the slices, watches
//! from the list's resource version, follows bookmarks, resumes a dropped
//! watch where it stopped, and lists again when the API server answers
//! `410 Gone` (the version is too old). This module turns what it reports
//! into changes of endpoints: it keeps every slice of the Service, merges
//! them (an address can be in two slices for a moment), and announces only
//! what changed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::poll_fn;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use kube::runtime::watcher;
use kube::Api;
use tokio::sync::mpsc;
use tower::discover::Change;

use super::Empty;
use crate::retry::Backoff;
use crate::topology::{EndpointMetadata, Readiness};

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Watches the EndpointSlices of one Kubernetes Service and turns their
/// endpoints into a discovery stream ([`build`](Self::build)).
///
/// Each endpoint's key is a [`KubernetesEndpoint`]: its address, what the
/// slice says of its readiness, its zone and zone hints, node and pod.
/// Give the balancer its [`metadata`](KubernetesEndpoint::metadata) and it
/// routes by them:
///
/// | the slice says | the balancer |
/// |---|---|
/// | `ready` (or no conditions) | in service |
/// | `serving` and `terminating` | a last resort: picked only while no endpoint of its priority level is ready; requests under way finish |
/// | not `serving` (not ready, or terminating and no longer serving) | out of service, shown in `endpoints()`; requests under way finish |
/// | gone from every slice | removed; requests under way finish |
/// | `zone`, `hints.forZones` | the zone [`ZoneAware`](crate::topology::ZoneAware) routes by: a zone the endpoint is hinted for (the [client's](Self::client_zone) if among them), while some endpoint is ready and every ready one has a hint (kube-proxy's rule), else its own |
///
/// A change of readiness or zone inserts the key again: the balancer
/// replaces the endpoint's service, and the old one's requests under way
/// finish on it (a pod that starts terminating drains). Hints that start
/// or stop counting (the controller turns them on, one ready endpoint
/// loses its own) change every endpoint's zone, so every key is inserted
/// again. A dual-stack Service's slices of one family are used (IPv4,
/// unless [`prefer_ipv6`](Self::prefer_ipv6)).
///
/// While the watch is down (the API server restarts, the network fails,
/// it answers `410 Gone` and the slices are listed again), the last set
/// stands: a list replaces it only once complete, and errors are retried
/// after a back-off (800 ms, doubling up to 30 s, as kube-runtime's
/// default). A Service with no endpoints at all is an answer: requests fail
/// at once with [`KubernetesError::NoEndpoints`] (see [`Empty`]).
///
/// ```no_run
/// # #[cfg(feature = "http")]
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use bytes::Bytes;
/// use http_body_util::Empty;
/// use tower_lb::client::HttpClient;
/// use tower_lb::discover::{EndpointSlices, KubernetesEndpoint};
/// use tower_lb::topology::ZoneAware;
///
/// // In a pod: the service account's credentials and the API server.
/// let kube = kube::Client::try_default().await?;
/// let discover = EndpointSlices::new(kube, "shop", "checkout")
///     .port("http")
///     .build(|addr| addr)?;
/// let client: HttpClient<Empty<Bytes>, KubernetesEndpoint> = HttpClient::builder()
///     .balancer(|b| {
///         b.metadata(KubernetesEndpoint::metadata)
///             .zone_aware(ZoneAware::new("eu-west-1a"))
///     })
///     .build_discover(discover);
/// # let _ = client;
/// # Ok(())
/// # }
/// ```
///
/// The client needs RBAC to `list` and `watch` `endpointslices` (group
/// `discovery.k8s.io`) in the namespace.
#[derive(Clone)]
pub struct EndpointSlices {
    client: kube::Client,
    namespace: String,
    service: String,
    reading: Reading,
    backoff: Backoff,
}

impl fmt::Debug for EndpointSlices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointSlices")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .field("port", &self.reading.port)
            .field("client_zone", &self.reading.client_zone)
            .field("prefer_ipv6", &self.reading.prefer_ipv6)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// The back-off between failed list or watch requests: kube-runtime's
/// default numbers (800 ms, doubling up to 30 s), with ±20 % jitter.
fn default_backoff() -> Backoff {
    Backoff::new()
        .initial(Duration::from_millis(800))
        .max(Duration::from_secs(30))
}

impl EndpointSlices {
    /// The slices of Service `service` in `namespace`, read with `client`.
    pub fn new(
        client: kube::Client,
        namespace: impl Into<String>,
        service: impl Into<String>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            service: service.into(),
            reading: Reading::default(),
            backoff: default_backoff(),
        }
    }

    /// The Service port to send to, by its name. Default: the slices' only
    /// TCP port; a Service with several must name one (a slice whose ports
    /// do not settle it is left out, with a `warn` event).
    pub fn port(mut self, name: impl Into<String>) -> Self {
        self.reading.port = Some(name.into());
        self
    }

    /// The zone this client runs in, for zone hints: an endpoint hinted for
    /// several zones, this one among them, routes as in this zone (see
    /// [`KubernetesEndpoint::routing_zone`]). Give the same zone as to
    /// [`ZoneAware`](crate::topology::ZoneAware).
    pub fn client_zone(mut self, zone: impl Into<Arc<str>>) -> Self {
        self.reading.client_zone = Some(zone.into());
        self
    }

    /// Of a dual-stack Service's two families of slices (each pod is in
    /// one of each), use the IPv6 ones. Default: IPv4, or IPv6 when the
    /// Service has no IPv4 slice.
    pub fn prefer_ipv6(mut self) -> Self {
        self.reading.prefer_ipv6 = true;
        self
    }

    /// The back-off between failed list or watch requests (default: 800 ms,
    /// doubling up to 30 s, ±20 % jitter).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Starts watching (on a task spawned on the current tokio runtime) and
    /// returns the discovery stream, whose services `make` builds from each
    /// endpoint's address. The task stops when the stream is dropped.
    ///
    /// # Errors
    ///
    /// When the namespace or the Service name is not a valid Kubernetes
    /// name.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn build<S, F>(self, make: F) -> Result<KubernetesDiscover<S>, KubernetesError>
    where
        F: Fn(SocketAddr) -> S + Send + 'static,
        S: Send + 'static,
    {
        check_name("namespace", &self.namespace)?;
        check_name("Service name", &self.service)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let task = SliceWatch {
            set: SliceSet::new(self.reading.clone()),
            settings: self,
            make,
            tx,
            current: HashMap::new(),
            announced_empty: false,
        };
        tokio::spawn(task.run());
        Ok(KubernetesDiscover { rx })
    }
}

/// A namespace or Service name must be a DNS label (RFC 1123; Services
/// are stricter still): anything else could not name one, and would be
/// spliced into the label selector.
fn check_name(what: &'static str, name: &str) -> Result<(), KubernetesError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(KubernetesError::Settings(format!(
            "the {what} {name:?} is not a valid Kubernetes name (lowercase letters, digits and '-', 1 to 63 characters, a letter or digit at each end)"
        )))
    }
}

/// Why Kubernetes discovery could not start ([`EndpointSlices::build`]), or
/// why it found no endpoints (the reason of the [`Empty`] answer its stream
/// yields).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KubernetesError {
    /// The settings make no sense.
    #[error("invalid Kubernetes discovery settings: {0}")]
    Settings(String),
    /// The Service has no endpoints: no EndpointSlice, or slices with none
    /// (scaled to zero, or no pod matches its selector), or none that could
    /// be read (the port, or FQDN addresses: a `warn` event said why).
    #[error(
        "Kubernetes Service {namespace}/{service} has no endpoints{}",
        left_out(*slices_left_out)
    )]
    NoEndpoints {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        service: String,
        /// How many of its slices were left out.
        slices_left_out: usize,
    },
}

fn left_out(slices: usize) -> String {
    match slices {
        0 => String::new(),
        1 => " it can use (1 EndpointSlice left out: see the warning)".into(),
        n => format!(" it can use ({n} EndpointSlices left out: see the warnings)"),
    }
}

/// One endpoint of a Kubernetes Service: its address (the slice's first
/// address for it, at the chosen port), and what the slice says of it.
///
/// Two endpoints are the same endpoint when their addresses are; a change
/// of what the slice says inserts the key again, and the balancer reads
/// the new [`metadata`](Self::metadata).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KubernetesEndpoint {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// What its conditions say.
    pub readiness: Readiness,
    /// The zone it runs in (`zone`).
    pub zone: Option<Arc<str>>,
    /// The zones the EndpointSlice controller hints it for
    /// (`hints.forZones`), when some endpoint of the Service is ready and
    /// every ready one has a hint; else none, as kube-proxy ignores partial
    /// hints, and hints when it falls back to terminating endpoints.
    pub zone_hints: Option<Arc<[Arc<str>]>>,
    /// The zone to route by: the [client's zone](EndpointSlices::client_zone)
    /// when the endpoint is hinted for it, else the first zone it is hinted
    /// for, else its own.
    pub routing_zone: Option<Arc<str>>,
    /// The node it runs on (`nodeName`).
    pub node_name: Option<Arc<str>>,
    /// The pod it is (`targetRef`, when a Pod).
    pub pod: Option<Arc<str>>,
}

impl KubernetesEndpoint {
    /// Its metadata, for
    /// [`Builder::metadata`](crate::balance::Builder::metadata): its
    /// [`routing_zone`](Self::routing_zone) as the zone, its readiness, and
    /// the labels `zone` (its own zone), `node` and `pod` where known.
    pub fn metadata(&self) -> EndpointMetadata {
        let mut metadata = EndpointMetadata::new().with_readiness(self.readiness);
        if let Some(zone) = &self.routing_zone {
            metadata = metadata.with_zone(zone.clone());
        }
        for (name, value) in [
            ("zone", &self.zone),
            ("node", &self.node_name),
            ("pod", &self.pod),
        ] {
            if let Some(value) = value {
                metadata = metadata.with_label(name, &**value);
            }
        }
        metadata
    }
}

impl PartialEq for KubernetesEndpoint {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

impl Eq for KubernetesEndpoint {}

impl Hash for KubernetesEndpoint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
    }
}

/// Active health checks reach the endpoint's address.
impl crate::health::CheckAddress for KubernetesEndpoint {
    fn check_address(&self) -> SocketAddr {
        self.addr
    }
}

/// The discovery stream of [`EndpointSlices::build`]: only changes, so
/// unchanged endpoints keep their connections and health. Its one error is
/// an answer: an [`Empty`] (whose reason is a
/// [`KubernetesError::NoEndpoints`]) when the Service has no endpoints.
pub struct KubernetesDiscover<S> {
    rx: mpsc::UnboundedReceiver<Result<Change<KubernetesEndpoint, S>, Empty>>,
}

impl<S> fmt::Debug for KubernetesDiscover<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesDiscover").finish_non_exhaustive()
    }
}

impl<S> Stream for KubernetesDiscover<S> {
    type Item = Result<Change<KubernetesEndpoint, S>, Empty>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// What one slice says of one address.
#[derive(Debug, Clone, PartialEq)]
struct Found {
    readiness: Readiness,
    zone: Option<Arc<str>>,
    zone_hints: Option<Arc<[Arc<str>]>>,
    /// Set when the slices are merged: it depends on the others' hints.
    routing_zone: Option<Arc<str>>,
    node_name: Option<Arc<str>>,
    pod: Option<Arc<str>>,
}

impl Found {
    fn endpoint(&self, addr: SocketAddr) -> KubernetesEndpoint {
        KubernetesEndpoint {
            addr,
            readiness: self.readiness,
            zone: self.zone.clone(),
            zone_hints: self.zone_hints.clone(),
            routing_zone: self.routing_zone.clone(),
            node_name: self.node_name.clone(),
            pod: self.pod.clone(),
        }
    }
}

/// The readiness an endpoint's conditions give, as kube-proxy reads them.
/// The API's rules: `ready` and `serving` unset mean true, `terminating`
/// unset means false. `ready` comes first (a Service that publishes
/// not-ready addresses marks terminating pods ready); a terminating
/// endpoint that still serves is a last resort.
fn readiness(conditions: Option<&EndpointConditions>) -> Readiness {
    let (ready, serving, terminating) =
        conditions.map_or((None, None, None), |c| (c.ready, c.serving, c.terminating));
    if ready.unwrap_or(true) {
        Readiness::Ready
    } else if terminating.unwrap_or(false) && serving.unwrap_or(true) {
        Readiness::Terminating
    } else {
        Readiness::NotServing
    }
}

/// Why a slice's endpoints were left out.
#[derive(Debug, PartialEq, Eq)]
enum SkippedSlice {
    /// `addressType: FQDN`: names, not addresses.
    Fqdn,
    /// No port, or no port of the name asked.
    NoPort {
        wanted: Option<String>,
        ports: Vec<String>,
    },
    /// Several TCP ports, and no name to choose by.
    SeveralPorts { ports: Vec<String> },
}

impl fmt::Display for SkippedSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkippedSlice::Fqdn => f.write_str("its addresses are FQDNs, not IP addresses"),
            SkippedSlice::NoPort {
                wanted: Some(name),
                ports,
            } => {
                write!(f, "it has no port named {name:?} (its ports: {ports:?})")
            }
            SkippedSlice::NoPort { wanted: None, .. } => f.write_str("it has no TCP port"),
            SkippedSlice::SeveralPorts { ports } => write!(
                f,
                "it has several TCP ports ({ports:?}): name one with EndpointSlices::port"
            ),
        }
    }
}

/// The port of `slice` to send to.
fn slice_port(slice: &EndpointSlice, wanted: Option<&str>) -> Result<u16, SkippedSlice> {
    let tcp: Vec<_> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let number = u16::try_from(p.port?).ok().filter(|&n| n != 0)?;
            Some((p.name.as_deref().unwrap_or(""), number))
        })
        .collect();
    let names = || tcp.iter().map(|(name, _)| (*name).to_owned()).collect();
    match wanted {
        Some(wanted) => tcp
            .iter()
            .find(|(name, _)| *name == wanted)
            .map(|&(_, number)| number)
            .ok_or_else(|| SkippedSlice::NoPort {
                wanted: Some(wanted.to_owned()),
                ports: names(),
            }),
        None => match tcp.as_slice() {
            [(_, number)] => Ok(*number),
            [] => Err(SkippedSlice::NoPort {
                wanted: None,
                ports: Vec::new(),
            }),
            _ => Err(SkippedSlice::SeveralPorts { ports: names() }),
        },
    }
}

/// The endpoints of one slice, at the port asked. An endpoint whose
/// address is not an IP address is left out with a `warn` event.
fn slice_endpoints(
    slice: &EndpointSlice,
    port: Option<&str>,
) -> Result<Vec<(SocketAddr, Found)>, SkippedSlice> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(SkippedSlice::Fqdn);
    }
    let port = slice_port(slice, port)?;
    Ok(slice
        .endpoints
        .iter()
        .filter_map(|endpoint| endpoint_found(slice, endpoint, port))
        .collect())
}

fn endpoint_found(
    slice: &EndpointSlice,
    endpoint: &Endpoint,
    port: u16,
) -> Option<(SocketAddr, Found)> {
    // The addresses of one endpoint are interchangeable (the API says
    // consumers use the first).
    let address = endpoint.addresses.first()?;
    let Ok(ip) = address.parse::<IpAddr>() else {
        tracing::warn!(slice = ?slice.metadata.name, %address,
            "EndpointSlice endpoint's address is not an IP address; leaving it out");
        return None;
    };
    let zone_hints: Option<Arc<[Arc<str>]>> = endpoint
        .hints
        .as_ref()
        .and_then(|hints| hints.for_zones.as_ref())
        .filter(|zones| !zones.is_empty())
        .map(|zones| zones.iter().map(|z| Arc::from(z.name.as_str())).collect());
    let pod = endpoint
        .target_ref
        .as_ref()
        .filter(|target| target.kind.as_deref() == Some("Pod"))
        .and_then(|target| target.name.as_deref())
        .map(Arc::from);
    let found = Found {
        readiness: readiness(endpoint.conditions.as_ref()),
        zone: endpoint.zone.as_deref().map(Arc::from),
        zone_hints,
        routing_zone: None,
        node_name: endpoint.node_name.as_deref().map(Arc::from),
        pod,
    };
    Some((SocketAddr::new(ip, port), found))
}

/// How much better one readiness is than another, for an address found in
/// two slices.
fn rank(readiness: Readiness) -> u8 {
    match readiness {
        Readiness::Ready => 2,
        Readiness::Terminating => 1,
        _ => 0,
    }
}

/// How the slices are read: [`EndpointSlices`]' settings.
#[derive(Debug, Clone, Default)]
struct Reading {
    port: Option<String>,
    client_zone: Option<Arc<str>>,
    prefer_ipv6: bool,
}

/// One slice: its address family and endpoints.
#[derive(Debug)]
struct Slice {
    ipv6: bool,
    endpoints: Vec<(SocketAddr, Found)>,
}

/// Every slice of the Service, and the endpoints they add up to.
#[derive(Debug)]
struct SliceSet {
    reading: Reading,
    /// By slice name, for an order that does not depend on arrival.
    slices: BTreeMap<String, Slice>,
    /// A list under way: it replaces `slices` once complete. Every slice
    /// listed, those left out too (`None`), so that the ones no longer
    /// there are forgotten.
    listing: Option<BTreeMap<String, Option<Slice>>>,
    /// The slices left out, and why: each is warned of once per reason.
    left_out: HashMap<String, String>,
}

impl SliceSet {
    fn new(reading: Reading) -> Self {
        Self {
            reading,
            slices: BTreeMap::new(),
            listing: None,
            left_out: HashMap::new(),
        }
    }

    /// Reads one watcher event; true when the set may have changed.
    fn apply(&mut self, event: watcher::Event<EndpointSlice>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(slice) => {
                if let Some((name, read)) = self.read(&slice) {
                    let listing = self.listing.get_or_insert_with(BTreeMap::new);
                    listing.insert(name, read);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                // A slice left out and gone while the watch was down is
                // forgotten (its warning comes again if it comes back).
                self.left_out.retain(|name, _| listed.contains_key(name));
                self.slices = listed
                    .into_iter()
                    .filter_map(|(name, slice)| Some((name, slice?)))
                    .collect();
                true
            }
            watcher::Event::Apply(slice) => match self.read(&slice) {
                Some((name, Some(slice))) => {
                    self.slices.insert(name, slice);
                    true
                }
                // Left out now: whatever it said before no longer holds.
                Some((name, None)) => self.slices.remove(&name).is_some(),
                None => false,
            },
            watcher::Event::Delete(slice) => match slice.metadata.name {
                Some(name) => {
                    self.left_out.remove(&name);
                    self.slices.remove(&name).is_some()
                }
                None => false,
            },
        }
    }

    /// A slice's name and what it holds, None when it is left out; None
    /// for a slice with no name (which the API server never sends).
    fn read(&mut self, slice: &EndpointSlice) -> Option<(String, Option<Slice>)> {
        let Some(name) = slice.metadata.name.clone() else {
            tracing::warn!("leaving out an EndpointSlice without a name");
            return None;
        };
        match slice_endpoints(slice, self.reading.port.as_deref()) {
            Ok(endpoints) => {
                self.left_out.remove(&name);
                let ipv6 = slice.address_type == "IPv6";
                Some((name, Some(Slice { ipv6, endpoints })))
            }
            Err(reason) => {
                let reason = reason.to_string();
                if self.left_out.get(&name) != Some(&reason) {
                    tracing::warn!(slice = %name, %reason, "leaving an EndpointSlice out");
                    self.left_out.insert(name.clone(), reason);
                }
                Some((name, None))
            }
        }
    }

    /// The endpoints every slice adds up to.
    ///
    /// - A dual-stack Service has slices of both families, with each pod in
    ///   one of each: only one family is used, IPv4 unless
    ///   [`prefer_ipv6`](EndpointSlices::prefer_ipv6) (or it has none).
    /// - An address in two slices (as while the controller moves it)
    ///   counts once, at its best readiness.
    /// - Zone hints count only while some endpoint is ready and every ready
    ///   one has a hint, as kube-proxy uses them.
    fn endpoints(&self) -> BTreeMap<SocketAddr, Found> {
        let preferred = self.reading.prefer_ipv6;
        let family = if self.slices.values().any(|s| s.ipv6 == preferred) {
            preferred
        } else {
            !preferred
        };
        let mut merged: BTreeMap<SocketAddr, Found> = BTreeMap::new();
        let chosen = self.slices.values().filter(|s| s.ipv6 == family);
        for (addr, found) in chosen.flat_map(|s| &s.endpoints) {
            match merged.get(addr) {
                Some(kept) if rank(kept.readiness) >= rank(found.readiness) => {}
                _ => {
                    merged.insert(*addr, found.clone());
                }
            }
        }
        let mut ready = merged
            .values()
            .filter(|f| f.readiness == Readiness::Ready)
            .peekable();
        let hints_used = ready.peek().is_some() && ready.all(|f| f.zone_hints.is_some());
        for found in merged.values_mut() {
            if !hints_used {
                found.zone_hints = None;
            }
            found.routing_zone = routing_zone(found, self.reading.client_zone.as_ref());
        }
        merged
    }
}

/// The zone to route an endpoint by: the client's when the endpoint is
/// hinted for it (among others), else the first zone it is hinted for,
/// else its own.
fn routing_zone(found: &Found, client_zone: Option<&Arc<str>>) -> Option<Arc<str>> {
    match found.zone_hints.as_deref() {
        Some(hints) => client_zone
            .filter(|client| hints.contains(*client))
            .or(hints.first())
            .cloned(),
        None => found.zone.clone(),
    }
}

/// The watch task.
struct SliceWatch<S, F> {
    settings: EndpointSlices,
    set: SliceSet,
    make: F,
    tx: mpsc::UnboundedSender<Result<Change<KubernetesEndpoint, S>, Empty>>,
    /// What the stream has announced.
    current: HashMap<SocketAddr, Found>,
    /// Whether the stream has said the Service has no endpoints, since it
    /// last had some.
    announced_empty: bool,
}

impl<S, F> SliceWatch<S, F>
where
    F: Fn(SocketAddr) -> S,
{
    async fn run(mut self) {
        let mut failures = 0;
        loop {
            let api: Api<EndpointSlice> =
                Api::namespaced(self.settings.client.clone(), &self.settings.namespace);
            let selector = format!("{SERVICE_NAME_LABEL}={}", self.settings.service);
            let mut events = pin!(watcher(api, watcher::Config::default().labels(&selector)));
            loop {
                let event = tokio::select! {
                    event = poll_fn(|cx| events.as_mut().poll_next(cx)) => event,
                    // The balancer is gone: nobody listens any more.
                    _ = self.tx.closed() => return,
                };
                let error = match event {
                    Some(Ok(event)) => {
                        // `Init` comes before the list is asked for: only
                        // an answer ends a run of failures, so that a list
                        // that keeps failing is asked for ever less often.
                        if !matches!(event, watcher::Event::Init) {
                            failures = 0;
                        }
                        if self.set.apply(event) && !self.publish() {
                            return;
                        }
                        continue;
                    }
                    Some(Err(error)) => error,
                    // The watcher does not end; were it to, start another.
                    None => break,
                };
                failures += 1;
                let retry_in = self.settings.backoff.delay(failures, &mut rand::rng());
                tracing::warn!(namespace = %self.settings.namespace, service = %self.settings.service,
                    %error, endpoints = self.current.len(), ?retry_in,
                    "Kubernetes EndpointSlice watch failed; keeping the last known endpoints");
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => {}
                    _ = self.tx.closed() => return,
                }
                // kube-runtime lists again after a watch *event* of 410
                // Gone, but a watch *request* answered 410 (a stream whose
                // one item is that error) it asks again, with the same
                // expired version, for ever: a new watcher lists anew.
                if is_gone(&error) {
                    break;
                }
            }
        }
    }

    /// Announces the difference between what was announced and what the
    /// slices now say; false once nobody listens.
    ///
    /// Inserts first, then removes, as DNS discovery does: a balancer that
    /// saw the removal of the last endpoint before the insertion of the
    /// next would have none for a moment and fail requests at once.
    fn publish(&mut self) -> bool {
        let found = self.set.endpoints();
        let removed: Vec<SocketAddr> = self
            .current
            .keys()
            .filter(|addr| !found.contains_key(addr))
            .copied()
            .collect();
        let (mut inserted, mut changed) = (0, 0);
        for (addr, attributes) in &found {
            match self.current.get(addr) {
                Some(known) if known == attributes => continue,
                Some(_) => changed += 1,
                None => inserted += 1,
            }
            self.current.insert(*addr, attributes.clone());
            let change = Change::Insert(attributes.endpoint(*addr), (self.make)(*addr));
            if self.tx.send(Ok(change)).is_err() {
                return false;
            }
        }
        for addr in &removed {
            if let Some(found) = self.current.remove(addr) {
                if self
                    .tx
                    .send(Ok(Change::Remove(found.endpoint(*addr))))
                    .is_err()
                {
                    return false;
                }
            }
        }
        let (namespace, service) = (&self.settings.namespace, &self.settings.service);
        if inserted + changed + removed.len() > 0 {
            tracing::debug!(%namespace, %service, inserted, changed, removed = removed.len(),
                endpoints = self.current.len(), "Kubernetes endpoints changed");
        }
        if !self.current.is_empty() {
            self.announced_empty = false;
            return true;
        }
        if self.announced_empty {
            return true;
        }
        self.announced_empty = true;
        let slices_left_out = self.set.left_out.len();
        tracing::warn!(%namespace, %service, slices_left_out, "Kubernetes Service has no endpoints");
        let reason = KubernetesError::NoEndpoints {
            namespace: namespace.clone(),
            service: service.clone(),
            slices_left_out,
        };
        self.tx.send(Err(Empty::new(reason))).is_ok()
    }
}

/// Whether the API server answered a watch request `410 Gone` (a failed
/// list already starts over, and so does a 410 event on a watch). kube 2
/// reports the answer as the watch stream's failure; the start's failure
/// is matched too, in case a later kube reports it there.
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchStartFailed(kube::Error::Api(response))
        | watcher::Error::WatchFailed(kube::Error::Api(response)) => response.code == 410,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{EndpointHints, EndpointPort, ForZone};

    fn conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Option<EndpointConditions> {
        Some(EndpointConditions {
            ready,
            serving,
            terminating,
        })
    }

    fn port(name: &str, number: i32, protocol: &str) -> EndpointPort {
        EndpointPort {
            name: Some(name.into()),
            port: Some(number),
            protocol: Some(protocol.into()),
            ..EndpointPort::default()
        }
    }

    fn endpoint(ip: &str, zone: &str, hint: Option<&str>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            zone: Some(zone.into()),
            hints: hint.map(|zone| EndpointHints {
                for_zones: Some(vec![ForZone { name: zone.into() }]),
                ..EndpointHints::default()
            }),
            ..Endpoint::default()
        }
    }

    fn slice(name: &str, endpoints: Vec<Endpoint>, ports: Vec<EndpointPort>) -> EndpointSlice {
        let mut slice = EndpointSlice {
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(ports),
            ..EndpointSlice::default()
        };
        slice.metadata.name = Some(name.into());
        slice
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn conditions_map_to_readiness_as_the_api_defines_them() {
        let cases = [
            (None, Readiness::Ready),
            (conditions(None, None, None), Readiness::Ready),
            (
                conditions(Some(true), Some(true), Some(false)),
                Readiness::Ready,
            ),
            (
                conditions(Some(false), Some(false), Some(false)),
                Readiness::NotServing,
            ),
            (
                conditions(Some(false), Some(true), Some(true)),
                Readiness::Terminating,
            ),
            (
                conditions(Some(false), Some(false), Some(true)),
                Readiness::NotServing,
            ),
            // `serving` unset means true.
            (
                conditions(Some(false), None, Some(true)),
                Readiness::Terminating,
            ),
            // A Service that publishes not-ready addresses: `ready` wins.
            (
                conditions(Some(true), Some(true), Some(true)),
                Readiness::Ready,
            ),
            (conditions(Some(false), None, None), Readiness::NotServing),
        ];
        for (given, expected) in cases {
            assert_eq!(readiness(given.as_ref()), expected, "{given:?}");
        }
    }

    #[test]
    fn the_only_tcp_port_is_chosen_without_a_name() {
        let s = slice(
            "a",
            vec![],
            vec![port("dns", 53, "UDP"), port("http", 8080, "TCP")],
        );
        assert_eq!(slice_port(&s, None), Ok(8080));
    }

    #[test]
    fn several_tcp_ports_without_a_name_leave_the_slice_out_with_their_names() {
        let s = slice(
            "a",
            vec![],
            vec![port("http", 80, "TCP"), port("grpc", 9000, "TCP")],
        );
        let error = slice_port(&s, None).unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"it has several TCP ports (["http", "grpc"]): name one with EndpointSlices::port"#
        );
        assert_eq!(slice_port(&s, Some("grpc")), Ok(9000));
    }

    #[test]
    fn a_port_name_the_slice_lacks_leaves_it_out() {
        let s = slice("a", vec![], vec![port("http", 80, "TCP")]);
        assert!(matches!(
            slice_port(&s, Some("grpc")),
            Err(SkippedSlice::NoPort { .. })
        ));
    }

    #[test]
    fn fqdn_slices_and_addresses_that_are_not_ips_are_left_out() {
        let mut s = slice(
            "a",
            vec![endpoint("10.0.0.1", "a", None)],
            vec![port("http", 80, "TCP")],
        );
        s.address_type = "FQDN".into();
        assert_eq!(slice_endpoints(&s, None), Err(SkippedSlice::Fqdn));
        let s = slice(
            "a",
            vec![
                endpoint("not-an-ip", "a", None),
                endpoint("10.0.0.2", "a", None),
            ],
            vec![port("http", 80, "TCP")],
        );
        let found = slice_endpoints(&s, None).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, addr("10.0.0.2:80"));
    }

    #[test]
    fn an_address_in_two_slices_counts_once_at_its_best_readiness() {
        let mut terminating = endpoint("10.0.0.1", "a", None);
        terminating.conditions = conditions(Some(false), Some(true), Some(true));
        let ready = endpoint("10.0.0.1", "a", None);
        // Either slice first (slices merge in name order).
        for (x, y) in [(terminating.clone(), ready.clone()), (ready, terminating)] {
            let mut set = SliceSet::new(Reading::default());
            set.apply(watcher::Event::Apply(slice(
                "x",
                vec![x],
                vec![port("p", 80, "TCP")],
            )));
            set.apply(watcher::Event::Apply(slice(
                "y",
                vec![y],
                vec![port("p", 80, "TCP")],
            )));
            let merged = set.endpoints();
            assert_eq!(merged.len(), 1);
            assert_eq!(merged[&addr("10.0.0.1:80")].readiness, Readiness::Ready);
        }
    }

    #[test]
    fn a_dual_stack_service_uses_one_family() {
        let mut v6 = slice(
            "web-v6",
            vec![endpoint("fd00::1", "a", None)],
            vec![port("p", 80, "TCP")],
        );
        v6.address_type = "IPv6".into();
        let v4 = slice(
            "web-v4",
            vec![endpoint("10.0.0.1", "a", None)],
            vec![port("p", 80, "TCP")],
        );
        let mut set = SliceSet::new(Reading::default());
        set.apply(watcher::Event::Apply(v6.clone()));
        assert_eq!(
            set.endpoints().keys().copied().collect::<Vec<_>>(),
            [addr("[fd00::1]:80")]
        );
        set.apply(watcher::Event::Apply(v4.clone()));
        assert_eq!(
            set.endpoints().keys().copied().collect::<Vec<_>>(),
            [addr("10.0.0.1:80")]
        );
        let mut set = SliceSet::new(Reading {
            prefer_ipv6: true,
            ..Reading::default()
        });
        set.apply(watcher::Event::Apply(v4));
        set.apply(watcher::Event::Apply(v6));
        assert_eq!(
            set.endpoints().keys().copied().collect::<Vec<_>>(),
            [addr("[fd00::1]:80")]
        );
    }

    #[test]
    fn an_endpoint_hinted_for_several_zones_routes_as_in_the_clients() {
        let mut hinted = endpoint("10.0.0.1", "b", Some("b"));
        if let Some(hints) = hinted.hints.as_mut() {
            hints.for_zones = Some(vec![
                ForZone { name: "b".into() },
                ForZone { name: "a".into() },
            ]);
        }
        let one = || slice("x", vec![hinted.clone()], vec![port("p", 80, "TCP")]);
        let zone_of = |reading: Reading| {
            let mut set = SliceSet::new(reading);
            set.apply(watcher::Event::Apply(one()));
            let merged = set.endpoints();
            merged[&addr("10.0.0.1:80")]
                .routing_zone
                .as_deref()
                .map(str::to_owned)
        };
        assert_eq!(zone_of(Reading::default()).as_deref(), Some("b"));
        let in_a = Reading {
            client_zone: Some("a".into()),
            ..Reading::default()
        };
        assert_eq!(zone_of(in_a).as_deref(), Some("a"));
    }

    #[test]
    fn zone_hints_do_not_count_while_no_endpoint_is_ready() {
        let mut terminating = endpoint("10.0.0.1", "a", Some("b"));
        terminating.conditions = conditions(Some(false), Some(true), Some(true));
        let mut set = SliceSet::new(Reading::default());
        set.apply(watcher::Event::Apply(slice(
            "x",
            vec![terminating],
            vec![port("p", 80, "TCP")],
        )));
        let merged = set.endpoints();
        let found = &merged[&addr("10.0.0.1:80")];
        assert_eq!(
            (found.zone_hints.is_none(), found.routing_zone.as_deref()),
            (true, Some("a"))
        );
    }

    #[test]
    fn a_slice_without_a_name_is_left_out() {
        let mut nameless = slice(
            "x",
            vec![endpoint("10.0.0.1", "a", None)],
            vec![port("p", 80, "TCP")],
        );
        nameless.metadata.name = None;
        let mut set = SliceSet::new(Reading::default());
        assert!(!set.apply(watcher::Event::Apply(nameless)));
        assert!(set.endpoints().is_empty());
    }

    #[test]
    fn zone_hints_count_only_when_every_ready_endpoint_has_one() {
        let mut set = SliceSet::new(Reading::default());
        set.apply(watcher::Event::Apply(slice(
            "x",
            vec![
                endpoint("10.0.0.1", "a", Some("b")),
                endpoint("10.0.0.2", "b", None),
            ],
            vec![port("p", 80, "TCP")],
        )));
        assert!(set.endpoints().values().all(|f| f.zone_hints.is_none()));
        set.apply(watcher::Event::Apply(slice(
            "x",
            vec![
                endpoint("10.0.0.1", "a", Some("b")),
                endpoint("10.0.0.2", "b", Some("b")),
            ],
            vec![port("p", 80, "TCP")],
        )));
        let merged = set.endpoints();
        let endpoint = merged[&addr("10.0.0.1:80")].endpoint(addr("10.0.0.1:80"));
        assert_eq!(endpoint.routing_zone.as_deref(), Some("b"));
        let metadata = endpoint.metadata();
        assert_eq!(
            (metadata.zone(), metadata.label("zone")),
            (Some("b"), Some("a"))
        );
    }

    #[test]
    fn a_list_replaces_the_set_only_once_complete() {
        let mut set = SliceSet::new(Reading::default());
        let ports = || vec![port("p", 80, "TCP")];
        set.apply(watcher::Event::Apply(slice(
            "x",
            vec![endpoint("10.0.0.1", "a", None)],
            ports(),
        )));
        assert!(!set.apply(watcher::Event::Init));
        assert!(!set.apply(watcher::Event::InitApply(slice(
            "y",
            vec![endpoint("10.0.0.2", "a", None)],
            ports()
        ))));
        assert_eq!(
            set.endpoints().keys().copied().collect::<Vec<_>>(),
            [addr("10.0.0.1:80")]
        );
        assert!(set.apply(watcher::Event::InitDone));
        assert_eq!(
            set.endpoints().keys().copied().collect::<Vec<_>>(),
            [addr("10.0.0.2:80")]
        );
    }

    #[test]
    fn a_left_out_slice_gone_from_a_new_list_is_forgotten() {
        let mut set = SliceSet::new(Reading::default());
        let unreadable = || {
            slice(
                "x",
                vec![endpoint("10.0.0.1", "a", None)],
                vec![port("a", 80, "TCP"), port("b", 81, "TCP")],
            )
        };
        set.apply(watcher::Event::Apply(unreadable()));
        assert_eq!(set.left_out.len(), 1);
        // Listed again while still there: still left out.
        set.apply(watcher::Event::Init);
        set.apply(watcher::Event::InitApply(unreadable()));
        set.apply(watcher::Event::InitDone);
        assert_eq!(set.left_out.len(), 1);
        // Gone from the next list: forgotten.
        set.apply(watcher::Event::Init);
        set.apply(watcher::Event::InitDone);
        assert!(set.left_out.is_empty());
    }

    #[test]
    fn a_slice_that_becomes_unreadable_loses_its_endpoints() {
        let mut set = SliceSet::new(Reading {
            port: Some("http".into()),
            ..Reading::default()
        });
        set.apply(watcher::Event::Apply(slice(
            "x",
            vec![endpoint("10.0.0.1", "a", None)],
            vec![port("http", 80, "TCP")],
        )));
        assert_eq!(set.endpoints().len(), 1);
        assert!(set.apply(watcher::Event::Apply(slice(
            "x",
            vec![endpoint("10.0.0.1", "a", None)],
            vec![port("grpc", 90, "TCP")],
        ))));
        assert!(set.endpoints().is_empty());
    }

    #[test]
    fn names_that_are_not_dns_labels_are_refused_by_name() {
        for bad in ["", "Web", "a,b", "x=y", "-a", "a-", &"a".repeat(64)] {
            let error = check_name("Service name", bad).unwrap_err();
            assert!(error.to_string().contains("Service name"), "{error}");
        }
        assert!(check_name("namespace", "kube-system").is_ok());
    }
}
