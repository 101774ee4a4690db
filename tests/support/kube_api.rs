//! A Kubernetes API server on loopback that speaks what EndpointSlice
//! discovery uses of the real one: `list` and `watch` of
//! `discovery.k8s.io/v1` EndpointSlices in one namespace, filtered by the
//! `kubernetes.io/service-name` label, with resource versions, a bounded
//! watch history (a watch from before it gets an `ERROR` event of `410
//! Gone`, or, when asked, an HTTP 410 answer, as some API servers and
//! proxies give), `BOOKMARK` events, dropped watches, and restarts that keep
//! the store (etcd) but not the watch history (the watch cache).
//!
//! The objects are JSON as the API server writes it (`slice`): metadata
//! with owner references and labels, `addressType`, endpoints with
//! conditions, zone, hints, node and target reference, and ports.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The namespace every test Service lives in.
pub const NAMESPACE: &str = "shop";

/// What a test says of one endpoint of a slice.
#[derive(Debug, Clone)]
pub struct Pod {
    pub ip: String,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: String,
    pub hint: Option<String>,
}

impl Pod {
    /// A ready pod at `ip` in `zone`.
    pub fn ready(ip: impl Into<String>, zone: &str) -> Self {
        Self {
            ip: ip.into(),
            ready: true,
            serving: true,
            terminating: false,
            zone: zone.into(),
            hint: None,
        }
    }

    /// Being deleted, still serving.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.terminating = true;
        self
    }

    /// Not ready (starting, or failing its readiness probe).
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }

    /// Hinted for `zone` by the EndpointSlice controller.
    pub fn hinted_for(mut self, zone: &str) -> Self {
        self.hint = Some(zone.into());
        self
    }
}

/// An EndpointSlice of Service `service` named `name`, with one TCP port
/// `port_name` = `port`, as the API server returns it.
pub fn slice(name: &str, service: &str, port_name: &str, port: u16, pods: &[Pod]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let pod_name = format!("{service}-7d9f8b6c5-{i}{}", &name[name.len() - 1..]);
            let mut endpoint = json!({
                "addresses": [pod.ip],
                "conditions": {
                    "ready": pod.ready,
                    "serving": pod.serving,
                    "terminating": pod.terminating
                },
                "nodeName": format!("node-{}", pod.zone),
                "targetRef": {
                    "kind": "Pod",
                    "name": pod_name,
                    "namespace": NAMESPACE,
                    "uid": format!("6a1c2f0e-0000-4000-8000-{:012}", i)
                },
                "zone": pod.zone
            });
            if let Some(hint) = &pod.hint {
                endpoint["hints"] = json!({ "forZones": [{ "name": hint }] });
            }
            endpoint
        })
        .collect();
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": NAMESPACE,
            "uid": format!("0b5e8a7c-1111-4c2d-9e3f-{:0>12}", name.len()),
            "generation": 1,
            "creationTimestamp": "2026-12-01T09:30:00Z",
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service
            },
            "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-01T09:30:00Z"
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "uid": "c7d1e2f3-2222-4a5b-8c6d-000000000001",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": port_name, "protocol": "TCP", "port": port }]
    })
}

/// One request the server answered, as the tests check them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    List,
    /// A watch from this resource version.
    Watch(u64),
}

#[derive(Default)]
struct Store {
    /// The last resource version given out.
    version: u64,
    /// The objects, by name, each with its `resourceVersion`.
    slices: BTreeMap<String, Value>,
    /// Every change since `oldest`: version, type, object.
    history: Vec<(u64, &'static str, Value)>,
    /// A watch from a version before this one is too old: 410 Gone.
    oldest: u64,
    /// Open watch streams, with the Service each asked for and whether it
    /// asked for bookmarks (`allowWatchBookmarks`).
    watches: Vec<(String, bool, mpsc::UnboundedSender<Bytes>)>,
    /// Answer watch requests from too old a version with HTTP 410 rather
    /// than an `ERROR` event.
    gone_as_response: bool,
    seen: Vec<Seen>,
    /// Lists are answered 500.
    fail_lists: bool,
    /// While true, watch requests wait before they are answered.
    held: Option<tokio::sync::watch::Sender<bool>>,
}

/// The fake API server. Dropping it stops it.
pub struct KubeApi {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl KubeApi {
    /// Serves on a fresh loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = Self {
            addr: listener.local_addr().expect("addr"),
            store: Arc::new(Mutex::new(Store::default())),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        api.serve(listener);
        api
    }

    /// A kube client of this server.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("kube client")
    }

    fn serve(&self, listener: TcpListener) {
        let store = self.store.clone();
        let tasks = self.tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                let connection = tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, store.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                lock(&tasks).push(connection.abort_handle());
            }
        });
        lock(&self.tasks).push(accept.abort_handle());
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Creates or updates a slice (from [`slice`]).
    pub fn apply(&self, mut object: Value) {
        let mut store = self.store();
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let kind = if store.slices.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.slices.insert(name, object.clone());
        store.history.push((version, kind, object.clone()));
        store.send(kind, &object);
    }

    /// Deletes a slice.
    pub fn delete(&self, name: &str) {
        let mut store = self.store();
        let Some(mut object) = store.slices.remove(name) else {
            return;
        };
        store.version += 1;
        let version = store.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        store.history.push((version, "DELETED", object.clone()));
        store.send("DELETED", &object);
    }

    /// Other objects change (the resource version moves on) and the
    /// history up to now is compacted; every watch gets a `BOOKMARK` of the
    /// new version, its last line: a client that read it watches again from
    /// there without a 410, one that did not is told 410 Gone.
    pub fn bookmark_compact_and_end_watches(&self) -> u64 {
        let mut store = self.store();
        store.version += 10;
        let version = store.version;
        store.oldest = version + 1;
        store.history.clear();
        let mark = json!({
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": { "resourceVersion": version.to_string() }
        });
        store.send_bookmark(&mark);
        store.watches.clear();
        version
    }

    /// Answers every list with 500 until told otherwise.
    pub fn fail_lists(&self, fail: bool) {
        self.store().fail_lists = fail;
    }

    /// Forgets the watch history up to now (compaction): a watch from an
    /// older version is told 410 Gone.
    pub fn compact(&self) {
        let mut store = self.store();
        store.oldest = store.version + 1;
        store.history.clear();
    }

    /// Ends every watch and holds new ones while `changes` runs, then
    /// forgets the history up to now: the changes reach the clients only
    /// by a new list, after a 410 Gone for the watch they ask for.
    pub fn change_unseen(&self, changes: impl FnOnce(&Self)) {
        let held = tokio::sync::watch::Sender::new(true);
        {
            let mut store = self.store();
            store.held = Some(held.clone());
            store.watches.clear();
        }
        changes(self);
        {
            let mut store = self.store();
            store.oldest = store.version + 1;
            store.history.clear();
            store.held = None;
        }
        held.send_replace(false);
    }

    /// Answers watch requests from too old a version with HTTP 410 rather
    /// than an `ERROR` event.
    pub fn answer_gone_with_status(&self) {
        self.store().gone_as_response = true;
    }

    /// Ends every open watch (the server's watch timeout, a proxy between).
    pub fn drop_watches(&self) {
        self.store().watches.clear();
    }

    /// Writes `line` on every open watch, as it is.
    pub fn send_raw(&self, line: &str) {
        let mut store = self.store();
        let line = Bytes::from(format!("{line}\n"));
        store
            .watches
            .retain(|(_, _, tx)| tx.send(line.clone()).is_ok());
    }

    /// Stops serving: the listener closes and every connection is cut.
    pub fn stop(&self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        self.store().watches.clear();
    }

    /// Serves again on the same address, with the same objects (etcd kept
    /// them) and no watch history (a new watch cache): a watch from before
    /// is told 410 Gone.
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind again");
        self.compact();
        self.serve(listener);
    }

    /// The requests answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.store().seen.clone()
    }

    /// How many lists were answered.
    pub fn lists(&self) -> usize {
        self.seen().iter().filter(|s| **s == Seen::List).count()
    }

    /// How many watch streams are open.
    pub fn open_watches(&self) -> usize {
        let mut store = self.store();
        store.watches.retain(|(_, _, tx)| !tx.is_closed());
        store.watches.len()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Store {
    /// Sends an event of `object` to the watches whose selector it matches.
    fn send(&mut self, kind: &str, object: &Value) {
        let service = object["metadata"]["labels"]["kubernetes.io/service-name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let line = event(kind, object);
        self.watches
            .retain(|(wanted, _, tx)| *wanted != service || tx.send(line.clone()).is_ok());
    }

    /// Sends a `BOOKMARK` to the watches that asked for bookmarks.
    fn send_bookmark(&mut self, mark: &Value) {
        let line = event("BOOKMARK", mark);
        self.watches
            .retain(|(_, asked, tx)| !*asked || tx.send(line.clone()).is_ok());
    }

    fn matching(&self, service: &str) -> Vec<Value> {
        self.slices
            .values()
            .filter(|o| o["metadata"]["labels"]["kubernetes.io/service-name"] == service)
            .cloned()
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn event(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({ "type": kind, "object": object })))
}

type ApiBody = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<ApiBody> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code
    })
}

fn too_old(from: u64) -> Value {
    status(410, "Expired", &format!("too old resource version: {from}"))
}

/// The query's parameters, decoded.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn answer(
    req: Request<Incoming>,
    store: Arc<Mutex<Store>>,
) -> Result<Response<ApiBody>, Infallible> {
    let path = format!("/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices");
    if req.method() != http::Method::GET || req.uri().path() != path {
        let message = format!("no route {} {}", req.method(), req.uri().path());
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", &message),
        ));
    }
    let params = query(&req);
    let service = params
        .get("labelSelector")
        .and_then(|s| s.strip_prefix("kubernetes.io/service-name="))
        .unwrap_or_default()
        .to_owned();
    let watch = params.get("watch").map(String::as_str) == Some("true");
    let held = lock(&store).held.as_ref().map(|held| held.subscribe());
    if let (true, Some(mut held)) = (watch, held) {
        let _ = held.wait_for(|held| !*held).await;
    }
    let mut store = lock(&store);
    if !watch {
        store.seen.push(Seen::List);
        if store.fail_lists {
            let failure = status(500, "InternalError", "etcdserver: request timed out");
            return Ok(json_response(StatusCode::INTERNAL_SERVER_ERROR, &failure));
        }
        let list = json!({
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": { "resourceVersion": store.version.to_string() },
            "items": store.matching(&service)
        });
        return Ok(json_response(StatusCode::OK, &list));
    }
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    store.seen.push(Seen::Watch(from));
    let (tx, rx) = mpsc::unbounded_channel();
    if from + 1 < store.oldest {
        if store.gone_as_response {
            return Ok(json_response(StatusCode::GONE, &too_old(from)));
        }
        // The real API server answers 200 and says so in the stream.
        let _ = tx.send(event("ERROR", &too_old(from)));
        drop(tx);
    } else {
        for (version, kind, object) in &store.history {
            let matches = object["metadata"]["labels"]["kubernetes.io/service-name"] == *service;
            if *version > from && matches {
                let _ = tx.send(event(kind, object));
            }
        }
        let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        store.watches.push((service, bookmarks, tx));
    }
    let mut response = Response::new(WatchBody { rx }.boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// A watch response: each event a line, as it happens; ends when the
/// server drops its sender.
struct WatchBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|line| Ok(Frame::data(line))))
    }
}
