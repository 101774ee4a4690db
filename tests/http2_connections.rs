//! `HttpClient::http2_only()`'s own HTTP/2 connections, which speak h2
//! itself rather than through hyper's client: bodies larger than a flow
//! control window both ways, a request body still streaming when its answer
//! comes, the headers HTTP/2 forbids, and a request body that fails,
//! against a hyper HTTP/2 server on loopback (whose windows are hyper's
//! defaults: 1 MiB a stream and a connection).

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::channel::Channel;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use tower::ServiceExt;
use tower_lb::client::{HttpClient, ResponseBody};

/// A hyper HTTP/2 server that answers by path:
/// - `/echo`: the request's body, streamed back as it comes;
/// - `/size`: the length of the request's body, once read whole;
/// - `/big/<n>`: `n` bytes;
/// - `/answer-now`: `ok` at once, the request's body left unread;
/// - `/headers`: the request's header names, one a line;
/// - `/content-length`: the request's `content-length`, or `none`.
struct EchoServer {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    _serving: support::killable::Killable,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let serving = support::killable::Killable::serve(listener, move |stream| {
            counted.fetch_add(1, Ordering::SeqCst);
            support::serve_h2(stream, hyper::service::service_fn(answer))
        });
        Self {
            addr,
            connections,
            _serving: serving,
        }
    }
}

type Answer = http::Response<BoxBody<Bytes, hyper::Error>>;

fn text(text: String) -> Answer {
    http::Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    )
}

async fn answer(req: http::Request<Incoming>) -> Result<Answer, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        "/echo" => http::Response::new(req.into_body().boxed()),
        "/size" => {
            let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
            text(match read {
                Ok(len) => len.to_string(),
                Err(error) => format!("read failed: {error}"),
            })
        }
        // Answered at once, the request's body left unread: hyper resets
        // the stream once the answer is sent.
        "/answer-now" => text("ok".to_owned()),
        "/headers" => text(
            req.headers()
                .keys()
                .map(|name| format!("{name}\n"))
                .collect(),
        ),
        "/content-length" => text(
            req.headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|len| len.to_str().ok())
                .unwrap_or("none")
                .to_owned(),
        ),
        _ => match path.strip_prefix("/big/").and_then(|n| n.parse().ok()) {
            Some(n) => text("x".repeat(n)),
            None => text(format!("no such path: {path}")),
        },
    })
}

fn client<B>(server: &EchoServer) -> HttpClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower_lb::BoxError>,
{
    HttpClient::builder()
        .http2_only()
        .no_attempt_timeout()
        .build::<B>([server.addr])
}

fn request<B>(method: http::Method, path: &str, body: B) -> http::Request<B> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .body(body)
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn read_text(response: http::Response<ResponseBody>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)))
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn a_request_body_larger_than_the_servers_window_arrives_whole() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    let body = Full::new(Bytes::from(vec![7u8; 3 * 1024 * 1024]));
    let response = support::send_ok(&client, request(http::Method::POST, "/size", body)).await;
    assert_eq!(read_text(response).await, (3 * 1024 * 1024).to_string());
}

#[tokio::test]
async fn responses_larger_than_the_clients_windows_are_read_whole_on_one_connection() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    // 12 MiB each, over the 2 MiB stream and 5 MiB connection windows: the
    // second and third come only if the first gave its window back.
    let size = 12 * 1024 * 1024;
    for i in 0..3 {
        let path = format!("/big/{size}");
        let read = async {
            let response =
                support::send_ok(&client, request(http::Method::GET, &path, Full::default())).await;
            read_text(response).await.len()
        };
        let read = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .unwrap_or_else(|_| panic!("response {i} stalled: the window was not given back"));
        assert_eq!(read, size);
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_body_still_streaming_when_its_answer_comes_goes_on_flowing() {
    let server = EchoServer::start().await;
    let client = client::<Channel<Bytes>>(&server);
    let (mut sender, body) = Channel::<Bytes>::new(4);
    sender
        .send_data(Bytes::from_static(b"one"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client
            .clone()
            .oneshot(request(http::Method::POST, "/echo", body)),
    )
    .await
    .unwrap_or_else(|_| panic!("the answer waited for the request body's end"))
    .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)));
    let mut echoed = response.into_body();
    let first = next_frame(&mut echoed)
        .await
        .and_then(|f| f.into_data().ok());
    assert_eq!(first.as_deref(), Some(&b"one"[..]));
    sender
        .send_data(Bytes::from_static(b"two"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let second = next_frame(&mut echoed)
        .await
        .and_then(|f| f.into_data().ok());
    assert_eq!(second.as_deref(), Some(&b"two"[..]));
    drop(sender);
    // The body's end goes as an empty DATA frame with END_STREAM (as
    // hyper's client sends it), which the server echoes.
    while let Some(frame) = next_frame(&mut echoed).await {
        assert!(frame.data_ref().is_some_and(|d| d.is_empty()), "{frame:?}");
    }
}

/// The next frame of `body`, within 5 s.
async fn next_frame(body: &mut ResponseBody) -> Option<http_body::Frame<Bytes>> {
    tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap_or_else(|_| panic!("the echo stalled"))
        .map(|frame| frame.unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e))))
}

#[tokio::test]
async fn headers_http2_forbids_are_taken_out_and_the_request_goes() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    let mut req = request(http::Method::GET, "/headers", Full::default());
    let headers = req.headers_mut();
    for (name, value) in [
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
        ("x-kept", "yes"),
    ] {
        headers.insert(
            http::HeaderName::from_static(name),
            http::HeaderValue::from_static(value),
        );
    }
    let response = support::send_ok(&client, req).await;
    assert_eq!(response.status(), 200);
    let received = read_text(response).await;
    let names: Vec<&str> = received.lines().collect();
    assert!(names.contains(&"x-kept"), "{names:?}");
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
    ] {
        assert!(!names.contains(&gone), "{gone} was sent: {names:?}");
    }
}

#[tokio::test]
async fn a_body_of_known_length_goes_with_its_content_length_as_hyper_sends_it() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    // Given whenever the body says its length, but for an empty body of a
    // method that means nothing by one (RFC 9110), as hyper does.
    for (method, body, said) in [
        (http::Method::POST, "abc", "3"),
        (http::Method::POST, "", "0"),
        (http::Method::GET, "", "none"),
    ] {
        let req = request(method.clone(), "/content-length", Full::from(body));
        let response = support::send_ok(&client, req).await;
        assert_eq!(read_text(response).await, said, "{method} {body:?}");
    }
}

#[tokio::test]
async fn a_response_body_tells_its_length_from_its_content_length() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    let req = request(http::Method::GET, "/big/70000", Full::default());
    let response = support::send_ok(&client, req).await;
    assert_eq!(
        http_body::Body::size_hint(response.body()).exact(),
        Some(70_000)
    );
    assert_eq!(read_text(response).await.len(), 70_000);
}

#[tokio::test]
async fn te_trailers_is_kept() {
    let server = EchoServer::start().await;
    let client = client::<Full<Bytes>>(&server);
    let mut req = request(http::Method::GET, "/headers", Full::default());
    req.headers_mut()
        .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let response = support::send_ok(&client, req).await;
    let received = read_text(response).await;
    assert!(received.lines().any(|name| name == "te"), "{received}");
}

/// The body's error, as a test body raises it.
#[derive(Debug)]
struct BodyBroke;

impl std::fmt::Display for BodyBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the test body broke")
    }
}

impl std::error::Error for BodyBroke {}

#[tokio::test]
async fn a_request_body_that_fails_gives_the_caller_its_own_error() {
    let server = EchoServer::start().await;
    let client = client::<Channel<Bytes, BodyBroke>>(&server);
    let (mut sender, body) = Channel::<Bytes, BodyBroke>::new(4);
    sender
        .send_data(Bytes::from_static(b"part"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    sender.abort(BodyBroke);
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        client
            .clone()
            .oneshot(request(http::Method::POST, "/size", body)),
    )
    .await
    .unwrap_or_else(|_| panic!("a failed body left the call hanging"));
    let error = match result {
        Ok(response) => panic!("answered {} to a broken body", response.status()),
        Err(error) => error,
    };
    let report = tower_lb::error::report(&*error).to_string();
    assert!(report.contains("the test body broke"), "{report}");
}

/// A request body that gives one chunk and then nothing, ever, and says
/// when it is dropped.
struct IdleAfterOneChunk {
    sent: bool,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for IdleAfterOneChunk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.sent {
            return std::task::Poll::Pending;
        }
        self.sent = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            b"chunk",
        )))))
    }
}

impl Drop for IdleAfterOneChunk {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_request_body_still_open_is_let_go_when_the_server_resets_its_stream() {
    let server = EchoServer::start().await;
    let client: HttpClient<IdleAfterOneChunk> = HttpClient::builder()
        .http2_only()
        .no_attempt_timeout()
        .no_retries()
        .no_hedging()
        .build([server.addr]);
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = IdleAfterOneChunk {
        sent: false,
        dropped: dropped.clone(),
    };
    let response = client
        .clone()
        .oneshot(request(http::Method::POST, "/answer-now", body))
        .await
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)));
    assert_eq!(read_text(response).await, "ok");
    // The body has nothing more to send and never will; the server's reset
    // alone must end the sending, or the stream and its connection stay
    // open for as long as the body does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request body was held after the server reset its stream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn calls_beyond_the_servers_stream_limit_wait_their_turn_and_all_complete() {
    // One stream at a time, each answered after 20 ms; the most at once
    // is recorded.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (at_once, highest) = (now.clone(), most.clone());
    let _serving = support::killable::Killable::serve(listener, move |stream| {
        let (at_once, highest) = (at_once.clone(), highest.clone());
        async move {
            let service = hyper::service::service_fn(move |_req: http::Request<Incoming>| {
                let (at_once, highest) = (at_once.clone(), highest.clone());
                async move {
                    let current = at_once.fetch_add(1, Ordering::SeqCst) + 1;
                    highest.fetch_max(current, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    at_once.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, Infallible>(text("ok".to_owned()))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(1)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        }
    });
    let client: HttpClient<Full<Bytes>> = HttpClient::builder()
        .http2_only()
        .no_attempt_timeout()
        .build([addr]);
    // Once the server's SETTINGS are in, every call but one waits.
    support::send_ok(&client, request(http::Method::GET, "/", Full::default())).await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let response = tokio::time::timeout(
                    Duration::from_secs(10),
                    support::send_ok(&client, request(http::Method::GET, "/", Full::default())),
                )
                .await
                .unwrap_or_else(|_| panic!("a waiting call was never let in"));
                read_text(response).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap_or_else(|e| panic!("{e}")));
    }
    // Every waiting call was let in (the 10 s bound above fails a call the
    // queue never wakes: checked with its wake-up taken out), none refused.
    assert!(answers.iter().all(|a| a == "ok"), "{answers:?}");
    // hyper itself refuses a stream over its limit, so this holds whoever
    // queues; it says the server was never given two at once.
    assert_eq!(most.load(Ordering::SeqCst), 1);
}
