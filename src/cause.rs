//! What an error chain says about a failed attempt, read in one walk.
//!
//! The retry policy and the default error classification both ask several
//! questions of the same chain (did the request leave the client, did the
//! server go away gracefully, which timer fired, did an endpoint fail);
//! [`Cause::of`] answers them all with one pass over `source()`, each
//! link downcast once per question instead of the chain walked once per
//! question.

use std::error::Error as StdError;

use crate::error::{chain, never_sent_link, RefusedByClient};
use crate::timeout::{Elapsed, Timer};

/// The answers, each true when any link of the chain says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cause {
    /// The request provably never reached the server's application (see
    /// [`is_never_sent`](crate::error::is_never_sent)).
    pub(crate) never_sent: bool,
    /// The client refused to send it, for a reason of the caller's.
    pub(crate) refused_by_client: bool,
    /// The server left it unprocessed as it shut down gracefully.
    pub(crate) server_going_away: bool,
    /// The per-attempt timeout fired.
    pub(crate) attempt_timeout: bool,
    /// The call's deadline passed.
    pub(crate) deadline: bool,
    /// An endpoint failed to answer (`Error::Endpoint`), as opposed to the
    /// balancer having nowhere to send the request.
    pub(crate) endpoint_failed: bool,
}

impl Cause {
    /// Reads `error`'s chain once.
    pub(crate) fn of(error: &(dyn StdError + 'static)) -> Self {
        let mut cause = Cause::default();
        for link in chain(error) {
            cause.never_sent |= never_sent_link(link);
            cause.refused_by_client |= link.is::<RefusedByClient>();
            #[cfg(feature = "http")]
            {
                cause.server_going_away |= crate::error::unprocessed_link(link)
                    == Some(crate::error::Unprocessed::GoingAway);
            }
            if let Some(elapsed) = link.downcast_ref::<Elapsed>() {
                match elapsed.timer() {
                    Timer::Attempt => cause.attempt_timeout = true,
                    Timer::Deadline => cause.deadline = true,
                }
            }
            cause.endpoint_failed |= matches!(
                link.downcast_ref::<crate::Error>(),
                Some(crate::Error::Endpoint { .. })
            );
        }
        cause
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::{BoxError, NeverSent};

    #[test]
    fn every_answer_comes_from_one_walk_of_a_nested_chain() {
        let timeout: BoxError = Box::new(Elapsed::new(Timer::Attempt, Duration::from_secs(1)));
        let never_sent: BoxError = Box::new(NeverSent::new(timeout));
        let cause = Cause::of(&*never_sent);
        assert_eq!(
            cause,
            Cause {
                never_sent: true,
                attempt_timeout: true,
                ..Cause::default()
            }
        );
    }

    #[test]
    fn a_plain_error_says_nothing() {
        let plain = std::io::Error::other("boom");
        assert_eq!(Cause::of(&plain), Cause::default());
    }
}
