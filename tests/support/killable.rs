//! A listener and its connections that a test can kill the hard way.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Serves a listener until killed: the accept loop and every connection run
/// in one task set, so that [`Killable::kill`] closes the port at once and
/// aborts every connection (their peers see a TCP reset: accepted sockets
/// get a zero linger).
#[derive(Clone)]
pub struct Killable {
    tasks: Arc<Mutex<Tasks>>,
}

struct Tasks {
    /// `None` once killed: the port refuses connections.
    listener: Option<TcpListener>,
    /// The accept loop and one task per connection.
    set: JoinSet<()>,
}

impl Killable {
    /// Accepts connections on `listener` and runs `serve` on each, until
    /// killed. Accepted sockets have a zero linger and no Nagle delay (a
    /// response is several small writes, which Nagle would hold back for
    /// the client's delayed ACK, 40 ms on Linux).
    pub fn serve<F, Fut>(listener: TcpListener, serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tasks = Arc::new(Mutex::new(Tasks {
            listener: Some(listener),
            set: JoinSet::new(),
        }));
        let accept = accept_loop(tasks.clone(), serve);
        tasks.lock().expect("lock").set.spawn(accept);
        Self { tasks }
    }

    /// Closes the port (connections are refused once this returns) and
    /// aborts every connection.
    pub fn kill(&self) {
        // A poisoned lock still holds the listener: kill it anyway.
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Dropping the listener closes the socket now; aborting the accept
        // task alone would close it only when the runtime next polls it.
        tasks.listener = None;
        tasks.set.abort_all();
    }
}

async fn accept_loop<F, Fut>(tasks: Arc<Mutex<Tasks>>, serve: F)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        // The listener stays in the shared slot (locked only within a poll)
        // so that `kill` can drop it at once.
        let accepted = std::future::poll_fn(|cx| {
            let tasks = tasks.lock().expect("lock");
            match tasks.listener.as_ref() {
                Some(listener) => listener.poll_accept(cx).map(Some),
                None => std::task::Poll::Ready(None),
            }
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok((stream, _))) => stream,
            Some(Err(_)) => {
                // Out of descriptors and the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        // Zero linger: a dropped connection is a TCP reset, not an orderly
        // close. (A zero linger never blocks; the method is deprecated for
        // the other values.)
        #[allow(deprecated)]
        let _ = stream.set_linger(Some(Duration::ZERO));
        let _ = stream.set_nodelay(true);
        let connection = serve(stream);
        let mut tasks = tasks.lock().expect("lock");
        if tasks.listener.is_none() {
            // Killed between the accept and now: drop the connection.
            return;
        }
        // Forget the connections that are over.
        while tasks.set.try_join_next().is_some() {}
        tasks.set.spawn(connection);
    }
}
