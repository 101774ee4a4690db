//! A real authoritative DNS server on loopback whose records the test changes
//! while it runs (hickory-server 0.25: a `Catalog` over one `InMemoryAuthority`).

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::authority::{Catalog, MessageResponseBuilder, ZoneType};
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryAuthority;
use hickory_server::ServerFuture;
use tokio::net::{TcpListener, UdpSocket};

/// TTL and SOA minimum of the zone's SOA record. A resolver caches a negative
/// answer (NXDOMAIN, no data) for the smaller of the two (RFC 2308), so keep it
/// short: a name added after a negative answer is then seen a second later.
pub const NEGATIVE_TTL: u32 = 1;

/// How long a TCP connection may sit idle before the server closes it.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// An authoritative server for one zone on `127.0.0.1`, UDP and TCP on the
/// same port. Records are changed with the `set_*` methods while it serves.
pub struct TestDns {
    pub addr: SocketAddr,
    origin: Name,
    authority: Arc<InMemoryAuthority>,
    handler: Counting,
    /// `None` while stopped. Dropping a `ServerFuture` aborts its tasks (they
    /// live in a `JoinSet`), which closes the sockets.
    server: Mutex<Option<ServerFuture<Counting>>>,
}

impl TestDns {
    /// Serves zone `origin` (e.g. `"test."`), which starts with only its SOA:
    /// every name in it answers NXDOMAIN until set.
    pub async fn start(origin: &str) -> TestDns {
        let origin = fqdn(origin);
        let authority = Arc::new(InMemoryAuthority::empty(
            origin.clone(),
            ZoneType::Primary,
            false,
        ));
        let soa = SOA::new(
            Name::from_ascii("ns")
                .and_then(|ns| ns.append_domain(&origin))
                .expect("valid SOA mname"),
            Name::from_ascii("hostmaster")
                .and_then(|rname| rname.append_domain(&origin))
                .expect("valid SOA rname"),
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        );
        let inserted = authority
            .upsert(
                Record::from_rdata(origin.clone(), NEGATIVE_TTL, RData::SOA(soa)),
                1,
            )
            .await;
        assert!(inserted, "SOA accepted");

        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![authority.clone()]);
        let handler = Counting {
            catalog: Arc::new(catalog),
            state: Arc::default(),
        };

        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().expect("local addr");
        let dns = TestDns {
            addr,
            origin,
            authority,
            handler,
            server: Mutex::new(None),
        };
        dns.serve(udp, tcp);
        dns
    }

    /// Replaces all A records of `name` (e.g. `"api.test."`) with `ips`, served
    /// with TTL `ttl`. An empty list removes them; a name left with no records
    /// at all then answers NXDOMAIN.
    pub async fn set_a(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        let rdatas = ips.iter().map(|ip| RData::A(A(*ip))).collect();
        self.replace(name, RecordType::A, rdatas, ttl).await;
    }

    /// Replaces all AAAA records of `name`, like [`TestDns::set_a`].
    pub async fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr], ttl: u32) {
        let rdatas = ips.iter().map(|ip| RData::AAAA(AAAA(*ip))).collect();
        self.replace(name, RecordType::AAAA, rdatas, ttl).await;
    }

    /// Replaces all SRV records of `name` (e.g. `"_http._tcp.api.test."`) with
    /// `(priority, weight, port, target)`, like [`TestDns::set_a`].
    pub async fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)], ttl: u32) {
        let rdatas = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                RData::SRV(SRV::new(priority, weight, port, fqdn(target)))
            })
            .collect();
        self.replace(name, RecordType::SRV, rdatas, ttl).await;
    }

    /// How many queries have reached the server, over UDP and TCP, while
    /// serving or failing (not while stopped).
    pub fn queries(&self) -> usize {
        self.handler.state.queries.load(Ordering::SeqCst)
    }

    /// While `true`, every query is answered SERVFAIL (the zone is kept).
    pub fn set_failing(&self, failing: bool) {
        self.handler.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Stops serving: both sockets close, so queries go unanswered (over UDP
    /// the client times out; over TCP the connection is refused).
    pub fn stop(&self) {
        // The tasks are aborted, not awaited: the sockets close when the
        // runtime next drops them, which `resume` waits for.
        drop(self.server.lock().expect("lock").take());
    }

    /// Serves again on the same address, with the records as they are now.
    /// Does nothing if already serving.
    pub async fn resume(&self) {
        if self.server.lock().expect("lock").is_some() {
            return;
        }
        // The aborted tasks may not have been dropped yet, holding the port.
        let start = tokio::time::Instant::now();
        let (udp, tcp) = loop {
            match (
                UdpSocket::bind(self.addr).await,
                TcpListener::bind(self.addr).await,
            ) {
                (Ok(udp), Ok(tcp)) => break (udp, tcp),
                (udp, tcp) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(5),
                        "cannot bind {} again: udp {:?}, tcp {:?}",
                        self.addr,
                        udp.err(),
                        tcp.err()
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        self.serve(udp, tcp);
    }

    fn serve(&self, udp: UdpSocket, tcp: TcpListener) {
        let mut server = ServerFuture::new(self.handler.clone());
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE);
        *self.server.lock().expect("lock") = Some(server);
    }

    async fn replace(&self, name: &str, record_type: RecordType, rdatas: Vec<RData>, ttl: u32) {
        let name = fqdn(name);
        assert!(
            self.origin.zone_of(&name),
            "{name} is outside zone {}",
            self.origin
        );
        let key = RrKey::new(LowerName::new(&name), record_type);
        let mut records = self.authority.records_mut().await;
        if rdatas.is_empty() {
            // Remove the key rather than store an empty set: the authority
            // answers "no data" instead of NXDOMAIN for any name with a key.
            records.remove(&key);
            return;
        }
        // Each record carries its own TTL, and that is what is served.
        let mut set = RecordSet::with_ttl(name.clone(), record_type, ttl);
        for rdata in rdatas {
            set.insert(Record::from_rdata(name.clone(), ttl, rdata), 0);
        }
        records.insert(key, Arc::new(set));
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `name` as a fully qualified name, with or without its final dot.
fn fqdn(name: &str) -> Name {
    let mut name = Name::from_str(name).expect("valid DNS name");
    name.set_fqdn(true);
    name
}

/// A UDP socket and a TCP listener on the same OS-chosen loopback port.
async fn bind_pair() -> (UdpSocket, TcpListener) {
    // The port the OS picks for UDP may be taken for TCP; pick again then.
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind loopback udp");
        let addr = udp.local_addr().expect("local addr");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}

/// The catalog, counting queries and answering SERVFAIL when told to.
#[derive(Clone)]
struct Counting {
    catalog: Arc<Catalog>,
    state: Arc<HandlerState>,
}

#[derive(Default)]
struct HandlerState {
    queries: AtomicUsize,
    failing: AtomicBool,
}

// `RequestHandler` is an `async_trait` trait; this is the signature the macro
// expands to, written out so the tests need no async-trait dependency.
impl RequestHandler for Counting {
    fn handle_request<'life0, 'life1, 'async_trait, R>(
        &'life0 self,
        request: &'life1 Request,
        mut response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            // Counted on arrival, so it is up to date once the client has
            // its answer.
            self.state.queries.fetch_add(1, Ordering::SeqCst);
            if !self.state.failing.load(Ordering::SeqCst) {
                return self.catalog.handle_request(request, response_handle).await;
            }
            let response = MessageResponseBuilder::from_message_request(request)
                .error_msg(request.header(), ResponseCode::ServFail);
            match response_handle.send_response(response).await {
                Ok(info) => info,
                Err(_) => {
                    let mut header = Header::response_from_request(request.header());
                    header.set_response_code(ResponseCode::ServFail);
                    header.into()
                }
            }
        })
    }
}
