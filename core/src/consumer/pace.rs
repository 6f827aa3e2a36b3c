//! When a consumer whose handlings finish at once gives its thread away.
//!
//! A handling that awaits nothing leaves the consumer's task running: it
//! takes the next delivery at once. The task has to yield now and then all
//! the same, or the other tasks of its thread (timers, a health endpoint,
//! other consumers) wait until the backlog is gone. It used to yield each
//! time tokio's budget ran out, about every 128 handlings; on a
//! multi-threaded runtime each such yield also wakes an idle worker, which
//! finds nothing to do and sleeps again. On two cores, draining the memory
//! broker, that was a context switch every 200 messages and 0.05 to 0.10 us
//! of CPU a message (BENCHMARKS.md). So the task yields after a
//! slice of time instead, looking at the clock once every 128 handlings:
//! light handlers give their thread away about every [`SLICE`], heavy ones
//! every 128 handlings as before.

use std::time::{Duration, Instant};

/// How long a consumer's task keeps its thread while every handling
/// finishes at once, at most (give or take 127 handlings).
pub(crate) const SLICE: Duration = Duration::from_millis(1);

/// Handlings between two looks at the clock: tokio's own budget for a task
/// between two yields.
const EVERY: u32 = 128;

/// Counts the handlings that finished at once since the task last yielded.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    /// Handlings that finished at once since the last yield.
    handled: u32,
    /// When the first of them started.
    since: Option<Instant>,
}

impl Pace {
    /// A handling is about to start.
    pub(crate) fn starting(&mut self) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// A handling finished at once; true when the task is to yield now.
    pub(crate) fn finished_at_once(&mut self) -> bool {
        self.handled += 1;
        if !self.handled.is_multiple_of(EVERY) {
            return false;
        }
        self.due(Instant::now())
    }

    /// Whether a slice is over at `now`; if so, the next one starts with
    /// the next handling. A `since` left from before the task last waited
    /// for a delivery is old: the task yields early, never late.
    fn due(&mut self, now: Instant) -> bool {
        let over = self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= SLICE);
        if over {
            *self = Pace::default();
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` handlings of `each` (on a clock of our own); returns after
    /// which ones the task yielded.
    fn yields(n: u32, each: Duration) -> Vec<u32> {
        let mut pace = Pace::default();
        let mut now = Instant::now();
        let mut yielded = Vec::new();
        for k in 1..=n {
            pace.since.get_or_insert(now);
            now += each;
            pace.handled += 1;
            if pace.handled.is_multiple_of(EVERY) && pace.due(now) {
                yielded.push(k);
            }
        }
        yielded
    }

    #[test]
    fn light_handlings_yield_about_once_a_slice() {
        // 1 us each: 1,024 handlings (8 x 128) make the first full slice.
        assert_eq!(yields(3_000, Duration::from_micros(1)), vec![1_024, 2_048]);
        // 3 us each: 384 handlings make 1.152 ms.
        assert_eq!(
            yields(1_200, Duration::from_micros(3)),
            vec![384, 768, 1_152]
        );
    }

    #[test]
    fn heavy_handlings_yield_every_128_as_the_budget_did() {
        assert_eq!(yields(500, Duration::from_micros(50)), vec![128, 256, 384]);
    }

    #[test]
    fn a_slice_started_before_a_wait_ends_at_the_next_look() {
        let mut pace = Pace::default();
        let start = Instant::now();
        pace.since = Some(start);
        pace.handled = EVERY - 1;
        // The task waited 5 ms for a delivery, then handles one at once.
        pace.handled += 1;
        assert!(pace.due(start + Duration::from_millis(5)));
        assert_eq!((pace.handled, pace.since), (0, None), "a new slice");
    }

    #[test]
    fn a_slice_starts_with_its_first_handling() {
        let mut pace = Pace::default();
        pace.starting();
        let since = pace.since;
        assert!(since.is_some());
        pace.starting();
        assert_eq!(pace.since, since, "kept until the slice ends");
        // The clock is not looked at before the 128th.
        for _ in 1..EVERY {
            assert!(!pace.finished_at_once());
        }
        assert_eq!((pace.handled, pace.since), (EVERY - 1, since));
    }
}
