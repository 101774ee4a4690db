//! `HttpClient` on its defaults against a real nginx (1.22) reloaded under
//! load, over HTTP/1.1 and over h2c (through hyper-util's pool, and over
//! its own HTTP/2 connections, which speak h2 itself): a reload is routine (every deploy or
//! configuration change does one), so it must not eject a healthy backend,
//! fail a GET, or lose or repeat a POST (issue 16, items 1 and 2).
//!
//! 4,000 requests (70 % GET, 30 % POST, each with a unique `X-Request-Id`)
//! from 32 tasks over three nginx backends, and three `nginx -s reload`
//! during the run. nginx's access log tells which requests reached it.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt;
use tower_lb::client::{HttpClient, DEFAULT_POOL_IDLE_TIMEOUT};
use tower_lb::BoxError;

use support::nginx::{Nginx, Protocol};

const REQUESTS: usize = 4_000;
const TASKS: usize = 32;
const BACKENDS: usize = 3;
/// A reload after each quarter of the requests.
const RELOADS: usize = 3;
/// Requests sent after the last reload has started its new worker, at least.
const AFTER_LAST_RELOAD: usize = 400;
/// The whole run, reloads included, must end within this.
const RUN_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_reloads_of_an_http1_nginx_under_load_eject_nothing_fail_no_get_and_resend_every_unsent_post(
) {
    let run = run_with_reloads(Protocol::Http1, Route::OwnConnections).await;
    run.assert_done_when();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_reloads_of_an_h2c_nginx_under_load_eject_nothing_fail_no_get_and_resend_every_unsent_post(
) {
    let run = run_with_reloads(Protocol::H2c, Route::HyperUtilPool).await;
    run.assert_done_when();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_its_own_h2_connections_three_reloads_of_an_h2c_nginx_eject_nothing_fail_no_get_and_resend_every_unsent_post(
) {
    let run = run_with_reloads(Protocol::H2c, Route::OwnConnections).await;
    run.assert_done_when();
}

/// How `HttpClient` reaches nginx over h2c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// hyper-util's pooled `Client`, HTTP/2 only (settings of the user's).
    HyperUtilPool,
    /// Its own HTTP/2 connections, one per backend (`http2_only()`),
    /// spoken with h2 itself.
    OwnConnections,
}

/// What one request saw.
#[derive(Debug, Clone)]
enum Outcome {
    /// A response, with its status.
    Answered(u16),
    /// An error, with what kind of error it is.
    Failed(FailureKind, String),
}

/// What a failed request's error says about whether nginx got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FailureKind {
    /// The crate's own verdict: it never reached the server
    /// (`tower_lb::error::is_never_sent`), so it should have been resent.
    NeverSent,
    /// An HTTP/2 GOAWAY without an error (graceful shutdown): the stream
    /// was above its last stream id, so the server processed nothing (RFC
    /// 9113, 6.8) and it should have been resent.
    GracefulGoAway,
    /// An HTTP/2 stream refused (`REFUSED_STREAM`): processed nothing.
    RefusedStream,
    /// The connection ended or was reset before the response (HTTP/1.1's
    /// "connection closed before message completed"): the server may or
    /// may not have read the request, nobody on the client side can tell.
    ConnectionLost,
    /// Anything else (a deadline, a GOAWAY with an error, ...).
    Other,
    /// No error, but a response other than nginx's `200 ok`.
    Status,
}

impl FailureKind {
    fn of(error: &BoxError) -> Self {
        let error: &(dyn std::error::Error + 'static) = error.as_ref();
        if tower_lb::error::is_never_sent(error) {
            return Self::NeverSent;
        }
        let chain = || std::iter::successors(Some(error), |e| e.source());
        for link in chain() {
            if let Some(h2) = link.downcast_ref::<h2::Error>() {
                if h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR) {
                    return Self::GracefulGoAway;
                }
                if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    return Self::RefusedStream;
                }
            }
            if link
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_incomplete_message)
            {
                return Self::ConnectionLost;
            }
            if link.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                )
            }) {
                return Self::ConnectionLost;
            }
        }
        Self::Other
    }

    /// The request provably never reached nginx: the client may and must
    /// send it again, POST or not.
    fn proves_never_sent(self) -> bool {
        matches!(
            self,
            Self::NeverSent | Self::GracefulGoAway | Self::RefusedStream
        )
    }
}

/// Everything a run saw: the client's outcomes and endpoints, nginx's log.
struct Run {
    protocol: Protocol,
    route: Route,
    /// Request id -> its method and outcome.
    outcomes: BTreeMap<String, (http::Method, Outcome)>,
    endpoints: Vec<tower_lb::EndpointStats<std::net::SocketAddr>>,
    /// Request id -> times nginx logged it.
    logged: HashMap<String, usize>,
    reloads: usize,
    took: Duration,
    retries: Option<tower_lb::retry::RetryStats>,
}

async fn run_with_reloads(protocol: Protocol, route: Route) -> Run {
    let mut nginx = Nginx::start(protocol, BACKENDS);
    let builder = match (protocol, route) {
        // The defaults, idle timeout included.
        (Protocol::Http1, _) => HttpClient::builder(),
        (Protocol::H2c, Route::OwnConnections) => HttpClient::builder().http2_only(),
        // HTTP/2 with prior knowledge, and otherwise the defaults.
        (Protocol::H2c, Route::HyperUtilPool) => {
            let mut hyper = Client::builder(TokioExecutor::new());
            hyper
                .http2_only(true)
                .pool_idle_timeout(DEFAULT_POOL_IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new());
            HttpClient::builder().hyper(hyper)
        }
    };
    let client: HttpClient<Full<Bytes>> = builder.build(nginx.backends.clone());

    let started = tokio::time::Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    // The load goes on past the last reload (see below), whatever the count.
    let last = Arc::new(AtomicUsize::new(usize::MAX));
    let outcomes = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let (client, next, done, last, outcomes) = (
            client.clone(),
            next.clone(),
            done.clone(),
            last.clone(),
            outcomes.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS && i >= last.load(Ordering::Relaxed) {
                    return;
                }
                let (id, request) = request(i);
                let method = request.method().clone();
                let outcome = send(&client, request).await;
                outcomes.lock().expect("lock").insert(id, (method, outcome));
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // The reloads, each once a quarter more of the requests are answered;
    // each returns once nginx has started its new worker.
    let reloading = async {
        for quarter in 1..=RELOADS {
            support::wait_until(RUN_LIMIT, || {
                done.load(Ordering::Relaxed) >= quarter * REQUESTS / (RELOADS + 1)
            })
            .await;
            nginx.reload().await;
        }
        // Every reload meets traffic: requests go on while the old workers
        // close their connections, even if the last reload came late.
        last.store(
            next.load(Ordering::Relaxed) + AFTER_LAST_RELOAD,
            Ordering::Relaxed,
        );
    };
    let all_done = async {
        while tasks
            .join_next()
            .await
            .transpose()
            .expect("no task panics")
            .is_some()
        {}
    };
    tokio::time::timeout(RUN_LIMIT, async { tokio::join!(reloading, all_done) })
        .await
        .unwrap_or_else(|_| panic!("{REQUESTS} requests not over within {RUN_LIMIT:?}"));
    let took = started.elapsed();

    let outcomes = Arc::try_unwrap(outcomes)
        .map(|m| m.into_inner().expect("lock"))
        .unwrap_or_else(|_| panic!("every task is over"));
    // nginx writes a request's log line after its response: wait for the
    // line of every request answered. (One that failed for a connection
    // nginx ended was logged before that end, if nginx got it at all.)
    let answered: Vec<&String> = outcomes
        .iter()
        .filter(|(_, (_, outcome))| matches!(outcome, Outcome::Answered(_)))
        .map(|(id, _)| id)
        .collect();
    let log = nginx
        .wait_for_log(|log| {
            let ids: std::collections::HashSet<&str> =
                log.iter().map(|line| line.request_id.as_str()).collect();
            answered.iter().all(|id| ids.contains(id.as_str()))
        })
        .await;
    let mut logged = HashMap::new();
    for line in log {
        // What nginx logged is what the test sent, and nginx answered it.
        assert!(
            nginx.backends.iter().any(|b| b.port() == line.port)
                && line.method
                    == line
                        .request_id
                        .split('-')
                        .next()
                        .unwrap_or("")
                        .to_uppercase()
                && line.uri == format!("/{}", line.request_id)
                && line.status == 200,
            "{line:?}"
        );
        *logged.entry(line.request_id).or_insert(0) += 1;
    }
    Run {
        protocol,
        route,
        outcomes,
        endpoints: client.balancer().endpoints(),
        logged,
        reloads: nginx.reloads(),
        took,
        retries: client.retry_stats(),
    }
}

/// Request `i`: 7 in 10 are GETs, the rest POSTs with a small body.
fn request(i: usize) -> (String, http::Request<Full<Bytes>>) {
    let (method, body) = if i % 10 < 7 {
        (http::Method::GET, Bytes::new())
    } else {
        (http::Method::POST, Bytes::from(format!("order {i}")))
    };
    let id = format!("{}-{i}", method.as_str().to_lowercase());
    let request = http::Request::builder()
        .method(method)
        .uri(format!("/{id}"))
        .header("x-request-id", &id)
        .body(Full::new(body))
        .expect("a valid request");
    (id, request)
}

async fn send(client: &HttpClient<Full<Bytes>>, request: http::Request<Full<Bytes>>) -> Outcome {
    match client.clone().oneshot(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.into_body().collect().await {
                Ok(_) => Outcome::Answered(status),
                Err(e) => Outcome::Failed(FailureKind::of(&e), chain(&e)),
            }
        }
        Err(e) => Outcome::Failed(FailureKind::of(&e), chain(&e)),
    }
}

/// Every message of `error`'s `source()` chain.
fn chain(error: &BoxError) -> String {
    let error: &(dyn std::error::Error + 'static) = error.as_ref();
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

impl Run {
    /// The requests of `method` that failed, or were answered with another
    /// status than 200.
    fn failed(&self, method: http::Method) -> Vec<(&String, FailureKind, String)> {
        self.outcomes
            .iter()
            .filter(|(_, (m, _))| *m == method)
            .filter_map(|(id, (_, outcome))| match outcome {
                Outcome::Failed(kind, message) => Some((id, *kind, message.clone())),
                Outcome::Answered(200) => None,
                Outcome::Answered(status) => {
                    Some((id, FailureKind::Status, format!("answered {status}")))
                }
            })
            .collect()
    }

    /// The numbers of the run, for the closing note.
    fn report(&self) {
        let mut by_kind: BTreeMap<(String, FailureKind), usize> = BTreeMap::new();
        let mut examples: BTreeMap<FailureKind, &String> = BTreeMap::new();
        let mut not_200 = 0;
        // Failures by the quarter of the run their request was in: a reload
        // follows each of the first three.
        let mut by_quarter = [0; RELOADS + 1];
        for (id, (method, outcome)) in &self.outcomes {
            match outcome {
                Outcome::Failed(kind, message) => {
                    let i: usize = id
                        .rsplit('-')
                        .next()
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(0);
                    by_quarter[(i * (RELOADS + 1) / REQUESTS).min(RELOADS)] += 1;
                    *by_kind.entry((method.to_string(), *kind)).or_default() += 1;
                    examples.entry(*kind).or_insert(message);
                }
                Outcome::Answered(status) if *status != 200 => not_200 += 1,
                Outcome::Answered(_) => {}
            }
        }
        eprintln!(
            "nginx {:?} ({:?}): {} requests, {} reloads, {:.2?}; failed {by_kind:?}; answered not 200: {not_200}",
            self.protocol,
            self.route,
            self.outcomes.len(),
            self.reloads,
            self.took,
        );
        eprintln!(
            "  failures by quarter: {by_quarter:?}; retries: {:?}",
            self.retries
        );
        for (kind, message) in examples {
            eprintln!("  e.g. {kind:?}: {message}");
        }
        for e in &self.endpoints {
            eprintln!(
                "  {}: {} requests, {} failures, {} ejections, {:?}",
                e.key, e.requests, e.failures, e.ejections, e.state
            );
        }
    }

    /// The "Done when", on this run: every way it falls short, in
    /// one panic.
    fn assert_done_when(&self) {
        self.report();
        assert!(self.outcomes.len() >= REQUESTS, "{}", self.outcomes.len());
        assert_eq!(self.reloads, RELOADS);
        let mut unmet = Vec::new();

        let ejected: Vec<_> = self
            .endpoints
            .iter()
            .filter(|e| e.ejections > 0)
            .map(|e| format!("{} ({} failures)", e.key, e.failures))
            .collect();
        if !ejected.is_empty() {
            unmet.push(format!("reloads ejected healthy backends: {ejected:?}"));
        }

        let failed_gets = self.failed(http::Method::GET);
        if !failed_gets.is_empty() {
            unmet.push(format!(
                "{} GETs failed, e.g. {:?}",
                failed_gets.len(),
                failed_gets[0]
            ));
        }

        // No POST reached nginx twice.
        let twice: Vec<_> = self
            .logged
            .iter()
            .filter(|(id, n)| id.starts_with("post-") && **n > 1)
            .collect();
        if !twice.is_empty() {
            unmet.push(format!("POSTs nginx got twice: {twice:?}"));
        }

        // A POST that provably never reached nginx was resent, so it did
        // not fail.
        let failed_posts = self.failed(http::Method::POST);
        let not_resent: Vec<_> = failed_posts
            .iter()
            .filter(|(_, kind, _)| kind.proves_never_sent())
            .collect();
        if !not_resent.is_empty() {
            unmet.push(format!(
                "{} of {} failed POSTs provably never reached nginx and were not resent, e.g. {:?}",
                not_resent.len(),
                failed_posts.len(),
                not_resent[0]
            ));
        }

        // A POST that failed is one that nginx got (and then the client
        // may not send it again), or, over HTTP/1.1 only, one written to a
        // keep-alive connection that nginx closed as it reloaded: nginx
        // never read it, but no client can tell that from a request it
        // did read, so it must not be resent either.
        let unexplained: Vec<_> = failed_posts
            .iter()
            .filter(|(id, kind, _)| {
                let reached = self.logged.contains_key(*id);
                let may_have_reached =
                    self.protocol == Protocol::Http1 && *kind == FailureKind::ConnectionLost;
                !reached && !may_have_reached
            })
            .collect();
        if !unexplained.is_empty() {
            unmet.push(format!(
                "{} of {} failed POSTs never reached nginx, e.g. {:?}",
                unexplained.len(),
                failed_posts.len(),
                unexplained[0]
            ));
        }

        assert!(
            unmet.is_empty(),
            "{:?} reloads under load:\n- {}",
            self.protocol,
            unmet.join("\n- ")
        );
    }
}
