//! Active health checks: the balancer asks each endpoint whether it is
//! well, besides judging it by its traffic.
//!
//! A check runs as a task per endpoint, started when discovery inserts the
//! endpoint and stopped (dropped at its next `.await`) when discovery
//! removes it. It tells the balancer what it finds through a
//! [`HealthReporter`]; the balancer leaves an endpoint out of the set that
//! requests pick from while its check fails or before it has passed once,
//! as gRPC (A17) and Envoy do, and the panic threshold still applies: when
//! too few endpoints are in service, requests go to all of them.
//!
//! [`HealthCheck`] has the built-in checks:
//!
//! - [`HealthCheck::tcp`]: a TCP connect;
//! - [`HealthCheck::http_get`]: an HTTP/1.1 `GET` of a path, passed by the
//!   statuses expected (2xx by default);
//! - [`HealthCheck::grpc`]: gRPC's `grpc.health.v1.Health/Watch` stream, with
//!   A17's semantics.
//!
//! The first two probe on an interval with jitter, and an endpoint changes
//! state after `unhealthy_threshold` failed or `healthy_threshold` passed
//! probes in a row (Envoy's rule; a new endpoint needs one pass). Any other
//! check is an [`ActiveCheck`].

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::setting::{self, InvalidSetting};

/// A task that checks one endpoint for as long as it is in the set. It is
/// dropped, wherever it waits, when the endpoint leaves the set or the
/// balancer stops.
pub type CheckTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// An active health check over endpoints with discovery keys of type `K`.
///
/// The balancer calls [`start`](ActiveCheck::start) once for each key
/// discovery inserts (a new service for a key already in the set keeps the
/// key's check) and spawns the task it returns. The task reports through
/// `reporter`; until it first does, the endpoint is not picked (unless the
/// panic threshold says otherwise).
///
/// ```
/// use std::net::SocketAddr;
/// use std::time::Duration;
/// use tower_lb::health::{ActiveCheck, CheckTask, HealthReporter};
///
/// /// Healthy while a file names the endpoint's address.
/// struct Listed(std::path::PathBuf);
///
/// impl ActiveCheck<SocketAddr> for Listed {
///     fn start(&self, key: &SocketAddr, mut reporter: HealthReporter) -> Option<CheckTask> {
///         let (path, addr) = (self.0.clone(), key.to_string());
///         Some(Box::pin(async move {
///             loop {
///                 match tokio::fs::read_to_string(&path).await {
///                     Ok(list) if list.lines().any(|line| line == addr) => reporter.healthy(),
///                     Ok(_) => reporter.unhealthy("not in the list"),
///                     Err(error) => reporter.unhealthy(format!("cannot read the list: {error}")),
///                 }
///                 tokio::time::sleep(Duration::from_secs(1)).await;
///             }
///         }))
///     }
/// }
/// ```
pub trait ActiveCheck<K>: Send + Sync + 'static {
    /// The task that checks the endpoint with `key`, or `None` to leave it
    /// unchecked (it is then in service as without active checks).
    fn start(&self, key: &K, reporter: HealthReporter) -> Option<CheckTask>;
}

/// No active checks: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoActiveCheck;

impl<K> ActiveCheck<K> for NoActiveCheck {
    fn start(&self, _: &K, _: HealthReporter) -> Option<CheckTask> {
        None
    }
}

/// Where an endpoint stands with its active health check, as
/// [`EndpointStats::health_check`](crate::balance::EndpointStats::health_check)
/// shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CheckStatus {
    /// No check has reported yet: out of service until one passes.
    Pending,
    /// The check passes: in service (unless outlier detection ejected it).
    Passing,
    /// The check fails: out of service.
    Failing,
}

impl CheckStatus {
    /// Whether requests may go to the endpoint (outside panic mode).
    pub(crate) fn allows_traffic(self) -> bool {
        self == Self::Passing
    }
}

/// What a check found, as the balancer's driver receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Healthy,
    Unhealthy(String),
}

/// A verdict and the check that gave it.
pub(crate) type Report = (CheckId, Verdict);

/// Tells one check's reports apart from another's, including a later
/// check of the same key.
pub(crate) type CheckId = u64;

/// Where a check's reports go: the balancer's driver.
pub(crate) type Reports = mpsc::UnboundedReceiver<Report>;

/// A sender of reports, from which the driver makes each check's
/// [`HealthReporter`].
#[derive(Debug, Clone)]
pub(crate) struct ReportSender(mpsc::UnboundedSender<Report>);

/// The sending and receiving ends of a driver's reports.
pub(crate) fn reports() -> (ReportSender, Reports) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ReportSender(tx), rx)
}

impl ReportSender {
    /// The reporter of check `id`.
    pub(crate) fn reporter(&self, id: CheckId) -> HealthReporter {
        HealthReporter {
            id,
            tx: self.0.clone(),
            last: None,
        }
    }
}

/// How a check tells the balancer what it found about its endpoint. Only
/// changes reach the balancer: reporting the same state again costs
/// nothing.
#[derive(Debug)]
pub struct HealthReporter {
    id: CheckId,
    tx: mpsc::UnboundedSender<Report>,
    /// The state last reported: `Some(true)` healthy.
    last: Option<bool>,
}

impl HealthReporter {
    /// The endpoint is well: it is put (or kept) in service.
    pub fn healthy(&mut self) {
        self.report(Verdict::Healthy);
    }

    /// The endpoint is not well, for `reason` (logged by the balancer): it
    /// is taken (or kept) out of service.
    pub fn unhealthy(&mut self, reason: impl fmt::Display) {
        // Checked here too, so that a repeated verdict builds no text.
        if self.last != Some(false) {
            self.report(Verdict::Unhealthy(reason.to_string()));
        }
    }

    fn report(&mut self, verdict: Verdict) {
        let healthy = verdict == Verdict::Healthy;
        if self.last == Some(healthy) {
            return;
        }
        self.last = Some(healthy);
        // The driver gone means the balancer stopped; this task is about
        // to be dropped too.
        let _ = self.tx.send((self.id, verdict));
    }
}

/// Where a built-in check reaches an endpoint: the address its discovery
/// key names.
///
/// Implemented for `SocketAddr` and, with the `dns` feature, for
/// [`DnsEndpoint`]; implement it for a key of your own to use
/// [`HealthCheck`] with it.
///
#[cfg_attr(
    feature = "dns",
    doc = "\n[`DnsEndpoint`]: crate::discover::DnsEndpoint\n"
)]
#[cfg_attr(
    not(feature = "dns"),
    doc = "\n[`DnsEndpoint`]: crate#cargo-features\n"
)]
pub trait CheckAddress {
    /// The address to check.
    fn check_address(&self) -> SocketAddr;
}

impl CheckAddress for SocketAddr {
    fn check_address(&self) -> SocketAddr {
        *self
    }
}

/// The built-in active checks and their schedule.
///
/// | setting | default | as in |
/// |---|---|---|
/// | [`interval`](Self::interval) | 5 s | |
/// | [`timeout`](Self::timeout) | 1 s | Kubernetes probes |
/// | [`jitter_percent`](Self::jitter_percent) | 10 % of the interval, added at random | Envoy's `interval_jitter_percent` |
/// | [`unhealthy_threshold`](Self::unhealthy_threshold) | 3 failed probes in a row | Kubernetes `failureThreshold` |
/// | [`healthy_threshold`](Self::healthy_threshold) | 2 passed probes in a row | |
///
/// The first probe goes as soon as the endpoint is inserted, and its
/// result decides at once (a new endpoint needs one pass, as in Envoy).
/// A probe that does not finish within the timeout fails.
///
/// [`HealthCheck::grpc`] watches a stream instead: the server says when its
/// state changes, so the interval and thresholds do not apply (see there).
///
#[cfg_attr(feature = "grpc", doc = "\n[`HealthCheck::grpc`]: HealthCheck::grpc\n")]
#[cfg_attr(
    not(feature = "grpc"),
    doc = "\n[`HealthCheck::grpc`]: crate#cargo-features\n"
)]
///
/// ```
/// use std::time::Duration;
/// use tower_lb::health::HealthCheck;
///
/// let check = HealthCheck::tcp()
///     .interval(Duration::from_secs(10))?
///     .unhealthy_threshold(2)?;
/// # let _ = check;
/// # Ok::<(), tower_lb::error::InvalidSetting>(())
/// ```
#[derive(Debug, Clone)]
pub struct HealthCheck {
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    jitter_percent: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

#[derive(Debug, Clone)]
enum Probe {
    Tcp,
    #[cfg(feature = "http")]
    HttpGet {
        path: http::uri::PathAndQuery,
        expected: std::ops::RangeInclusive<u16>,
    },
    #[cfg(feature = "grpc")]
    GrpcWatch {
        service: String,
    },
}

impl HealthCheck {
    fn with_probe(probe: Probe) -> Self {
        Self {
            probe,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            jitter_percent: 10,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }

    /// Passes when a TCP connection to the endpoint's address is made in
    /// time (and then closed at once).
    pub fn tcp() -> Self {
        Self::with_probe(Probe::Tcp)
    }

    /// Passes when an HTTP/1.1 `GET` of `path` on the endpoint's address is
    /// answered with a status in [`expected_statuses`](Self::expected_statuses)
    /// (200-299 by default) in time. The connection is kept between probes.
    ///
    /// # Errors
    ///
    /// When `path` is not a valid request path (it must start with `/`).
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn http_get(path: &str) -> Result<Self, InvalidSetting> {
        let parsed = path
            .starts_with('/')
            .then(|| http::uri::PathAndQuery::try_from(path).ok())
            .flatten();
        let Some(parsed) = parsed else {
            return Err(InvalidSetting::new(
                "HealthCheck::http_get",
                path,
                "a request path starting with /",
            ));
        };
        Ok(Self::with_probe(Probe::HttpGet {
            path: parsed,
            expected: 200..=299,
        }))
    }

    /// The statuses that pass an [`http_get`](Self::http_get) check
    /// (Kubernetes takes 200-399). Other checks ignore it.
    ///
    /// # Errors
    ///
    /// When the range is empty or not within 100-599.
    #[cfg(feature = "http")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http")))]
    pub fn expected_statuses(
        mut self,
        statuses: std::ops::RangeInclusive<u16>,
    ) -> Result<Self, InvalidSetting> {
        let valid = !statuses.is_empty() && *statuses.start() >= 100 && *statuses.end() <= 599;
        let statuses = setting::check(
            "HealthCheck::expected_statuses",
            statuses,
            valid,
            "a non-empty range of statuses within 100-599",
        )?;
        if let Probe::HttpGet { expected, .. } = &mut self.probe {
            *expected = statuses;
        }
        Ok(self)
    }

    /// Watches gRPC's `grpc.health.v1.Health/Watch` for `service` (`""`: the
    /// server as a whole) over a connection of its own to the endpoint's
    /// address, in plain text (HTTP/2 with prior knowledge). A17's
    /// semantics:
    ///
    /// - `SERVING` puts the endpoint in service; any other status
    ///   (`NOT_SERVING`, `SERVICE_UNKNOWN`, `UNKNOWN`) takes it out, at once:
    ///   the server speaks for itself, so the thresholds do not apply.
    /// - A stream that fails or ends takes the endpoint out and is opened
    ///   again: at once if it had answered, else after a back-off that
    ///   starts at 1 s and grows 1.6x up to the [interval](Self::interval),
    ///   with the jitter. The [timeout](Self::timeout) bounds the wait for
    ///   a connection and for the stream's first answer.
    /// - `UNIMPLEMENTED` means the server has no health service: the
    ///   endpoint is in service unchecked (a `warn` event says so), and the
    ///   stream is asked for again every interval, in case the server
    ///   gains one.
    /// - The connection pings as `GrpcChannel`'s do
    ///   ([`Http2KeepAlive::GRPC`](crate::client::Http2KeepAlive::GRPC)): a
    ///   server that hangs without closing the stream is found within 5
    ///   minutes and 20 s; a sooner ping would break grpc-go's and
    ///   grpc-java's default ping policy on the quiet stream.
    #[cfg(feature = "grpc")]
    #[cfg_attr(docsrs, doc(cfg(feature = "grpc")))]
    pub fn grpc(service: impl Into<String>) -> Self {
        Self::with_probe(Probe::GrpcWatch {
            service: service.into(),
        })
    }

    /// Time between the end of one probe and the start of the next, before
    /// jitter.
    ///
    /// # Errors
    ///
    /// When `interval` is zero.
    pub fn interval(mut self, interval: Duration) -> Result<Self, InvalidSetting> {
        self.interval = setting::check(
            "HealthCheck::interval",
            interval,
            !interval.is_zero(),
            "a duration above zero",
        )?;
        Ok(self)
    }

    /// How long a probe may take before it counts as failed.
    ///
    /// # Errors
    ///
    /// When `timeout` is zero.
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, InvalidSetting> {
        self.timeout = setting::check(
            "HealthCheck::timeout",
            timeout,
            !timeout.is_zero(),
            "a duration above zero",
        )?;
        Ok(self)
    }

    /// Up to this percentage of the interval is added, at random, to each
    /// wait, so that many clients' probes do not arrive together.
    ///
    /// # Errors
    ///
    /// When `percent` is above 100.
    pub fn jitter_percent(mut self, percent: u32) -> Result<Self, InvalidSetting> {
        self.jitter_percent = setting::percent("HealthCheck::jitter_percent", percent)?;
        Ok(self)
    }

    /// Passed probes in a row that put an unhealthy endpoint back in
    /// service.
    ///
    /// # Errors
    ///
    /// When `count` is zero.
    pub fn healthy_threshold(mut self, count: u32) -> Result<Self, InvalidSetting> {
        self.healthy_threshold = setting::at_least_one("HealthCheck::healthy_threshold", count)?;
        Ok(self)
    }

    /// Failed probes in a row that take a healthy endpoint out of service.
    ///
    /// # Errors
    ///
    /// When `count` is zero.
    pub fn unhealthy_threshold(mut self, count: u32) -> Result<Self, InvalidSetting> {
        self.unhealthy_threshold =
            setting::at_least_one("HealthCheck::unhealthy_threshold", count)?;
        Ok(self)
    }

    /// The interval plus a random part of it, up to the jitter percentage.
    fn next_wait(&self) -> Duration {
        jittered(self.interval, self.jitter_percent)
    }
}

/// `base` plus up to `percent` % of it, at random. The settings keep
/// `percent` at 100 or below, so the sum fits even for `Duration::MAX`; the
/// conversion back from seconds is checked all the same, so that no
/// setting can reach a panic here.
fn jittered(base: Duration, percent: u32) -> Duration {
    let extra = base.as_secs_f64() * f64::from(percent) / 100.0 * fastrand::f64();
    base.saturating_add(Duration::try_from_secs_f64(extra).unwrap_or(Duration::MAX))
}

impl<K: CheckAddress> ActiveCheck<K> for HealthCheck {
    fn start(&self, key: &K, reporter: HealthReporter) -> Option<CheckTask> {
        let addr = key.check_address();
        let check = self.clone();
        Some(match &self.probe {
            Probe::Tcp => Box::pin(probe_on_interval(check, reporter, move || probe_tcp(addr))),
            #[cfg(feature = "http")]
            Probe::HttpGet { path, expected } => {
                let probe = http_probe::HttpGet::new(addr, path.clone(), expected.clone());
                Box::pin(probe_on_interval(check, reporter, move || probe.probe()))
            }
            #[cfg(feature = "grpc")]
            Probe::GrpcWatch { service } => {
                Box::pin(grpc_probe::watch(addr, service.clone(), check, reporter))
            }
        })
    }
}

/// Envoy's thresholds over a run of probe results.
#[derive(Debug)]
struct Thresholds {
    healthy: u32,
    unhealthy: u32,
    /// The state decided so far; `None` before the first probe.
    state: Option<bool>,
    /// Probes in a row that disagree with `state`.
    against: u32,
}

impl Thresholds {
    fn new(healthy: u32, unhealthy: u32) -> Self {
        Self {
            healthy,
            unhealthy,
            state: None,
            against: 0,
        }
    }

    /// Counts one probe; returns the state when it changes. The first probe
    /// decides at once.
    fn record(&mut self, passed: bool) -> Option<bool> {
        let changed = match self.state {
            None => true,
            Some(state) if state == passed => {
                self.against = 0;
                false
            }
            Some(_) => {
                self.against += 1;
                let needed = if passed { self.healthy } else { self.unhealthy };
                self.against >= needed
            }
        };
        if changed {
            self.state = Some(passed);
            self.against = 0;
        }
        changed.then_some(passed)
    }
}

/// Runs `probe` every interval (plus jitter), each within the timeout, and
/// reports the state the thresholds decide.
async fn probe_on_interval<P, F>(check: HealthCheck, mut reporter: HealthReporter, mut probe: P)
where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let mut thresholds = Thresholds::new(check.healthy_threshold, check.unhealthy_threshold);
    loop {
        let outcome = match tokio::time::timeout(check.timeout, probe()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {:?}", check.timeout)),
        };
        // Turned unhealthy by this probe: its failure is the reason.
        match (thresholds.record(outcome.is_ok()), outcome) {
            (Some(true), _) => reporter.healthy(),
            (Some(false), Err(why)) => reporter.unhealthy(why),
            _ => {}
        }
        tokio::time::sleep(check.next_wait()).await;
    }
}

async fn probe_tcp(addr: SocketAddr) -> Result<(), String> {
    tokio::net::TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|error| format!("TCP connect to {addr} failed: {error}"))
}

#[cfg(feature = "http")]
mod http_probe {
    use std::future::poll_fn;
    use std::net::SocketAddr;
    use std::ops::RangeInclusive;
    use std::pin::Pin;

    use http::uri::PathAndQuery;
    use http_body::Body;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// At most this much of an answer's body is read (so that its
    /// connection can serve the next probe); a longer body costs the
    /// connection instead.
    const MAX_DRAIN: usize = 64 * 1024;

    /// The `user-agent` of HTTP probes.
    const USER_AGENT: &str = concat!("tower-lb-health-check/", env!("CARGO_PKG_VERSION"));

    pub(super) struct HttpGet {
        client: Client<HttpConnector, String>,
        uri: http::Uri,
        expected: RangeInclusive<u16>,
    }

    impl HttpGet {
        pub(super) fn new(
            addr: SocketAddr,
            path: PathAndQuery,
            expected: RangeInclusive<u16>,
        ) -> Self {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            // A socket address is always a valid authority (`[::1]:80` too).
            parts.authority = http::uri::Authority::try_from(addr.to_string()).ok();
            parts.path_and_query = Some(path);
            let uri = http::Uri::from_parts(parts)
                .unwrap_or_else(|_| unreachable!("a scheme, an authority and a path make a URI"));
            Self {
                client: Client::builder(TokioExecutor::new()).build_http(),
                uri,
                expected,
            }
        }

        pub(super) fn probe(
            &self,
        ) -> impl std::future::Future<Output = Result<(), String>> + use<> {
            let mut request = http::Request::new(String::new());
            *request.uri_mut() = self.uri.clone();
            request.headers_mut().insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static(USER_AGENT),
            );
            let answer = self.client.request(request);
            let (uri, expected) = (self.uri.clone(), self.expected.clone());
            async move {
                let response = answer.await.map_err(|error| {
                    format!("GET {uri} failed: {}", crate::error::report(&error))
                })?;
                let status = response.status();
                drain(response.into_body()).await;
                if expected.contains(&status.as_u16()) {
                    Ok(())
                } else {
                    Err(format!("GET {uri} answered {status}"))
                }
            }
        }
    }

    /// Reads a body to its end (up to `MAX_DRAIN` bytes), so that the
    /// connection goes back to the pool.
    async fn drain<B: Body + Unpin>(mut body: B) {
        let mut read = 0usize;
        while read <= MAX_DRAIN {
            match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read += bytes::Buf::remaining(data);
                    }
                }
                Some(Err(_)) | None => return,
            }
        }
    }
}

#[cfg(feature = "grpc")]
mod grpc_probe {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tonic::transport::Endpoint;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::{jittered, HealthCheck, HealthReporter};

    /// The first back-off after a stream that never answered, and its
    /// growth: gRPC's connection back-off.
    const FIRST_BACKOFF: Duration = Duration::from_secs(1);
    const BACKOFF_GROWTH: f64 = 1.6;

    /// The Watch connection's HTTP/2 pings: `Http2KeepAlive::GRPC`'s.
    const WATCH_PING_INTERVAL: Duration = Duration::from_secs(300);
    const WATCH_PING_TIMEOUT: Duration = Duration::from_secs(20);

    /// How a stream ended.
    enum Ended {
        /// It had answered at least once: open it again at once.
        AfterAnswers,
        /// It never answered.
        Unanswered,
        /// The server has no health service.
        Unimplemented,
    }

    pub(super) async fn watch(
        addr: SocketAddr,
        service: String,
        check: HealthCheck,
        mut reporter: HealthReporter,
    ) {
        // HTTP/2 pings as `GrpcChannel`'s own connections have them: a
        // server that hangs (a stopped process) keeps the stream open and
        // says nothing, and only an unanswered ping shows it, within
        // `Http2KeepAlive::GRPC`'s interval and timeout. Not sooner: the
        // stream is quiet between changes, and grpc-go and grpc-java
        // servers take pings more often than every 5 minutes as abuse.
        // (The values of `Http2KeepAlive::GRPC`, not read from it: health
        // sits below the clients and their connections.)
        let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(endpoint) => endpoint
                .connect_timeout(check.timeout)
                .http2_keep_alive_interval(WATCH_PING_INTERVAL)
                .keep_alive_timeout(WATCH_PING_TIMEOUT)
                .keep_alive_while_idle(false),
            Err(error) => {
                // A socket address always makes a URI; should it not, say
                // so rather than check nothing (the endpoint stays out of
                // service, failing).
                reporter.unhealthy(format!("no URI for {addr}: {error}"));
                return;
            }
        };
        let channel = endpoint.connect_lazy();
        let mut backoff = FIRST_BACKOFF;
        let mut unimplemented = false;
        loop {
            let mut client = HealthClient::new(channel.clone());
            match watch_once(&mut client, &service, &check, &mut reporter).await {
                Ended::AfterAnswers => {
                    backoff = FIRST_BACKOFF;
                    unimplemented = false;
                }
                Ended::Unanswered => {
                    tokio::time::sleep(jittered(backoff, check.jitter_percent)).await;
                    backoff = backoff
                        .mul_f64(BACKOFF_GROWTH)
                        .min(check.interval.max(FIRST_BACKOFF));
                }
                Ended::Unimplemented => {
                    // In service unchecked; asked again every interval, so
                    // that a server restarted with a health service (or
                    // one whose proxy answered for it while it started)
                    // is checked from then on.
                    if !unimplemented {
                        tracing::warn!(endpoint = %addr, "the server has no gRPC health service (UNIMPLEMENTED): not checking it");
                        unimplemented = true;
                    }
                    reporter.healthy();
                    tokio::time::sleep(jittered(check.interval, check.jitter_percent)).await;
                    continue;
                }
            }
        }
    }

    /// One Watch stream, reported as it goes, until it ends.
    async fn watch_once(
        client: &mut HealthClient<tonic::transport::Channel>,
        service: &str,
        check: &HealthCheck,
        reporter: &mut HealthReporter,
    ) -> Ended {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let opened = tokio::time::timeout(check.timeout, async {
            let mut stream = client.watch(request).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((stream, first))
        })
        .await;
        let (mut stream, mut message) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                return Ended::Unimplemented
            }
            Ok(Err(status)) => {
                reporter.unhealthy(format!(
                    "health stream failed: {}",
                    crate::error::report(&status)
                ));
                return Ended::Unanswered;
            }
            Err(_) => {
                reporter.unhealthy(format!("no health answer within {:?}", check.timeout));
                return Ended::Unanswered;
            }
        };
        let mut answered = false;
        loop {
            match message {
                Some(answer) => {
                    answered = true;
                    match answer.status() {
                        ServingStatus::Serving => reporter.healthy(),
                        other => {
                            reporter.unhealthy(format!("the server says {}", other.as_str_name()))
                        }
                    }
                }
                None => {
                    reporter.unhealthy("health stream ended");
                    break;
                }
            }
            message = match stream.message().await {
                Ok(next) => next,
                Err(status) => {
                    reporter.unhealthy(format!(
                        "health stream failed: {}",
                        crate::error::report(&status)
                    ));
                    break;
                }
            };
        }
        if answered {
            Ended::AfterAnswers
        } else {
            Ended::Unanswered
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_probe_decides_at_once() {
        let mut passing = Thresholds::new(2, 3);
        assert_eq!(passing.record(true), Some(true));
        let mut failing = Thresholds::new(2, 3);
        assert_eq!(failing.record(false), Some(false));
    }

    #[test]
    fn a_healthy_endpoint_turns_unhealthy_after_the_unhealthy_threshold_in_a_row() {
        let mut thresholds = Thresholds::new(2, 3);
        thresholds.record(true);
        assert_eq!(thresholds.record(false), None);
        assert_eq!(thresholds.record(false), None);
        assert_eq!(thresholds.record(false), Some(false));
    }

    #[test]
    fn a_pass_between_failures_starts_the_count_again() {
        let mut thresholds = Thresholds::new(2, 3);
        thresholds.record(true);
        thresholds.record(false);
        thresholds.record(false);
        assert_eq!(thresholds.record(true), None);
        assert_eq!(thresholds.record(false), None);
        assert_eq!(thresholds.record(false), None);
        assert_eq!(thresholds.record(false), Some(false));
    }

    #[test]
    fn an_unhealthy_endpoint_turns_healthy_after_the_healthy_threshold_in_a_row() {
        let mut thresholds = Thresholds::new(2, 3);
        thresholds.record(false);
        assert_eq!(thresholds.record(true), None);
        assert_eq!(thresholds.record(false), None);
        assert_eq!(thresholds.record(true), None);
        assert_eq!(thresholds.record(true), Some(true));
    }

    #[test]
    fn a_reporter_sends_changes_only() {
        let (sender, mut reports) = reports();
        let mut reporter = sender.reporter(7);
        reporter.healthy();
        reporter.healthy();
        reporter.unhealthy("first");
        reporter.unhealthy("second");
        reporter.healthy();
        drop(reporter);
        drop(sender);
        let mut got = Vec::new();
        while let Ok(report) = reports.try_recv() {
            got.push(report);
        }
        assert_eq!(
            got,
            [
                (7, Verdict::Healthy),
                (7, Verdict::Unhealthy("first".into())),
                (7, Verdict::Healthy)
            ]
        );
    }

    #[test]
    fn jitter_adds_at_most_its_share_of_the_interval() {
        let base = Duration::from_secs(10);
        for _ in 0..1000 {
            let wait = jittered(base, 10);
            assert!(wait >= base && wait <= Duration::from_secs(11), "{wait:?}");
        }
        assert_eq!(jittered(base, 0), base);
    }

    #[test]
    fn each_setting_refuses_what_it_cannot_use_by_name() {
        let zero = Duration::ZERO;
        let cases = [
            HealthCheck::tcp().interval(zero).unwrap_err(),
            HealthCheck::tcp().timeout(zero).unwrap_err(),
            HealthCheck::tcp().jitter_percent(101).unwrap_err(),
            HealthCheck::tcp().healthy_threshold(0).unwrap_err(),
            HealthCheck::tcp().unhealthy_threshold(0).unwrap_err(),
        ];
        let names: Vec<_> = cases.iter().map(InvalidSetting::setting).collect();
        assert_eq!(
            names,
            [
                "HealthCheck::interval",
                "HealthCheck::timeout",
                "HealthCheck::jitter_percent",
                "HealthCheck::healthy_threshold",
                "HealthCheck::unhealthy_threshold"
            ]
        );
    }

    #[cfg(feature = "http")]
    #[test]
    fn an_http_check_refuses_a_path_without_a_slash_and_statuses_out_of_range() {
        let error = HealthCheck::http_get("healthz").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid setting HealthCheck::http_get = \"healthz\": it must be a request path starting with /"
        );
        assert!(HealthCheck::http_get("/bad path").is_err());
        let check = HealthCheck::http_get("/healthz").unwrap();
        for bad in [(300, 200), (99, 200), (200, 600)] {
            #[allow(clippy::reversed_empty_ranges)]
            let range = bad.0..=bad.1;
            assert_eq!(
                check
                    .clone()
                    .expected_statuses(range)
                    .unwrap_err()
                    .setting(),
                "HealthCheck::expected_statuses"
            );
        }
        assert!(check.expected_statuses(200..=399).is_ok());
    }
}
