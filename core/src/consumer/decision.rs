//! What becomes of a delivery after one attempt: a pure function of the
//! attempt's outcome, the attempt number and the retry policy.

use std::time::Duration;

use crate::dead_letter::DeadLetterReason;
use crate::handler::HandlerError;
use crate::retry::{RetryDecision, RetryPolicy};

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler returned `Ok`.
    Handled,
    /// The handler failed (an error, a panic, a timeout).
    Failed(HandlerError),
    /// The payload did not decode; why.
    Undecodable(String),
    /// The broker counted more deliveries than the policy allows attempts:
    /// the message crashed its consumer every time (C13). The handler was
    /// not run.
    OverLimit {
        /// Deliveries the broker counted.
        delivered: u32,
    },
}

/// How a delivery is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Done (C3).
    Ack,
    /// Deliver again after `after`, with this error on record (C7).
    Retry { after: Duration, error: String },
    /// To the DLQ (C8, C9, C13).
    DeadLetter {
        reason: DeadLetterReason,
        error: String,
    },
}

/// Decides how to settle a delivery whose attempt number `attempt` ended
/// with `outcome`: permanent failures and undecodable payloads go to the
/// DLQ at once (C9), retryable ones as the policy says (C7, C8).
pub(crate) fn decide(outcome: Outcome, attempt: u32, policy: &dyn RetryPolicy) -> Settlement {
    match outcome {
        Outcome::Handled => Settlement::Ack,
        Outcome::Undecodable(why) => Settlement::DeadLetter {
            reason: DeadLetterReason::Undecodable,
            error: why,
        },
        Outcome::OverLimit { delivered } => Settlement::DeadLetter {
            reason: DeadLetterReason::DeliveryLimit,
            error: format!(
                "the broker delivered it {delivered} times, more than the {} attempts allowed; \
                 its consumer likely crashed while handling it",
                policy.max_attempts()
            ),
        },
        Outcome::Failed(error) if !error.is_retryable() => Settlement::DeadLetter {
            reason: DeadLetterReason::Permanent,
            error: error.to_string(),
        },
        Outcome::Failed(error) => match policy.decide(attempt, &error) {
            RetryDecision::Retry(after) => Settlement::Retry {
                after,
                error: error.to_string(),
            },
            RetryDecision::DeadLetter => Settlement::DeadLetter {
                reason: DeadLetterReason::Exhausted,
                error: error.to_string(),
            },
        },
    }
}

/// Whether a delivery must be dead-lettered before its handler runs: the
/// broker itself counted more deliveries than the policy allows attempts.
/// An attempt number the message carries is never enough (a publisher can
/// write any number).
pub(crate) fn over_limit(attempt: u32, counted_by_broker: bool, policy: &dyn RetryPolicy) -> bool {
    counted_by_broker && attempt > policy.max_attempts()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::{Fixed, NoRetry};

    fn policy() -> Fixed {
        Fixed::new(Duration::from_secs(2), 3).unwrap()
    }

    #[test]
    fn success_acks() {
        assert_eq!(decide(Outcome::Handled, 1, &policy()), Settlement::Ack);
    }

    #[test]
    fn retryable_failures_follow_the_policy_then_exhaust() {
        let failed = || Outcome::Failed(HandlerError::retryable("smtp down"));
        assert_eq!(
            decide(failed(), 1, &policy()),
            Settlement::Retry {
                after: Duration::from_secs(2),
                error: "smtp down".into()
            }
        );
        assert_eq!(
            decide(failed(), 3, &policy()),
            Settlement::DeadLetter {
                reason: DeadLetterReason::Exhausted,
                error: "smtp down".into()
            }
        );
        assert!(matches!(
            decide(failed(), 1, &NoRetry),
            Settlement::DeadLetter {
                reason: DeadLetterReason::Exhausted,
                ..
            }
        ));
    }

    #[test]
    fn permanent_and_undecodable_skip_the_policy() {
        let permanent = Outcome::Failed(HandlerError::permanent("no such mailbox"));
        assert!(matches!(
            decide(permanent, 1, &policy()),
            Settlement::DeadLetter { reason: DeadLetterReason::Permanent, ref error } if error == "no such mailbox"
        ));
        assert!(matches!(
            decide(Outcome::Undecodable("not JSON".into()), 1, &policy()),
            Settlement::DeadLetter {
                reason: DeadLetterReason::Undecodable,
                ..
            }
        ));
    }

    #[test]
    fn only_a_broker_count_over_the_policy_is_a_delivery_limit() {
        assert!(over_limit(4, true, &policy()));
        assert!(!over_limit(3, true, &policy()));
        // A number the message carries could be forged.
        assert!(!over_limit(99_999, false, &policy()));
        match decide(Outcome::OverLimit { delivered: 4 }, 4, &policy()) {
            Settlement::DeadLetter { reason, error } => {
                assert_eq!(reason, DeadLetterReason::DeliveryLimit);
                assert!(error.contains("4 times"), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
}
