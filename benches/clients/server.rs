//! The servers, in a process of their own: the bench binary runs itself
//! again with [`ROLE_ENV`] set, binds four HTTP/1.1, four h2 and four gRPC
//! servers on loopback, prints their ports on one line and serves until its
//! standard input closes. [`ServerProcess`] is the parent's side: it starts
//! the child, reads the ports, and kills the child when dropped, so that the
//! servers go away on an error or a panic too.
//!
//! The servers run apart so that `getrusage(RUSAGE_SELF)` in the parent
//! counts the client's work alone, and on a core of their own so that they
//! do not take the client's.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::BoxError;

/// Set in the child's environment: the id of the core to pin the servers
/// to, or `none`.
pub const ROLE_ENV: &str = "TOWER_LB_CLIENTS_BENCH_SERVER";

/// Servers of each kind.
pub const SERVERS_PER_KIND: usize = 4;

/// How long the child may take to print its ports.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The body of every HTTP answer.
pub const HTTP_BODY: &[u8] = b"ok";

/// The kinds of server, in the order of the ports line.
const KINDS: [&str; 3] = ["h1", "h2", "grpc"];

/// The servers' ports, by kind.
#[derive(Clone, Debug)]
pub struct Ports {
    pub h1: Vec<SocketAddr>,
    pub h2: Vec<SocketAddr>,
    pub grpc: Vec<SocketAddr>,
}

impl Ports {
    /// Reads the child's line: `ports h1=P,P,P,P h2=P,P,P,P grpc=P,P,P,P
    /// pinned=CORE|none`. Returns the ports and the core the child pinned
    /// itself to.
    fn parse(line: &str) -> Result<(Self, Option<usize>), BoxError> {
        let mut words = line.split_whitespace();
        if words.next() != Some("ports") {
            return Err(format!("expected a line starting with `ports`, got {line:?}").into());
        }
        let mut found: [Option<Vec<SocketAddr>>; 3] = [None, None, None];
        let mut pinned = None;
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| format!("`{word}` in {line:?} is not key=value"))?;
            if key == "pinned" {
                pinned = value.parse::<usize>().ok();
                continue;
            }
            let slot = KINDS
                .iter()
                .position(|kind| *kind == key)
                .ok_or_else(|| format!("unknown server kind `{key}` in {line:?}"))?;
            let addrs = value
                .split(',')
                .map(|port| {
                    port.parse::<u16>()
                        .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                        .map_err(|e| format!("bad port `{port}` for {key} in {line:?}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if addrs.len() != SERVERS_PER_KIND {
                return Err(format!(
                    "{} {key} ports in {line:?}, expected {SERVERS_PER_KIND}",
                    addrs.len()
                )
                .into());
            }
            found[slot] = Some(addrs);
        }
        let [h1, h2, grpc] = found;
        let missing = |kind: &str| format!("no {kind} ports in {line:?}");
        Ok((
            Self {
                h1: h1.ok_or_else(|| missing("h1"))?,
                h2: h2.ok_or_else(|| missing("h2"))?,
                grpc: grpc.ok_or_else(|| missing("grpc"))?,
            },
            pinned,
        ))
    }
}

/// The server process, seen from the bench: killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// Held open: the child exits when it closes, even if this process dies
    /// without running `Drop` (killed with SIGKILL, say).
    stdin: Option<ChildStdin>,
    pub ports: Ports,
    /// The core the servers are pinned to, if they are.
    pub pinned: Option<usize>,
}

impl ServerProcess {
    /// Starts this executable again as the server process, pinned to `core`
    /// when one is given, and waits for its ports.
    pub fn spawn(core: Option<usize>) -> Result<Self, BoxError> {
        let exe = std::env::current_exe().map_err(|e| {
            format!("cannot find this bench's executable to start the server process: {e}")
        })?;
        let mut child = Command::new(&exe)
            .env(
                ROLE_ENV,
                core.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the server process {}: {e}", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        // From here on the guard kills the child on every way out.
        let mut process = Self {
            child,
            stdin,
            ports: Ports {
                h1: Vec::new(),
                h2: Vec::new(),
                grpc: Vec::new(),
            },
            pinned: None,
        };
        let stdout = stdout.ok_or("the server process has no stdout pipe")?;
        // A blocking read, bounded: on a thread, with a timeout on the answer.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            Ok(Ok(_)) => {
                return Err(format!(
                    "the server process closed its stdout without printing its ports ({})",
                    process.status()
                )
                .into())
            }
            Ok(Err(e)) => {
                return Err(format!("cannot read the server process's ports line: {e}").into())
            }
            Err(_) => {
                return Err(format!(
                    "the server process printed no ports line within {START_TIMEOUT:?} ({})",
                    process.status()
                )
                .into())
            }
        };
        let (ports, pinned) = Ports::parse(line.trim())
            .map_err(|e| format!("the server process's ports line is wrong: {e}"))?;
        process.ports = ports;
        process.pinned = pinned;
        Ok(process)
    }

    /// Whether the child is still running, for error messages.
    fn status(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(status)) => format!("it exited: {status}"),
            Ok(None) => "it is still running".to_owned(),
            Err(e) => format!("its status is unknown: {e}"),
        }
    }

    /// Reads the server process's CPU time.
    pub fn cpu(&self) -> ServerCpu {
        ServerCpu {
            pid: self.child.id(),
        }
    }

    /// An error if the server process has exited.
    pub fn check_alive(&mut self) -> Result<(), BoxError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the server process exited: {status}").into()),
            Err(e) => Err(format!("cannot tell whether the server process runs: {e}").into()),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the server process's CPU time (user + system, all its threads)
/// from `/proc/PID/stat`, to tell whether the servers' core was the
/// bottleneck of a run.
#[derive(Clone, Copy, Debug)]
pub struct ServerCpu {
    pid: u32,
}

impl ServerCpu {
    /// Linux reports CPU time in `/proc` in units of `USER_HZ`, which is
    /// 100 on every architecture Linux has (the kernel scales its own
    /// tick rate to it for user space).
    const TICKS_PER_SECOND: u64 = 100;

    /// The CPU time so far, or an error when `/proc` does not have it (not
    /// Linux, say).
    pub fn read(self) -> Result<Duration, BoxError> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read the server process's {path}: {e}"))?;
        // The command name, in parentheses, may hold spaces: the fields
        // that follow start after the last `)`, with the state (field 3);
        // utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |index: usize| {
            fields
                .get(index)
                .and_then(|field| field.parse::<u64>().ok())
                .ok_or_else(|| format!("{path} has no CPU time in field {}: {stat:?}", index + 3))
        };
        let total = ticks(11)? + ticks(12)?;
        Ok(Duration::from_millis(total * 1000 / Self::TICKS_PER_SECOND))
    }
}

/// The child's side: pins itself to `core` (`none` for no pinning), serves
/// on a current-thread runtime, prints the ports line, and returns when its
/// standard input closes.
pub fn run_child(core: &str) -> Result<(), BoxError> {
    let pinned = match core.parse::<usize>() {
        Ok(id) if core_affinity::set_for_current(core_affinity::CoreId { id }) => Some(id),
        Ok(id) => {
            eprintln!("server process: could not pin itself to core {id}; running unpinned");
            None
        }
        Err(_) => None,
    };
    // Threads made later (tokio's blocking pool, for stdin) inherit the
    // pinning.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("server process: cannot build its tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let mut line = String::from("ports");
        for kind in KINDS {
            let mut ports = Vec::with_capacity(SERVERS_PER_KIND);
            for _ in 0..SERVERS_PER_KIND {
                let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .await
                    .map_err(|e| format!("server process: cannot bind a {kind} server: {e}"))?;
                let port = listener
                    .local_addr()
                    .map_err(|e| format!("server process: a {kind} server has no address: {e}"))?
                    .port();
                ports.push(port.to_string());
                tokio::spawn(accept(listener, kind));
            }
            line.push_str(&format!(" {kind}={}", ports.join(",")));
        }
        match pinned {
            Some(core) => line.push_str(&format!(" pinned={core}")),
            None => line.push_str(" pinned=none"),
        }
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("server process: cannot print its ports: {e}"))?;
        drop(stdout);
        // Serve until the bench closes our stdin (or dies).
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        Ok::<(), BoxError>(())
    })
}

/// Accepts connections for ever, serving each as `kind` says.
async fn accept(listener: TcpListener, kind: &'static str) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                eprintln!("server process: accept failed on a {kind} server: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Answers are one small write each: do not wait for an ACK.
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, kind));
    }
}

/// Serves one connection until the client closes it.
async fn serve(stream: TcpStream, kind: &'static str) {
    let io = TokioIo::new(stream);
    let hello = service_fn(|_request: http::Request<hyper::body::Incoming>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
            HTTP_BODY,
        ))))
    });
    // Errors here are the client going away: nothing to report.
    let _ = match kind {
        "h1" => {
            hyper::server::conn::http1::Builder::new()
                .serve_connection(io, hello)
                .await
        }
        "h2" => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, hello)
                .await
        }
        _ => {
            // tonic-health's own service; its overall ("") status starts
            // as SERVING, which is what the bench asks for.
            let (_reporter, health) = tonic_health::server::health_reporter();
            let health = TowerToHyperService::new(health);
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, health)
                .await
        }
    };
}
