//! Retries that cannot do harm: gated by the request's safety class, paced by
//! backoff and server pushback, capped by a shared budget.

mod backoff;
mod budget;
mod layer;
mod policy;
mod replay;

pub use self::backoff::Backoff;
pub use self::budget::{RetryBudget, RetryStats, Spend, Throttled};
pub use self::layer::{BudgetExhausted, DeadlineTooClose, ResponseFuture, Retry, RetryLayer};
pub use self::policy::{ErrorsOnly, HttpRetryOn, ResponseVerdict, RetryOn, RetryPolicy};
pub use self::replay::{ReplayBody, ReplayLayer, ReplayService, DEFAULT_REPLAY_CAP};
pub use crate::classify::pushback::{pushback, Pushback};
