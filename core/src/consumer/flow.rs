//! Flow control: when a consumer takes its next delivery. A circuit
//! breaker pauses consumption while the downstream fails, a rate limit
//! spaces deliveries out. Both are pure state machines over a clock the
//! caller passes in, tested on paused time; the consumer loop asks them
//! before it takes a delivery and tells the breaker how each attempt ended.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::decision::Settlement;
use super::health::HealthState;
use crate::error::{Error, Result};
use crate::metrics::ConsumerMetrics;

/// Pauses a consumer while its handler fails for most messages: a
/// downstream outage (the mail provider down) is not the messages' fault,
/// so rather than spend their attempts and fill the DLQ, the consumer stops
/// taking deliveries and the messages wait in the queue.
///
/// # Behavior
/// - **Closed** (consuming): each attempt's outcome is kept for `window`.
///   Once at least `min_attempts` are kept and the share of retryable
///   failures (errors, panics, timeouts) among them reaches
///   `failure_ratio`, the breaker opens. Permanent failures and
///   undecodable payloads are the messages' own fault: they are not
///   counted.
/// - **Open** (paused): no delivery is taken. Deliveries already taken
///   finish as usual; what the broker sent ahead stays unsettled, within
///   the prefetch bound, spending nothing. After `cool_down` the breaker
///   half-opens.
/// - **Half-open** (probing): one delivery is taken. If it succeeds, the
///   breaker closes and consumption resumes; if it fails, the breaker opens
///   again for twice the last pause, up to `max_cool_down`. Only probes
///   spend attempts while the downstream is down.
///
/// ```
/// use std::time::Duration;
/// use ticketrail_core::CircuitBreaker;
///
/// let breaker = CircuitBreaker::default()
///     .failure_ratio(0.5)?
///     .min_attempts(10)
///     .window(Duration::from_secs(30))
///     .cool_down(Duration::from_secs(5), Duration::from_secs(300));
/// # Ok::<(), ticketrail_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    failure_ratio: f64,
    min_attempts: u32,
    window: Duration,
    cool_down: Duration,
    max_cool_down: Duration,
}

impl Default for CircuitBreaker {
    /// Opens when half of at least 10 attempts in 30 s failed; probes after
    /// 5 s, then 10, 20 ... up to 5 min.
    fn default() -> Self {
        CircuitBreaker {
            failure_ratio: 0.5,
            min_attempts: 10,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(300),
        }
    }
}

impl CircuitBreaker {
    /// Opens when this share of the attempts in the window failed, above 0
    /// and at most 1.
    pub fn failure_ratio(mut self, ratio: f64) -> Result<Self> {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(Error::config(format!(
                "circuit breaker: failure_ratio must be above 0 and at most 1, not {ratio}"
            )));
        }
        self.failure_ratio = ratio;
        Ok(self)
    }

    /// Judges only once this many attempts are in the window (at least 1).
    pub fn min_attempts(mut self, attempts: u32) -> Self {
        self.min_attempts = attempts.max(1);
        self
    }

    /// How long an attempt's outcome counts.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The first pause, and the longest one a failed probe doubles it to.
    pub fn cool_down(mut self, first: Duration, max: Duration) -> Self {
        self.cool_down = first;
        self.max_cool_down = max.max(first);
        self
    }
}

/// At most `messages` deliveries taken per `per`, spaced evenly: for a
/// downstream that allows so many calls a second. Deliveries over the rate
/// are not taken: they wait in the broker (or, up to the prefetch limit,
/// unsettled in the subscription).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimit {
    interval: Duration,
}

impl RateLimit {
    pub(crate) fn new(messages: u32, per: Duration) -> Result<Self> {
        if messages == 0 || per.is_zero() {
            return Err(Error::config(format!(
                "rate limit: {messages} per {per:?} lets nothing through; give at least 1 per a \
                 non-zero interval"
            )));
        }
        Ok(RateLimit {
            interval: per / messages,
        })
    }
}

/// Whether the consumer may take a delivery now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Yes; a probe if the breaker is half-open.
    Take(Ticket),
    /// Not before this instant (`None`: not until a running probe ends).
    Wait(Option<Instant>),
}

/// What a taken delivery is to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ticket {
    /// Taken while consuming: its outcome counts in the window.
    Normal,
    /// Taken while half-open: its outcome closes or reopens the breaker.
    Probe,
}

/// How an attempt ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Handled: the downstream worked.
    Succeeded,
    /// A retryable failure: perhaps the downstream.
    Failed,
    /// The message's own fault (permanent, undecodable): not counted.
    Ignored,
}

/// A pause, as [`Health`](super::Health) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// Why the consumer paused: the failures that opened the breaker and
    /// the last error.
    pub reason: String,
    /// How long it has been paused.
    pub since: Duration,
    /// How long until the next probe; `None` while a probe runs.
    pub next_probe: Option<Duration>,
}

#[derive(Debug)]
enum State {
    Closed {
        /// The attempts in the window, in buckets of a tenth of it: when
        /// each bucket began, its attempts and failures. Kept per bucket,
        /// not per attempt: a busy consumer ends millions in a window.
        outcomes: VecDeque<(Instant, u32, u32)>,
    },
    Open {
        since: Instant,
        until: Instant,
        pause: Duration,
        reason: String,
    },
    HalfOpen {
        since: Instant,
        pause: Duration,
        reason: String,
        probing: bool,
    },
}

/// A change of state worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Paused { reason: String, probe_in: Duration },
    ProbeFailed { pause: Duration },
    Resumed { after: Duration },
}

/// The breaker and rate limit of one consumer.
#[derive(Debug)]
pub(crate) struct Flow {
    breaker: Option<(CircuitBreaker, State)>,
    rate: Option<(RateLimit, Instant)>,
}

impl Flow {
    pub(crate) fn new(
        breaker: Option<CircuitBreaker>,
        rate: Option<RateLimit>,
        now: Instant,
    ) -> Self {
        Flow {
            breaker: breaker.map(|b| {
                (
                    b,
                    State::Closed {
                        outcomes: VecDeque::new(),
                    },
                )
            }),
            rate: rate.map(|r| (r, now)),
        }
    }

    /// Whether a delivery may be taken at `now`; moves an open breaker
    /// whose pause is over to half-open.
    pub(crate) fn admits(&mut self, now: Instant) -> Admission {
        let mut ticket = Ticket::Normal;
        if let Some((_, state)) = &mut self.breaker {
            match state {
                State::Closed { .. } => {}
                State::Open {
                    since,
                    until,
                    pause,
                    reason,
                } => {
                    if now < *until {
                        return Admission::Wait(Some(*until));
                    }
                    *state = State::HalfOpen {
                        since: *since,
                        pause: *pause,
                        reason: std::mem::take(reason),
                        probing: false,
                    };
                    ticket = Ticket::Probe;
                }
                State::HalfOpen { probing: true, .. } => return Admission::Wait(None),
                State::HalfOpen { .. } => ticket = Ticket::Probe,
            }
        }
        if let Some((_, next)) = &self.rate {
            if now < *next {
                return Admission::Wait(Some(*next));
            }
        }
        Admission::Take(ticket)
    }

    /// A delivery was taken at `now` with `ticket`.
    pub(crate) fn took(&mut self, now: Instant, ticket: Ticket) {
        if let (Ticket::Probe, Some((_, State::HalfOpen { probing, .. }))) =
            (ticket, &mut self.breaker)
        {
            *probing = true;
        }
        if let Some((rate, next)) = &mut self.rate {
            // On schedule, or late by less than an interval (a timer fires
            // a little late): the next slot follows this one, so the
            // average holds. Idle for longer: no credit, no burst.
            *next = if now > *next + rate.interval {
                now + rate.interval
            } else {
                *next + rate.interval
            };
        }
    }

    /// An attempt taken with `ticket` ended at `now`; `error` is its error
    /// text, for the pause's reason.
    pub(crate) fn ended(
        &mut self,
        now: Instant,
        ticket: Ticket,
        verdict: Verdict,
        error: Option<&str>,
    ) -> Option<Change> {
        let (config, state) = self.breaker.as_mut()?;
        match (state, ticket) {
            (State::Closed { outcomes }, Ticket::Normal) => {
                let failed = match verdict {
                    Verdict::Ignored => return None,
                    Verdict::Failed => true,
                    Verdict::Succeeded => false,
                };
                let slice = config.window / 10;
                match outcomes.back_mut() {
                    Some((began, total, failures)) if now.duration_since(*began) < slice => {
                        *total += 1;
                        *failures += u32::from(failed);
                    }
                    _ => outcomes.push_back((now, 1, u32::from(failed))),
                }
                while outcomes
                    .front()
                    .is_some_and(|(began, _, _)| now.duration_since(*began) > config.window)
                {
                    outcomes.pop_front();
                }
                let (total, failures) =
                    outcomes
                        .iter()
                        .fold((0u64, 0u64), |(t, f), (_, total, failures)| {
                            (t + u64::from(*total), f + u64::from(*failures))
                        });
                if total < u64::from(config.min_attempts)
                    || (failures as f64) < config.failure_ratio * total as f64
                {
                    return None;
                }
                let reason = format!(
                    "{failures} of the last {total} attempts failed within {:?}; last error: {}",
                    config.window,
                    error.unwrap_or("none")
                );
                let pause = config.cool_down;
                self.breaker.as_mut().expect("checked").1 = State::Open {
                    since: now,
                    until: now + pause,
                    pause,
                    reason: reason.clone(),
                };
                Some(Change::Paused {
                    reason,
                    probe_in: pause,
                })
            }
            (
                State::HalfOpen {
                    since,
                    pause,
                    reason,
                    ..
                },
                Ticket::Probe,
            ) => match verdict {
                Verdict::Succeeded => {
                    let after = now.duration_since(*since);
                    self.breaker.as_mut().expect("checked").1 = State::Closed {
                        outcomes: VecDeque::new(),
                    };
                    Some(Change::Resumed { after })
                }
                Verdict::Failed => {
                    let pause = (*pause * 2).min(config.max_cool_down);
                    let (since, reason) = (*since, std::mem::take(reason));
                    self.breaker.as_mut().expect("checked").1 = State::Open {
                        since,
                        until: now + pause,
                        pause,
                        reason,
                    };
                    Some(Change::ProbeFailed { pause })
                }
                // Not the downstream's fault: probe again with the next.
                Verdict::Ignored => {
                    if let Some((_, State::HalfOpen { probing, .. })) = &mut self.breaker {
                        *probing = false;
                    }
                    None
                }
            },
            // Attempts taken before the breaker opened end while it is
            // open: they judge nothing.
            _ => None,
        }
    }

    /// The pause, if the breaker holds consumption now.
    pub(crate) fn pause(&self, now: Instant) -> Option<Pause> {
        match &self.breaker {
            Some((
                _,
                State::Open {
                    since,
                    until,
                    reason,
                    ..
                },
            )) => Some(Pause {
                reason: reason.clone(),
                since: now.duration_since(*since),
                next_probe: Some(until.saturating_duration_since(now)),
            }),
            Some((
                _,
                State::HalfOpen {
                    since,
                    reason,
                    probing,
                    ..
                },
            )) => Some(Pause {
                reason: reason.clone(),
                since: now.duration_since(*since),
                next_probe: (!probing).then_some(Duration::ZERO),
            }),
            _ => None,
        }
    }

    /// Whether it spaces deliveries out.
    pub(crate) fn has_rate(&self) -> bool {
        self.rate.is_some()
    }

    /// Whether it tells anything: no breaker and no rate limit costs the
    /// consumer nothing.
    pub(crate) fn is_active(&self) -> bool {
        self.breaker.is_some() || self.rate.is_some()
    }
}

/// A consumer's breaker and rate limit, shared by its loop (which asks
/// before taking a delivery) and its worker (which says how each attempt
/// ended), with what reports a pause.
pub(crate) struct FlowControl {
    flow: Mutex<Flow>,
    /// Whether every delivery may be taken as a normal one without asking
    /// `flow`: a closed breaker and no rate limit. Spares the lock and the
    /// clock on each take while nothing trips.
    open: AtomicBool,
    queue: Arc<str>,
    health: Arc<HealthState>,
    metrics: Arc<ConsumerMetrics>,
}

impl FlowControl {
    pub(crate) fn new(
        flow: Flow,
        queue: Arc<str>,
        health: Arc<HealthState>,
        metrics: Arc<ConsumerMetrics>,
    ) -> Self {
        FlowControl {
            open: AtomicBool::new(!flow.has_rate()),
            flow: Mutex::new(flow),
            queue,
            health,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether flow control allows a delivery now, and as what; else when
    /// to ask again (`None`: when a running probe ends).
    pub(crate) fn ready(&self) -> std::result::Result<Ticket, Option<tokio::time::Instant>> {
        if self.open.load(Ordering::Acquire) {
            return Ok(Ticket::Normal);
        }
        match self.lock().admits(tokio::time::Instant::now()) {
            Admission::Take(ticket) => Ok(ticket),
            Admission::Wait(until) => Err(until),
        }
    }

    /// A delivery was taken as `ticket`.
    pub(crate) fn took(&self, ticket: Ticket) {
        if self.open.load(Ordering::Acquire) {
            return;
        }
        let now = tokio::time::Instant::now();
        let mut flow = self.lock();
        flow.took(now, ticket);
        if ticket == Ticket::Probe {
            tracing::info!(queue = %self.queue, "consumption paused; probing with one delivery");
            self.health.set_pause(flow.pause(now));
        }
    }

    /// An attempt taken with `ticket` was decided as `decided`.
    pub(crate) fn ended(&self, ticket: Ticket, decided: &Settlement) {
        use crate::dead_letter::DeadLetterReason;
        use Settlement;
        let (verdict, error) = match decided {
            Settlement::Ack => (Verdict::Succeeded, None),
            Settlement::Retry { error, .. } => (Verdict::Failed, Some(error.as_str())),
            Settlement::DeadLetter {
                reason: DeadLetterReason::Exhausted,
                error,
            } => (Verdict::Failed, Some(error.as_str())),
            Settlement::DeadLetter { .. } => (Verdict::Ignored, None),
        };
        let now = tokio::time::Instant::now();
        let mut flow = self.lock();
        let change = flow.ended(now, ticket, verdict, error);
        let Some(change) = change else {
            return;
        };
        match &change {
            Change::Paused { reason, probe_in } => tracing::warn!(
                queue = %self.queue,
                reason = %reason,
                probe_in = ?probe_in,
                "pausing consumption: the handler fails for most messages (a downstream outage?)"
            ),
            Change::ProbeFailed { pause } => tracing::warn!(
                queue = %self.queue,
                pause = ?pause,
                "probe failed; consumption stays paused"
            ),
            Change::Resumed { after } => tracing::info!(
                queue = %self.queue,
                paused_for = ?after,
                "probe succeeded; consumption resumed"
            ),
        }
        let pause = flow.pause(now);
        // Asked again on each take while paused; free once resumed (with
        // no rate limit, which is always asked).
        self.open
            .store(pause.is_none() && !flow.has_rate(), Ordering::Release);
        self.metrics.paused(pause.is_some());
        self.health.set_pause(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::default()
            .min_attempts(4)
            .window(Duration::from_secs(10))
            .cool_down(Duration::from_secs(5), Duration::from_secs(15))
    }

    fn take(flow: &mut Flow, now: Instant) -> Ticket {
        match flow.admits(now) {
            Admission::Take(ticket) => {
                flow.took(now, ticket);
                ticket
            }
            Admission::Wait(until) => panic!("expected to take, told to wait until {until:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_open_it_probes_extend_the_pause_and_a_success_closes_it() {
        let start = Instant::now();
        let mut flow = Flow::new(Some(breaker()), None, start);
        let t = start;
        // Two of four failed: half, the ratio.
        for (i, failed) in [false, true, false].into_iter().enumerate() {
            let ticket = take(&mut flow, t);
            let verdict = if failed {
                Verdict::Failed
            } else {
                Verdict::Succeeded
            };
            assert_eq!(
                flow.ended(t, ticket, verdict, Some("smtp 421")),
                None,
                "attempt {i}"
            );
        }
        // A permanent failure is the message's fault: not counted.
        assert_eq!(flow.ended(t, Ticket::Normal, Verdict::Ignored, None), None);
        let change = flow.ended(t, Ticket::Normal, Verdict::Failed, Some("smtp 421"));
        let Some(Change::Paused { reason, probe_in }) = change else {
            panic!("expected a pause, got {change:?}");
        };
        assert_eq!(probe_in, Duration::from_secs(5));
        assert!(
            reason.contains("2 of the last 4") && reason.contains("smtp 421"),
            "{reason}"
        );
        assert_eq!(
            flow.admits(t),
            Admission::Wait(Some(t + Duration::from_secs(5)))
        );
        let pause = flow.pause(t + Duration::from_secs(2)).expect("paused");
        assert_eq!(pause.next_probe, Some(Duration::from_secs(3)));

        // The probe fails: paused twice as long.
        let t = t + Duration::from_secs(5);
        assert_eq!(take(&mut flow, t), Ticket::Probe);
        assert_eq!(flow.admits(t), Admission::Wait(None), "one probe at a time");
        assert_eq!(
            flow.ended(t, Ticket::Probe, Verdict::Failed, None),
            Some(Change::ProbeFailed {
                pause: Duration::from_secs(10)
            })
        );
        // Then up to the cap.
        let t = t + Duration::from_secs(10);
        assert_eq!(take(&mut flow, t), Ticket::Probe);
        assert_eq!(
            flow.ended(t, Ticket::Probe, Verdict::Failed, None),
            Some(Change::ProbeFailed {
                pause: Duration::from_secs(15)
            })
        );
        // A straggler taken before the pause judges nothing.
        assert_eq!(
            flow.ended(t, Ticket::Normal, Verdict::Succeeded, None),
            None
        );
        let t = t + Duration::from_secs(15);
        assert_eq!(take(&mut flow, t), Ticket::Probe);
        assert_eq!(
            flow.ended(t, Ticket::Probe, Verdict::Succeeded, None),
            Some(Change::Resumed {
                after: Duration::from_secs(30)
            })
        );
        assert_eq!(take(&mut flow, t), Ticket::Normal);
        assert!(flow.pause(t).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let start = Instant::now();
        let mut flow = Flow::new(Some(breaker()), None, start);
        for _ in 0..3 {
            assert_eq!(
                flow.ended(start, Ticket::Normal, Verdict::Failed, None),
                None
            );
        }
        // Eleven seconds later the three failures are out of the window.
        let later = start + Duration::from_secs(11);
        assert_eq!(
            flow.ended(later, Ticket::Normal, Verdict::Failed, None),
            None
        );
        assert_eq!(take(&mut flow, later), Ticket::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limit_spaces_deliveries_evenly_without_bursts_after_idling() {
        let start = Instant::now();
        let rate = RateLimit::new(200, Duration::from_secs(1)).unwrap();
        let mut flow = Flow::new(None, Some(rate), start);
        let mut t = start;
        let mut taken = 0;
        // Take whenever admitted, for two seconds of paused time.
        while t < start + Duration::from_secs(2) {
            match flow.admits(t) {
                Admission::Take(ticket) => {
                    flow.took(t, ticket);
                    taken += 1;
                }
                Admission::Wait(Some(until)) => t = until,
                Admission::Wait(None) => unreachable!("no breaker"),
            }
        }
        assert_eq!(taken, 400);
        // Idle for a second: one delivery, then the spacing again.
        let t = t + Duration::from_secs(1);
        assert!(matches!(flow.admits(t), Admission::Take(_)));
        flow.took(t, Ticket::Normal);
        assert_eq!(
            flow.admits(t),
            Admission::Wait(Some(t + Duration::from_millis(5)))
        );
        assert!(RateLimit::new(0, Duration::from_secs(1)).is_err());
        assert!(RateLimit::new(5, Duration::ZERO).is_err());
    }

    #[test]
    fn a_breaker_refuses_a_ratio_outside_zero_to_one() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let e = CircuitBreaker::default().failure_ratio(bad).unwrap_err();
            assert!(e.to_string().contains("failure_ratio"), "{e}");
        }
        assert!(CircuitBreaker::default().failure_ratio(1.0).is_ok());
    }
}
