//! The balancer's background task: it consumes the discovery stream, builds
//! new snapshots off the request path, and lets go of drained endpoints. It
//! ends when the last `Balancer` handle is dropped.

use std::fmt;
use std::future::poll_fn;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::oneshot;
use tokio::time::{sleep_until, Instant};
use tower::discover::{Change, Discover};

use super::endpoint::{Endpoint, Shared};
use super::snapshot::{EndpointList, Snapshot};
use super::Inner;
use crate::error::BoxError;
use crate::strategy::Strategy;

/// At most this many changes are applied per snapshot, so that a stream that
/// is always ready cannot starve the rest of the driver.
const MAX_BATCH: usize = 4096;

/// Back-off after a discovery error: first wait, and the cap.
const ERROR_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(1);

struct Batch<K, S, E> {
    changes: Vec<Result<Change<K, S>, E>>,
    ended: bool,
}

impl<K, S, E> Batch<K, S, E> {
    /// The stream may have more ready: let other tasks run before asking.
    fn is_full(&self) -> bool {
        self.changes.len() >= MAX_BATCH
    }
}

/// Everything ready on the stream, up to `MAX_BATCH` or the first error.
async fn next_batch<D: Discover>(mut discover: Pin<&mut D>) -> Batch<D::Key, D::Service, D::Error> {
    poll_fn(|cx| {
        let mut changes = Vec::new();
        loop {
            match discover.as_mut().poll_discover(cx) {
                Poll::Ready(Some(item)) => {
                    let failed = item.is_err();
                    changes.push(item);
                    if failed || changes.len() >= MAX_BATCH {
                        return Poll::Ready(Batch {
                            changes,
                            ended: false,
                        });
                    }
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Batch {
                        changes,
                        ended: true,
                    })
                }
                Poll::Pending if changes.is_empty() => return Poll::Pending,
                Poll::Pending => {
                    return Poll::Ready(Batch {
                        changes,
                        ended: false,
                    })
                }
            }
        }
    })
    .await
}

/// The driver's own view of the endpoints; the published snapshot is derived
/// from it.
struct Endpoints<K, S> {
    active: IndexMap<K, Arc<Endpoint<K, S>>>,
    draining: Vec<Arc<Endpoint<K, S>>>,
}

impl<K, S> Endpoints<K, S>
where
    K: Hash + Eq + Clone + fmt::Debug,
{
    /// Applies one change; returns whether the active set changed.
    fn apply(&mut self, change: Change<K, S>, shared: &Arc<Shared>) -> bool {
        match change {
            Change::Insert(key, service) => {
                let endpoint = Arc::new(Endpoint::new(key.clone(), service, shared.clone()));
                tracing::debug!(endpoint = ?key, "endpoint inserted");
                if let Some(old) = self.active.insert(key, endpoint) {
                    tracing::debug!(endpoint = ?old.key(), "the endpoint's previous service drains");
                    old.start_draining();
                    self.draining.push(old);
                }
                true
            }
            Change::Remove(key) => match self.active.swap_remove(&key) {
                Some(old) => {
                    tracing::debug!(endpoint = ?key, in_flight = old.load().in_flight(), "endpoint removed; draining");
                    old.start_draining();
                    self.draining.push(old);
                    true
                }
                None => {
                    tracing::debug!(endpoint = ?key, "discovery removed an unknown endpoint; ignored");
                    false
                }
            },
        }
    }

    /// Builds and publishes a snapshot of the current state.
    fn publish<P: Strategy>(&mut self, inner: &Inner<K, S, P>) {
        self.draining.retain(|e| e.load().in_flight_seq_cst() > 0);
        let eligible: EndpointList<K, S> = self.active.values().cloned().collect();
        let ctx = inner.shared.pick_context(inner.shared.now_ns());
        let schedule = inner.strategy.schedule(&eligible[..], &ctx);
        inner.snapshot.store(Arc::new(Snapshot {
            eligible,
            draining: self.draining.clone().into_boxed_slice(),
            schedule,
        }));
        inner.published.send_modify(|generation| *generation += 1);
    }
}

/// Runs until `stop` resolves (its sender lives in the balancer's shared
/// state, so that happens when the last handle is dropped).
pub(crate) async fn run<D, P>(
    discover: D,
    inner: Weak<Inner<D::Key, D::Service, P>>,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) where
    D: Discover,
    D::Key: Hash + Eq + Clone + fmt::Debug,
    D::Error: Into<BoxError>,
    P: Strategy,
{
    tokio::pin!(discover);
    let mut endpoints = Endpoints {
        active: IndexMap::new(),
        draining: Vec::new(),
    };
    let mut discovery_open = true;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = ERROR_BACKOFF_MIN;

    loop {
        let mut changed = false;
        let mut more_ready = false;
        tokio::select! {
            biased;
            _ = &mut stop => break,
            batch = async {
                if let Some(at) = retry_at {
                    sleep_until(at).await;
                }
                next_batch(discover.as_mut()).await
            }, if discovery_open => {
                retry_at = None;
                let full = batch.is_full();
                let (mut inserted, mut removed) = (0usize, 0usize);
                for item in batch.changes {
                    match item {
                        Ok(change) => {
                            let is_insert = matches!(change, Change::Insert(..));
                            if endpoints.apply(change, &shared) {
                                changed = true;
                                if is_insert { inserted += 1 } else { removed += 1 }
                            }
                            backoff = ERROR_BACKOFF_MIN;
                        }
                        Err(error) => {
                            let error: BoxError = error.into();
                            tracing::warn!(%error, endpoints = endpoints.active.len(), retry_in = ?backoff,
                                "discovery stream failed; keeping the last known endpoints");
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(ERROR_BACKOFF_MAX);
                        }
                    }
                }
                if changed {
                    tracing::info!(inserted, removed, endpoints = endpoints.active.len(), "endpoints updated");
                }
                more_ready = full;
                if batch.ended {
                    tracing::info!(endpoints = endpoints.active.len(), "discovery stream ended; keeping the last known endpoints");
                    discovery_open = false;
                }
            }
            _ = shared.drained.notified(), if !endpoints.draining.is_empty() => {
                changed = true;
            }
        }
        if changed {
            let Some(inner) = inner.upgrade() else { break };
            endpoints.publish(&inner);
        }
        if more_ready {
            // A full batch: the stream may be always ready; let other tasks
            // on this worker run before asking it again.
            tokio::task::yield_now().await;
        }
    }
    tracing::debug!("balancer driver stopped");
}
