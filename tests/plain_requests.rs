//! A request type of the user's own, with no `http::Extensions`: it carries
//! its `CallContext` in a field, and the deadline, retry, hedge and balancer
//! layers work on it as on an `http::Request`. The endpoints are real TCP
//! servers on loopback speaking a one-line protocol.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tower::{ServiceBuilder, ServiceExt};
use tower_lb::error::BoxError;
use tower_lb::request::{
    CallContext, HasCallContext, NotReplayable, Replayable, Safety, TriedEndpoints,
};
use tower_lb::retry::{ErrorsOnly, RetryBudget, RetryLayer, RetryPolicy};
use tower_lb::strategy::P2c;
use tower_lb::timeout::{CallDeadline, DeadlineLayer};
use tower_lb::{discover, Balancer};

/// A key lookup: the whole request, with its call context in a field.
#[derive(Clone)]
struct Lookup {
    key: String,
    call: Option<CallContext>,
}

impl Lookup {
    fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            call: None,
        }
    }
}

impl HasCallContext for Lookup {
    fn call_context(&self) -> Option<&CallContext> {
        self.call.as_ref()
    }

    fn call_context_mut(&mut self) -> &mut CallContext {
        self.call.get_or_insert_with(CallContext::new)
    }
}

impl Replayable for Lookup {
    fn safety(&self) -> Safety {
        Safety::Safe
    }

    fn replay(&self) -> Result<Self, NotReplayable> {
        Ok(self.clone())
    }
}

/// A server that answers each line with `<port> <key>`, or, when `broken`,
/// hangs up on every connection without answering. Counts the lines it read.
struct LineServer {
    addr: SocketAddr,
    lines: Arc<AtomicUsize>,
}

async fn line_server(broken: bool) -> LineServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let lines = Arc::new(AtomicUsize::new(0));
    let counted = lines.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                if BufReader::new(read).read_line(&mut line).await.is_err() {
                    return;
                }
                counted.fetch_add(1, Ordering::SeqCst);
                if !broken {
                    let answer = format!("{} {}", addr.port(), line.trim_end());
                    let _ = write.write_all(answer.as_bytes()).await;
                }
            });
        }
    });
    LineServer { addr, lines }
}

/// What an endpoint saw of a request: the answer, and the deadline it
/// carried.
#[derive(Debug)]
struct Answer {
    text: String,
    deadline: Option<CallDeadline>,
}

/// The endpoint for `addr`: one connection per lookup; an empty answer (the
/// server hung up) is an error.
fn endpoint(
    addr: SocketAddr,
) -> impl tower::Service<Lookup, Response = Answer, Error = BoxError, Future: Send> + Clone {
    tower::service_fn(move |req: Lookup| async move {
        let deadline = CallDeadline::of(&req);
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("{}\n", req.key).as_bytes())
            .await?;
        let mut text = String::new();
        BufReader::new(stream).read_line(&mut text).await?;
        if text.is_empty() {
            return Err(BoxError::from(format!("{addr} hung up without answering")));
        }
        Ok(Answer { text, deadline })
    })
}

#[tokio::test]
async fn a_plain_request_type_gets_a_deadline_retries_and_untried_endpoints() {
    // One server hangs up, one answers. P2C picks between the two at random
    // (nothing is in flight between sequential lookups), so a retry that
    // did not avoid the endpoint its call tried would go back to the broken
    // one about every other time: over 60 lookups, some surely would.
    let broken = line_server(true).await;
    let healthy = line_server(false).await;
    let endpoints = [broken.addr, healthy.addr]
        .into_iter()
        .map(|addr| (addr, endpoint(addr)));
    let balancer = Balancer::builder()
        .strategy(P2c::least_requests())
        .avoid_tried_endpoints()
        .build(discover::fixed(endpoints));
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(RetryLayer::new(
            RetryPolicy::new().retry_on(ErrorsOnly),
            RetryBudget::new().min_per_second(1_000),
        ))
        .service(balancer);

    let mut attempts = 0;
    for n in 0..60 {
        let tried = TriedEndpoints::new();
        let mut req = Lookup::new(&format!("key-{n}"));
        *req.call_context_mut() = CallContext::new().with_tried(tried.clone());
        let answer = client
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|e| panic!("lookup {n}: {e}"));
        assert!(
            answer.text.ends_with(&format!("key-{n}")),
            "{:?}",
            answer.text
        );
        let deadline = answer.deadline.expect("the deadline reached the endpoint");
        assert_eq!(deadline.budget(), Duration::from_secs(5));
        assert!(
            (1..=2).contains(&tried.attempts()),
            "lookup {n} took {} attempts: a retry went back to the broken server",
            tried.attempts()
        );
        attempts += tried.attempts();
    }
    let to_broken = broken.lines.load(Ordering::SeqCst);
    let to_healthy = healthy.lines.load(Ordering::SeqCst);
    assert_eq!(
        to_healthy, 60,
        "each lookup answered once, never twice by a healthy server"
    );
    assert!(to_broken > 0, "P2C sent some lookups to the broken server");
    assert_eq!(
        attempts,
        to_broken + to_healthy,
        "every attempt was recorded in the call's context, through its field"
    );
}

#[tokio::test]
async fn a_plain_request_type_keeps_the_earlier_of_two_deadlines() {
    let server = line_server(false).await;
    let balancer =
        Balancer::builder().build(discover::fixed([(server.addr, endpoint(server.addr))]));
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(30)))
        .service(balancer);

    let mut req = Lookup::new("short");
    req.call_context_mut()
        .tighten_deadline(CallDeadline::after(Duration::from_secs(2)));
    let answer = client.oneshot(req).await.unwrap_or_else(|e| panic!("{e}"));
    let deadline = answer.deadline.expect("a deadline");
    assert_eq!(
        deadline.budget(),
        Duration::from_secs(2),
        "the caller's earlier deadline stands"
    );
}
