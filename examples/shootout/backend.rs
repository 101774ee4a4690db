//! One backend's behaviour as running code: the same `Backend::handle` answers
//! both the real hyper servers and the simulated endpoints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::time::{sleep_until, Instant};

use crate::scenario::{BackendSpec, Stall};

/// A backend's state during one run.
#[derive(Debug)]
pub struct Backend {
    spec: BackendSpec,
    epoch: Instant,
    hits: AtomicU64,
    queue: Option<Semaphore>,
    /// Seeded per backend, so a simulated run repeats exactly.
    rng: Mutex<SmallRng>,
}

impl Backend {
    pub fn new(spec: BackendSpec, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            queue: spec.capacity.map(Semaphore::new),
            spec,
            epoch: Instant::now(),
            hits: AtomicU64::new(0),
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Serves one request: waits as the spec says, then gives the status.
    pub async fn handle(&self) -> StatusCode {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let (fails, slow) = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            (
                rng.random_bool(self.spec.error_rate.clamp(0.0, 1.0)),
                rng.random_bool(self.spec.slow_rate.clamp(0.0, 1.0)),
            )
        };
        let _permit = match &self.queue {
            Some(queue) => queue.acquire().await.ok(),
            None => None,
        };
        if fails {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let work = if slow {
            self.spec.latency * self.spec.slow_factor
        } else {
            self.spec.latency
        };
        let now = Instant::now();
        let start = self.after_stall(now);
        let done = self.after_stall(start + work);
        sleep_until(done).await;
        StatusCode::OK
    }

    /// `t`, or the end of the stall `t` falls in.
    fn after_stall(&self, t: Instant) -> Instant {
        let Some(Stall { every, pause }) = self.spec.stall else {
            return t;
        };
        let since = t.saturating_duration_since(self.epoch);
        let every_ns = every.as_nanos().max(1);
        let phase = Duration::from_nanos((since.as_nanos() % every_ns) as u64);
        let stall_starts = every.saturating_sub(pause);
        if phase >= stall_starts {
            t + (every - phase)
        } else {
            t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_that_would_finish_inside_a_stall_waits_for_its_end() {
        let spec = BackendSpec {
            stall: Some(Stall {
                every: Duration::from_secs(1),
                pause: Duration::from_millis(200),
            }),
            ..BackendSpec::answering_in(5)
        };
        let backend = Backend::new(spec, 1);
        tokio::time::advance(Duration::from_millis(797)).await;
        let start = Instant::now();
        backend.handle().await;
        // 797 + 5 = 802 ms lands in the stall (800..1000 ms): done at 1000 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(203));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_capacity_queue() {
        let spec = BackendSpec {
            capacity: Some(2),
            ..BackendSpec::answering_in(10)
        };
        let backend = Backend::new(spec, 1);
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let backend = backend.clone();
                tokio::spawn(async move { backend.handle().await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }
}
