//! Retry policies: given the attempt that failed and its error, wait how long
//! or give up.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::handler::HandlerError;

/// What to do with a message whose attempt failed with a retryable error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Deliver again after this delay.
    Retry(Duration),
    /// Give up: dead-letter with reason `exhausted`.
    DeadLetter,
}

/// A retry policy: a small, pure function of (attempt, error), like tower's.
///
/// Permanent errors never reach the policy: they go to the DLQ at once (C9).
pub trait RetryPolicy: Send + Sync + fmt::Debug + 'static {
    /// Decides after `attempt` (1 for the first delivery) failed with `error`.
    fn decide(&self, attempt: u32, error: &HandlerError) -> RetryDecision;

    /// The most attempts a message gets. The consumer dead-letters a message
    /// delivered more often than this (it crashed its consumer in between)
    /// before running the handler.
    fn max_attempts(&self) -> u32;
}

/// Exponential backoff: `initial × multiplier^(attempt−1)`, capped at
/// `max_delay`, with optional downward jitter, for `max_attempts` attempts.
///
/// The default is the seed's: 1 s, ×2, 4 attempts (3 retries: 1 s, 2 s,
/// 4 s), 5 minutes at most, no jitter.
///
/// ```
/// use std::time::Duration;
/// use ticketrail_core::{Exponential, RetryDecision, RetryPolicy, HandlerError};
///
/// let policy = Exponential::builder()
///     .initial(Duration::from_millis(500))
///     .multiplier(3.0)
///     .max_attempts(3)
///     .build()?;
/// let err = HandlerError::retryable("smtp down");
/// assert_eq!(policy.decide(1, &err), RetryDecision::Retry(Duration::from_millis(500)));
/// assert_eq!(policy.decide(2, &err), RetryDecision::Retry(Duration::from_millis(1500)));
/// assert_eq!(policy.decide(3, &err), RetryDecision::DeadLetter);
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Exponential {
    initial: Duration,
    multiplier: f64,
    max_delay: Duration,
    max_attempts: u32,
    jitter: f64,
}

impl Default for Exponential {
    fn default() -> Self {
        Exponential {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_attempts: 4,
            jitter: 0.0,
        }
    }
}

impl Exponential {
    /// A builder starting from the defaults.
    pub fn builder() -> ExponentialBuilder {
        ExponentialBuilder {
            policy: Exponential::default(),
        }
    }

    /// The delay before retrying after `attempt` failed, without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay after `attempt` failed, with jitter drawn from `unit`
    /// (a number in `[0, 1)`): `base × (1 − jitter × unit)`.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt);
        if self.jitter == 0.0 {
            return base;
        }
        base.mul_f64(1.0 - self.jitter * unit.clamp(0.0, 1.0))
    }
}

impl RetryPolicy for Exponential {
    fn decide(&self, attempt: u32, _error: &HandlerError) -> RetryDecision {
        if attempt >= self.max_attempts {
            return RetryDecision::DeadLetter;
        }
        RetryDecision::Retry(self.delay_with(attempt, fastrand::f64()))
    }

    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// Builds an [`Exponential`] policy; [`build`](ExponentialBuilder::build)
/// rejects invalid settings with an error naming the setting.
#[derive(Debug, Clone)]
pub struct ExponentialBuilder {
    policy: Exponential,
}

impl ExponentialBuilder {
    /// The first delay. Default 1 s.
    pub fn initial(mut self, initial: Duration) -> Self {
        self.policy.initial = initial;
        self
    }

    /// The factor between consecutive delays, at least 1. Default 2.
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.policy.multiplier = multiplier;
        self
    }

    /// The longest delay. Default 5 minutes.
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.policy.max_delay = max_delay;
        self
    }

    /// Total attempts, the first delivery included; at least 1. Default 4.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// Jitter in `[0, 1]`: each delay is drawn from `[base × (1 − jitter), base]`.
    /// Default 0.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.policy.jitter = jitter;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Exponential> {
        let p = self.policy;
        check_attempts(p.max_attempts)?;
        if p.multiplier.is_nan() || p.multiplier < 1.0 || p.multiplier.is_infinite() {
            return Err(Error::config(format!(
                "exponential retry: multiplier must be a finite number of at least 1, got {}",
                p.multiplier
            )));
        }
        if p.jitter.is_nan() || !(0.0..=1.0).contains(&p.jitter) {
            return Err(Error::config(format!(
                "exponential retry: jitter must be between 0 and 1, got {}",
                p.jitter
            )));
        }
        if p.initial.is_zero() {
            return Err(Error::config(
                "exponential retry: initial delay must be above zero",
            ));
        }
        if p.max_delay < p.initial {
            return Err(Error::config(format!(
                "exponential retry: max delay {:?} is below the initial delay {:?}",
                p.max_delay, p.initial
            )));
        }
        Ok(p)
    }
}

/// The same delay before every retry, for `max_attempts` attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixed {
    delay: Duration,
    max_attempts: u32,
}

impl Fixed {
    /// Waits `delay` between attempts; `max_attempts` counts the first delivery.
    pub fn new(delay: Duration, max_attempts: u32) -> Result<Self> {
        check_attempts(max_attempts)?;
        Ok(Fixed {
            delay,
            max_attempts,
        })
    }
}

impl RetryPolicy for Fixed {
    fn decide(&self, attempt: u32, _error: &HandlerError) -> RetryDecision {
        if attempt >= self.max_attempts {
            RetryDecision::DeadLetter
        } else {
            RetryDecision::Retry(self.delay)
        }
    }

    fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// Never retries: the first retryable failure dead-letters (reason `exhausted`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoRetry;

impl RetryPolicy for NoRetry {
    fn decide(&self, _attempt: u32, _error: &HandlerError) -> RetryDecision {
        RetryDecision::DeadLetter
    }

    fn max_attempts(&self) -> u32 {
        1
    }
}

fn check_attempts(max_attempts: u32) -> Result<()> {
    if max_attempts == 0 {
        return Err(Error::config(
            "retry policy: max attempts must be at least 1 (the first delivery counts)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn err() -> HandlerError {
        HandlerError::retryable("boom")
    }

    #[test]
    fn seed_defaults_back_off_1_2_4_then_give_up() {
        let p = Exponential::default();
        let delays: Vec<_> = (1..=4).map(|a| p.decide(a, &err())).collect();
        assert_eq!(
            delays,
            vec![
                RetryDecision::Retry(Duration::from_secs(1)),
                RetryDecision::Retry(Duration::from_secs(2)),
                RetryDecision::Retry(Duration::from_secs(4)),
                RetryDecision::DeadLetter,
            ]
        );
        assert_eq!(p.max_attempts(), 4);
    }

    #[test]
    fn delays_are_capped_at_max_delay() {
        let p = Exponential::builder()
            .initial(Duration::from_secs(1))
            .multiplier(10.0)
            .max_delay(Duration::from_secs(30))
            .max_attempts(u32::MAX)
            .build()
            .unwrap();
        assert_eq!(p.base_delay(2), Duration::from_secs(10));
        assert_eq!(p.base_delay(3), Duration::from_secs(30));
        assert_eq!(p.base_delay(4_000_000), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let p = Exponential::builder()
            .initial(Duration::from_secs(2))
            .jitter(0.25)
            .max_attempts(10)
            .build()
            .unwrap();
        assert_eq!(p.delay_with(1, 0.0), Duration::from_secs(2));
        assert_eq!(p.delay_with(1, 1.0), Duration::from_millis(1500));
        for _ in 0..1_000 {
            match p.decide(2, &err()) {
                RetryDecision::Retry(d) => {
                    assert!(
                        d >= Duration::from_secs(3) && d <= Duration::from_secs(4),
                        "{d:?}"
                    )
                }
                RetryDecision::DeadLetter => panic!("gave up too early"),
            }
        }
    }

    #[test]
    fn invalid_settings_are_rejected_naming_the_setting() {
        let cases = [
            (Exponential::builder().max_attempts(0), "max attempts"),
            (Exponential::builder().multiplier(0.5), "multiplier"),
            (Exponential::builder().multiplier(f64::NAN), "multiplier"),
            (
                Exponential::builder().multiplier(f64::INFINITY),
                "multiplier",
            ),
            (Exponential::builder().jitter(1.5), "jitter"),
            (Exponential::builder().jitter(f64::NAN), "jitter"),
            (Exponential::builder().initial(Duration::ZERO), "initial"),
            (
                Exponential::builder()
                    .initial(Duration::from_secs(10))
                    .max_delay(Duration::from_secs(1)),
                "max delay",
            ),
        ];
        for (builder, setting) in cases {
            let e = builder.build().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.message().contains(setting), "`{e}` should name {setting}");
        }
        assert!(Fixed::new(Duration::from_secs(1), 0).is_err());
    }

    #[test]
    fn fixed_and_none() {
        let p = Fixed::new(Duration::from_millis(250), 3).unwrap();
        assert_eq!(
            p.decide(1, &err()),
            RetryDecision::Retry(Duration::from_millis(250))
        );
        assert_eq!(
            p.decide(2, &err()),
            RetryDecision::Retry(Duration::from_millis(250))
        );
        assert_eq!(p.decide(3, &err()), RetryDecision::DeadLetter);
        assert_eq!(NoRetry.decide(1, &err()), RetryDecision::DeadLetter);
    }

    /// The delays, applied on tokio's paused clock, add up to exactly the
    /// policy's schedule: no real sleeping in this test.
    #[tokio::test(start_paused = true)]
    async fn schedule_on_paused_clock() {
        let p = Exponential::default();
        let start = tokio::time::Instant::now();
        let mut attempt = 1;
        while let RetryDecision::Retry(d) = p.decide(attempt, &err()) {
            tokio::time::sleep(d).await;
            attempt += 1;
        }
        assert_eq!(attempt, 4);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }
}
