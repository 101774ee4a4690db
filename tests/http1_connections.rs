//! `HttpClient`'s own HTTP/1.1 connections (its default route): which
//! connection a request goes on, and what it writes there, against plain
//! TCP servers on loopback that read every request head and count every
//! connection.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tower_lb::client::{HttpClient, ResponseBody};

use support::send_ok as send;

type Body = Full<Bytes>;

/// How the server answers each request on a connection.
#[derive(Clone, Copy)]
struct Behaviour {
    /// How long each answer's head is held back after the request.
    head_delay: Duration,
    /// How long the body of each answer is held back after its head.
    body_delay: Duration,
    /// How long the server keeps a connection open with no request on it.
    idle_close: Option<Duration>,
}

impl Behaviour {
    const KEEP_ALIVE: Self = Self {
        head_delay: Duration::ZERO,
        body_delay: Duration::ZERO,
        idle_close: None,
    };

    fn head_after(delay: Duration) -> Self {
        Self {
            head_delay: delay,
            ..Self::KEEP_ALIVE
        }
    }

    fn body_after(delay: Duration) -> Self {
        Self {
            body_delay: delay,
            ..Self::KEEP_ALIVE
        }
    }

    fn closing_when_idle_for(limit: Duration) -> Self {
        Self {
            idle_close: Some(limit),
            ..Self::KEEP_ALIVE
        }
    }
}

/// A plain TCP server speaking just enough HTTP/1.1: it answers every
/// request `200` with the body `ok`, keeps the connection open, records
/// each request's head and counts the connections it accepts.
struct Server {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (counted, recorded) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, behaviour, recorded.clone()));
            }
        });
        Self {
            addr,
            connections,
            heads,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Serves one connection: reads heads (the requests have no body), answers
/// each, until the client closes or the idle limit passes.
async fn serve(mut stream: TcpStream, behaviour: Behaviour, heads: Arc<Mutex<Vec<String>>>) {
    // The head and the body go in two writes: without it the body waits for
    // the client's delayed ACK (Nagle), 40 ms an answer.
    let _ = stream.set_nodelay(true);
    let mut buffer = Vec::new();
    loop {
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            let read = match behaviour.idle_close {
                Some(limit) => match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
                    Ok(read) => read,
                    Err(_) => return,
                },
                None => stream.read(&mut chunk).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let end = buffer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |at| at + 4);
        let head: Vec<u8> = buffer.drain(..end).collect();
        if let Ok(mut heads) = heads.lock() {
            heads.push(String::from_utf8_lossy(&head).into_owned());
        }
        let answered = async {
            tokio::time::sleep(behaviour.head_delay).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
                .await?;
            tokio::time::sleep(behaviour.body_delay).await;
            stream.write_all(b"ok").await
        };
        if answered.await.is_err() {
            return;
        }
    }
}

fn get(path: &str) -> http::Request<Body> {
    http::Request::get(path)
        .body(Full::new(Bytes::new()))
        .expect("a valid request")
}

async fn read_whole(response: http::Response<ResponseBody>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_else(|e| panic!("{}", tower_lb::error::report(&*e)))
}

/// Sends `count` requests at once and reads every answer whole.
async fn all_answered_at_once(client: &HttpClient<Body>, count: usize) {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..count {
        let client = client.clone();
        calls.spawn(async move { read_whole(send(&client, get("/")).await).await });
    }
    while let Some(body) = calls.join_next().await {
        assert_eq!(body.expect("joined"), "ok");
    }
}

#[tokio::test]
async fn requests_one_after_another_share_one_connection() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    for _ in 0..10 {
        assert_eq!(read_whole(send(&client, get("/")).await).await, "ok");
    }
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn requests_at_once_each_get_a_connection_which_later_ones_reuse() {
    let server = Server::start(Behaviour::body_after(Duration::from_millis(100))).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    for _round in 0..3 {
        all_answered_at_once(&client, 5).await;
    }
    assert_eq!(server.connections(), 5);
}

#[tokio::test]
async fn a_connection_whose_answer_is_still_being_read_is_not_given_to_another_request() {
    let server = Server::start(Behaviour::body_after(Duration::from_millis(1_500))).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    // The first answer's head is in; its body is 1.5 s away.
    let first = send(&client, get("/first")).await;
    let second = tokio::spawn({
        let client = client.clone();
        async move { read_whole(send(&client, get("/second")).await).await }
    });
    // The second request went out at once, on a connection of its own:
    // the server has its head long before the first body is done.
    support::wait_until(Duration::from_millis(1_000), || server.heads().len() == 2).await;
    assert_eq!(server.connections(), 2);
    assert_eq!(read_whole(first).await, "ok");
    assert_eq!(second.await.expect("joined"), "ok");
    // Both were kept: two requests at once find one each.
    all_answered_at_once(&client, 2).await;
    assert_eq!(server.connections(), 2);
}

#[tokio::test]
async fn connections_the_server_closed_while_idle_lose_no_request() {
    // The server closes a connection 30 ms after its last answer (gunicorn
    // does after 2 s); the client's next request comes 60 ms later, with no
    // retries to hide a request lost on a closed connection. Either the
    // pool sees the close and passes the connection by, or hyper gives the
    // request back unsent and the pool sends it on another: both must hold
    // for no request to fail whichever way the race goes.
    let server = Server::start(Behaviour::closing_when_idle_for(Duration::from_millis(30))).await;
    let client = HttpClient::builder()
        .no_retries()
        .build::<Body>([server.addr]);
    for _ in 0..8 {
        assert_eq!(read_whole(send(&client, get("/")).await).await, "ok");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(server.connections(), 8);
}

#[tokio::test]
async fn a_request_for_a_path_names_the_endpoints_address_as_its_host_and_the_path_as_its_target() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    read_whole(send(&client, get("/orders/7?full=1")).await).await;
    read_whole(send(&client, get("http://shop.example/cart")).await).await;
    read_whole(send(&client, get("http://user:secret@shop.example:80/cart")).await).await;
    let heads = server.heads();
    assert!(
        heads[0].starts_with("GET /orders/7?full=1 HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    let host = format!("host: {}\r\n", server.addr);
    assert!(
        heads[0].to_ascii_lowercase().contains(&host),
        "{}",
        heads[0]
    );
    // An absolute URI's authority is its Host, and the target is its path.
    assert!(
        heads[1].starts_with("GET /cart HTTP/1.1\r\n"),
        "{}",
        heads[1]
    );
    assert!(
        heads[1]
            .to_ascii_lowercase()
            .contains("host: shop.example\r\n"),
        "{}",
        heads[1]
    );
    // Without the user information, or the scheme's default port.
    assert!(
        heads[2]
            .to_ascii_lowercase()
            .contains("host: shop.example\r\n"),
        "{}",
        heads[2]
    );
    assert!(!heads[2].contains("secret"), "{}", heads[2]);
}

#[tokio::test]
async fn a_response_says_which_server_answered_as_hyper_utils_client_does() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    let response = send(&client, get("/")).await;
    let info = response
        .extensions()
        .get::<hyper_util::client::legacy::connect::HttpInfo>()
        .expect("HttpInfo in the response");
    assert_eq!(info.remote_addr(), server.addr);
}

#[tokio::test]
async fn with_an_idle_timeout_of_zero_no_connection_is_kept() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder()
        .pool_idle_timeout(Duration::ZERO)
        .build::<Body>([server.addr]);
    for _ in 0..3 {
        read_whole(send(&client, get("/")).await).await;
    }
    assert_eq!(server.connections(), 3);
}

#[tokio::test]
async fn an_idle_connection_is_closed_by_the_client_once_the_timeout_passes() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder()
        .pool_idle_timeout(Duration::from_millis(200))
        .build::<Body>([server.addr]);
    read_whole(send(&client, get("/")).await).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    read_whole(send(&client, get("/")).await).await;
    assert_eq!(server.connections(), 1, "idle for half the timeout: reused");
    tokio::time::sleep(Duration::from_millis(300)).await;
    read_whole(send(&client, get("/")).await).await;
    assert_eq!(server.connections(), 2, "idle past the timeout: a new one");
}

#[tokio::test]
async fn a_request_of_another_http_version_is_refused_by_name_and_never_sent() {
    let server = Server::start(Behaviour::KEEP_ALIVE).await;
    let client = HttpClient::builder().build::<Body>([server.addr]);
    for version in [http::Version::HTTP_2, http::Version::HTTP_09] {
        let mut req = get("/");
        *req.version_mut() = version;
        let error = client
            .clone()
            .oneshot(req)
            .await
            .expect_err("only HTTP/1.0 and 1.1 go on HTTP/1.1 connections");
        let report = tower_lb::error::report(&*error).to_string();
        assert!(
            report.contains("cannot go over the endpoint's HTTP/1.1 connections"),
            "{report}"
        );
        assert!(tower_lb::error::is_never_sent(&*error), "{report}");
    }
    assert!(server.heads().is_empty());
    // The connections are fine: a request of version 1.1 is answered.
    assert_eq!(read_whole(send(&client, get("/")).await).await, "ok");
}

#[tokio::test]
async fn a_connection_whose_answer_took_longer_than_the_idle_timeout_is_reused() {
    // The idle time counts from the answer, not from the request.
    let server = Server::start(Behaviour::head_after(Duration::from_millis(400))).await;
    let client = HttpClient::builder()
        .pool_idle_timeout(Duration::from_millis(200))
        .build::<Body>([server.addr]);
    for _ in 0..3 {
        read_whole(send(&client, get("/")).await).await;
    }
    assert_eq!(server.connections(), 1);
}
