//! A real Python grpcio server on loopback (`grpcio_server.py` beside this
//! file), for tests against a gRPC server this project did not write: the
//! standard health service, and `fieldtest.Modes/Work`, whose behaviour the
//! server's [`Mode`] sets. `.ci/run` installs grpcio and
//! grpcio-health-checking when python3 lacks them; a machine without them
//! fails the tests that need them, it does not skip them.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// How long the server gets to start (importing grpcio takes a while).
const STARTUP: Duration = Duration::from_secs(20);

/// The path of the generic method.
pub const WORK: &str = "/fieldtest.Modes/Work";

/// What the server's `Work` method does with each call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Answers at once.
    Serve,
    /// Fails with UNAVAILABLE at once.
    Unavailable,
    /// Works this long, checking the caller's deadline every 5 ms, and
    /// fails with DEADLINE_EXCEEDED when it has run out.
    EnforceDeadline(Duration),
    /// Fails with DEADLINE_EXCEEDED at once when the caller has less time
    /// left than this, the work's length; otherwise works and answers.
    EarlyDeadline(Duration),
    /// Exits the process in the middle of the first call, without an
    /// answer: the call's connection ends under it, as in a crash.
    Exit,
}

impl Mode {
    fn args(self) -> Vec<String> {
        let (name, work) = match self {
            Mode::Serve => ("serve", None),
            Mode::Unavailable => ("unavailable", None),
            Mode::EnforceDeadline(work) => ("enforce-deadline", Some(work)),
            Mode::EarlyDeadline(work) => ("early-deadline", Some(work)),
            Mode::Exit => ("exit", None),
        };
        let mut args = vec![name.to_owned()];
        if let Some(work) = work {
            args.push(format!("--work={}", work.as_secs_f64()));
        }
        args
    }
}

/// A running Python grpcio server, killed on drop.
pub struct GrpcioServer {
    pub addr: SocketAddr,
    /// Holds the server's stdin open: the server also exits when it closes,
    /// should this process die without killing it.
    _process: Child,
}

impl GrpcioServer {
    /// Starts `python3 grpcio_server.py` in `mode` and waits for the port
    /// it bound on 127.0.0.1.
    ///
    /// # Panics
    ///
    /// When python3 or grpcio is missing, or the server does not start:
    /// the panic says what the server wrote.
    pub async fn start(mode: Mode) -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/grpcio_server.py"
        );
        let mut process = Command::new("python3")
            .arg(script)
            .args(mode.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e})"));
        let stdout = process.stdout.take().expect("piped stdout");
        let mut first_line = String::new();
        let read =
            tokio::time::timeout(STARTUP, BufReader::new(stdout).read_line(&mut first_line)).await;
        let port = match read {
            Ok(Ok(_)) => first_line.trim().parse::<u16>().ok(),
            _ => None,
        };
        let Some(port) = port else {
            let _ = process.start_kill();
            let stderr = match process.wait_with_output().await {
                Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            panic!(
                "the grpcio server did not start within {STARTUP:?} (stdout {first_line:?}); \
                 it needs python3 with grpcio and grpcio-health-checking (`bash .ci/run` \
                 installs them):\n{stderr}"
            );
        };
        // From here on its stderr is not read: a server that writes much
        // there would block, and this one writes nothing once started.
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _process: process,
        }
    }
}

impl GrpcioServer {
    /// Stops the process (`SIGSTOP`): its kernel still accepts connections
    /// and takes their bytes, but nothing answers, and nothing is closed.
    pub fn stop(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a stopped process run again (`SIGCONT`).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self
            ._process
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or_else(|| panic!("the server process has exited"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal} to the server: {e}"));
    }
}

/// The addresses of `servers`.
pub fn addrs(servers: &[GrpcioServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.addr).collect()
}

/// Calls `fieldtest.Modes/Work` with `payload`, within `timeout` if given
/// (sent to the server as `grpc-timeout`).
pub async fn work<T>(
    channel: T,
    payload: &'static [u8],
    timeout: Option<Duration>,
) -> Result<Bytes, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tower_lb::BoxError> + Send,
    T::Error: Into<tower_lb::BoxError>,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    let mut request = tonic::Request::new(Bytes::from_static(payload));
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let path = http::uri::PathAndQuery::from_static(WORK);
    grpc.unary(request, path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// A codec of raw bytes: the message is whatever the bytes are, so the
/// generic method needs no generated code on either side.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
