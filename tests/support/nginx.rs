//! A real nginx on loopback, for tests against a server this project did not
//! write: several backends (one `server` block and port each) that answer
//! every request 200 at once, an access log of every request's method, URI
//! and `X-Request-Id`, and reloads (`nginx -s reload`) on demand.
//!
//! nginx runs in the foreground (`daemon off`) with a master and one worker,
//! everything it writes (config, pid, logs, temp files) in a directory of its
//! own that is removed with it. `.ci/run` installs nginx when it is missing;
//! a machine without it fails the tests that need it, it does not skip them.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long nginx gets to start, reload or stop.
const PATIENCE: Duration = Duration::from_secs(10);

/// Which protocol the backends speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (keep-alive, nginx's defaults).
    Http1,
    /// HTTP/2 over plain TCP with prior knowledge (h2c): `listen ... http2`.
    H2c,
}

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The backend's port.
    pub port: u16,
    pub method: String,
    pub uri: String,
    /// The `X-Request-Id` header, `-` when there was none.
    pub request_id: String,
    pub status: u16,
}

/// A running nginx; stopped (and its directory removed) on drop.
pub struct Nginx {
    /// One address per backend.
    pub backends: Vec<SocketAddr>,
    dir: PathBuf,
    master: Child,
    /// Reloads asked for so far.
    reloads: usize,
}

impl Nginx {
    /// Starts nginx with `backends` server blocks speaking `protocol`, on
    /// free ports of 127.0.0.1, and waits until every one accepts
    /// connections.
    ///
    /// # Panics
    ///
    /// When nginx is not installed or does not come up: the panic says why
    /// (nginx's own error log included).
    pub fn start(protocol: Protocol, backends: usize) -> Self {
        let dir = fresh_dir();
        // The ports are found free, then given to nginx: another process may
        // take one in between, so a start that fails on a bound port is
        // tried again with others.
        let mut last_log = String::new();
        for _ in 0..5 {
            let ports = free_ports(backends);
            std::fs::write(dir.join("nginx.conf"), config(&dir, protocol, &ports))
                .unwrap_or_else(|e| panic!("writing nginx.conf in {}: {e}", dir.display()));
            let master = Command::new(nginx())
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run nginx ({e}): install it (`bash .ci/run` does)")
                });
            let mut nginx = Nginx {
                backends: ports
                    .iter()
                    .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
                    .collect(),
                dir: dir.clone(),
                master,
                reloads: 0,
            };
            match nginx.wait_until_listening() {
                Ok(()) => return nginx,
                Err(log) if log.contains("Address already in use") => {
                    last_log = log;
                    // Dropping stops what is left of it, and removes the
                    // directory: make a new one for the next try.
                    drop(nginx);
                    std::fs::create_dir_all(&dir)
                        .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                }
                Err(log) => panic!("nginx did not start:\n{log}"),
            }
        }
        panic!("nginx found no free ports in 5 tries:\n{last_log}")
    }

    /// Waits until every backend accepts a connection; the error log if
    /// nginx exits first or takes too long.
    fn wait_until_listening(&mut self) -> Result<(), String> {
        let start = Instant::now();
        for addr in self.backends.clone() {
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    break;
                }
                if let Ok(Some(status)) = self.master.try_wait() {
                    return Err(format!("nginx exited ({status}):\n{}", self.error_log()));
                }
                if start.elapsed() > PATIENCE {
                    return Err(format!(
                        "{addr} not listening after {PATIENCE:?}:\n{}",
                        self.error_log()
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// `nginx -s reload`, as a deploy or a configuration change does: the
    /// master starts a new worker with the (same) configuration, and the
    /// old one stops gracefully (idle HTTP/1.1 connections closed, HTTP/2
    /// ones sent a GOAWAY, requests in progress finished). Returns once the
    /// new worker has started.
    pub async fn reload(&mut self) {
        let status = tokio::process::Command::new(nginx())
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .args(["-s", "reload"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .unwrap_or_else(|e| panic!("nginx -s reload: {e}"));
        assert!(status.success(), "nginx -s reload: {status}");
        self.reloads += 1;
        // One worker at the start, and one more for every reload.
        let started = self.reloads + 1;
        let wait = Instant::now();
        while self.workers_started() < started {
            assert!(
                wait.elapsed() < PATIENCE,
                "no new worker {PATIENCE:?} after reload {}:\n{}",
                self.reloads,
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reloads asked for so far.
    pub fn reloads(&self) -> usize {
        self.reloads
    }

    fn workers_started(&self) -> usize {
        self.error_log()
            .lines()
            .filter(|line| line.contains("start worker process"))
            .count()
    }

    /// nginx's error log (notice level: starts, reloads, worker exits).
    pub fn error_log(&self) -> String {
        read(&self.dir.join("error.log"))
    }

    /// Every request logged so far, in the order nginx finished them.
    ///
    /// nginx logs a request after sending its response, so a client can
    /// hold the response before the line is written: wait for the lines
    /// you expect (see [`wait_for_log`](Self::wait_for_log)).
    pub fn access_log(&self) -> Vec<Logged> {
        read(&self.dir.join("access.log"))
            .lines()
            .filter_map(parse_line)
            .collect()
    }

    /// Waits (bounded) until the access log is `complete`, and returns it.
    pub async fn wait_for_log(&self, complete: impl Fn(&[Logged]) -> bool) -> Vec<Logged> {
        let start = Instant::now();
        loop {
            let log = self.access_log();
            if complete(&log) {
                return log;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "the access log is not complete after {PATIENCE:?} ({} lines)",
                log.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A SIGKILL to the master alone would leave its worker running (and
        // the ports bound): ask the master to stop, which stops the worker
        // first, and kill only if it does not.
        let _ = Command::new(nginx())
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .args(["-s", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < PATIENCE {
            match self.master.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// nginx's configuration: `ports.len()` backends, each answering
/// `200 ok` to any method (`return` runs before the content phase, so a
/// POST is answered too, its body read and discarded).
fn config(dir: &Path, protocol: Protocol, ports: &[u16]) -> String {
    let dir = dir.display();
    let listen_options = match protocol {
        Protocol::Http1 => "",
        Protocol::H2c => " http2",
    };
    let servers: String = ports
        .iter()
        .map(|port| {
            format!(
                "    server {{\n\
                 \x20       listen 127.0.0.1:{port}{listen_options};\n\
                 \x20       location / {{ return 200 \"ok\\n\"; }}\n\
                 \x20   }}\n"
            )
        })
        .collect();
    // Everything nginx writes stays in `dir`: the packaged defaults
    // (/run/nginx.pid, /var/lib/nginx/...) belong to the system's nginx.
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log notice;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   log_format ids '$server_port $request_method $uri $http_x_request_id $status';\n\
         \x20   access_log {dir}/access.log ids;\n\
         \x20   client_body_temp_path {dir}/client_body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         {servers}\
         }}\n"
    )
}

fn parse_line(line: &str) -> Option<Logged> {
    let mut fields = line.split(' ');
    let port = fields.next()?.parse().ok()?;
    let method = fields.next()?.to_owned();
    let uri = fields.next()?.to_owned();
    let request_id = fields.next()?.to_owned();
    let status = fields.next()?.parse().ok()?;
    Some(Logged {
        port,
        method,
        uri,
        request_id,
        status,
    })
}

fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The nginx binary: the one on `PATH`, else Debian's, which is in
/// `/usr/sbin` (not on every user's `PATH`).
fn nginx() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// `n` distinct ports of 127.0.0.1 that were free a moment ago (all bound
/// at once, so that the OS cannot hand out one twice).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind loopback"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("local addr").port())
        .collect()
}

/// A new, empty directory of this process's own under the temp dir.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tower-lb-nginx-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}
