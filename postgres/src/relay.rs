//! The relay: publishes committed outbox rows with broker confirms.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::types::Json as JsonColumn;
use sqlx::{Postgres, Row, Transaction};
use ticketrail_core::{Headers, Message, Result, SharedBroker};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::database;
use crate::store::{Retention, Store};

/// How a [`Relay`] works; the defaults suit most applications.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Rows one relay locks and publishes at once, their confirms awaited
    /// together. Default 100.
    pub batch: u32,
    /// How often a relay looks for rows when no notification woke it:
    /// the fallback for a lost LISTEN connection or a missed wake-up.
    /// Default 1 s.
    pub poll_interval: Duration,
    /// The longest a refused row waits before it is tried again; the wait
    /// doubles from 1 s with each refusal up to this. Default 5 min.
    pub max_row_backoff: Duration,
    /// What cleanup keeps: sent rows 1 h, inbox markers 7 days.
    pub retention: Retention,
    /// How often the relay deletes expired sent rows and inbox markers.
    /// Default 1 min.
    pub cleanup_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 100,
            poll_interval: Duration::from_secs(1),
            max_row_backoff: Duration::from_secs(300),
            retention: Retention::default(),
            cleanup_interval: Duration::from_secs(60),
        }
    }
}

/// What one pass of a relay over the outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayPass {
    /// Rows published and confirmed.
    pub sent: u64,
    /// Rows the broker refused; kept with their error for a later try.
    pub refused: u64,
}

/// Publishes the committed rows of an outbox to a broker, each with its
/// broker confirm (C1) and the message id it was stored with, so a relay
/// that dies between the confirm and marking the row sent publishes the
/// same id again on its next pass (at least once; an inbox makes the
/// effect once).
///
/// Several relays may run over one outbox, in one process or many: each
/// locks the rows it publishes (`FOR UPDATE SKIP LOCKED`), so no row is
/// sent twice while nothing crashes. A relay wakes on the outbox's
/// LISTEN/NOTIFY channel when a transaction that wrote rows commits, and
/// polls every [`poll_interval`](RelayConfig::poll_interval) as well.
///
/// # Ordering
/// None between rows. A relay publishes each batch in the order the rows
/// were inserted, but two relays publish side by side, a refused row is
/// tried again later, and the consumers' retries and prefetch reorder
/// messages anyway. Give a message everything its handler needs, or a
/// version its handler can compare.
///
/// # Refused rows
/// A row the broker refuses (unroutable, too large, an invalid name) is
/// kept with its error kind and text and tried again after a growing wait
/// (1 s, 2 s, ... up to [`max_row_backoff`](RelayConfig::max_row_backoff)):
/// binding a queue later makes an unroutable row go. It is counted in
/// `ticketrail.outbox.failed` and listed by `ticketrail outbox stats`.
/// A lost broker connection is not the row's fault: the relay waits and
/// tries again without counting it.
#[derive(Debug, Clone)]
pub struct Relay {
    store: Store,
    broker: SharedBroker,
    config: RelayConfig,
    select: String,
    mark_sent: String,
    mark_refused: String,
}

impl Relay {
    pub(crate) fn new(store: Store, broker: SharedBroker) -> Self {
        let outbox = store.tables().outbox();
        Relay {
            select: format!(
                "SELECT id, message_id, topic_space, routing_key, payload, content_type,
                        headers, attempts
                 FROM {outbox}
                 WHERE sent_at IS NULL AND available_at <= now()
                 ORDER BY id LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            ),
            mark_sent: format!("UPDATE {outbox} SET sent_at = now() WHERE id = ANY($1)"),
            mark_refused: format!(
                "UPDATE {outbox}
                 SET attempts = attempts + 1, last_error_kind = $2, last_error = $3,
                     available_at = now() + make_interval(secs => $4)
                 WHERE id = $1"
            ),
            store,
            broker,
            config: RelayConfig::default(),
        }
    }

    /// Uses `config`.
    pub fn config(mut self, config: RelayConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets how many rows are published at once.
    pub fn batch(mut self, rows: u32) -> Self {
        self.config.batch = rows.max(1);
        self
    }

    /// Sets the polling fallback's interval.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Publishes what is pending now, batch after batch, until a batch
    /// comes back short; returns what it did. The spawned relay runs this
    /// on every wake-up; tests and one-shot jobs call it directly.
    pub async fn run_once(&self) -> Result<RelayPass> {
        let mut total = RelayPass::default();
        loop {
            let (taken, pass) = self.relay_batch().await?;
            total.sent += pass.sent;
            total.refused += pass.refused;
            if taken < u64::from(self.config.batch) {
                return Ok(total);
            }
        }
    }

    /// Locks up to one batch of due rows, publishes them, awaits their
    /// confirms and records the outcome, all in one transaction. Returns
    /// how many rows it took.
    async fn relay_batch(&self) -> Result<(u64, RelayPass)> {
        let mut tx = self
            .store
            .pool()
            .begin()
            .await
            .map_err(database("starting a relay transaction"))?;
        let rows = sqlx::query(&self.select)
            .bind(i64::from(self.config.batch))
            .fetch_all(&mut *tx)
            .await
            .map_err(database("locking due outbox rows"))?;
        let taken = rows.len() as u64;
        if rows.is_empty() {
            return Ok((0, RelayPass::default()));
        }
        // Hand every message of the batch to the broker, then await the
        // confirms: the window a raw client would keep.
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let row_id: i64 = row.get("id");
            let attempts: i32 = row.get("attempts");
            let topic_space: String = row.get("topic_space");
            let message = message_of(row);
            let sent = self.broker.send(&topic_space, message).await;
            pending.push((row_id, attempts, topic_space, sent));
        }
        let mut sent_ids = Vec::new();
        // Rows sent per topic space, counted once the batch commits.
        let mut relayed: Vec<(String, u64)> = Vec::new();
        let mut pass = RelayPass::default();
        let mut interrupted = None;
        for (row_id, attempts, topic_space, sent) in pending {
            let outcome = match sent {
                Ok(confirmation) => confirmation.await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    match relayed.iter_mut().find(|(space, _)| *space == topic_space) {
                        Some((_, n)) => *n += 1,
                        None => relayed.push((topic_space, 1)),
                    }
                    sent_ids.push(row_id);
                }
                // The broker is away: not the row's fault. It stays as it
                // is, to go out once the connection is back.
                Err(e) if e.is_transient() => interrupted = Some(e),
                Err(e) => {
                    pass.refused += 1;
                    self.refuse(&mut tx, row_id, attempts, &topic_space, &e)
                        .await?;
                }
            }
        }
        pass.sent = sent_ids.len() as u64;
        if !sent_ids.is_empty() {
            sqlx::query(&self.mark_sent)
                .bind(&sent_ids)
                .execute(&mut *tx)
                .await
                .map_err(database("marking outbox rows sent"))?;
        }
        tx.commit()
            .await
            .map_err(database("committing a relay batch"))?;
        for (topic_space, n) in relayed {
            crate::metrics::relayed(self.broker.backend(), &topic_space, n);
        }
        match interrupted {
            Some(e) => Err(e),
            None => Ok((taken, pass)),
        }
    }

    /// Records the broker's refusal of a row and when to try it again.
    async fn refuse(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        row_id: i64,
        attempts: i32,
        topic_space: &str,
        error: &ticketrail_core::Error,
    ) -> Result<()> {
        let wait = row_backoff(attempts, self.config.max_row_backoff);
        tracing::warn!(
            row = row_id,
            topic_space,
            error = %error,
            retry_in = ?wait,
            "the broker refused an outbox row; kept, tried again later"
        );
        crate::metrics::failed(self.broker.backend(), topic_space, error.kind());
        let text = ticketrail_core::truncate_error_text(&error.to_string());
        sqlx::query(&self.mark_refused)
            .bind(row_id)
            .bind(error.kind().code())
            .bind(&*text)
            .bind(wait.as_secs_f64())
            .execute(&mut **tx)
            .await
            .map_err(database("recording a refused outbox row"))?;
        Ok(())
    }

    /// Runs the relay in a task of its own until [`RunningRelay::shutdown`].
    pub fn spawn(self) -> RunningRelay {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(stopped));
        RunningRelay { stop, task }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) -> Result<()> {
        let channel = self.store.tables().channel();
        let mut listener: Option<PgListener> = None;
        let mut failures: u32 = 0;
        let mut next_cleanup = Instant::now();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            if listener.is_none() {
                listener = listen(&self.store, &channel).await;
            }
            // Rows committed before the LISTEN began sent no wake-up this
            // relay saw: a pass after (re)listening finds them.
            match self.run_once().await {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = retry_wait(failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "outbox relay pass failed");
                    if stopped_within(&mut stop, wait).await {
                        return Ok(());
                    }
                    continue;
                }
            }
            if Instant::now() >= next_cleanup {
                next_cleanup = Instant::now() + self.config.cleanup_interval;
                self.housekeeping().await;
            }
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                woke = wake_up(&mut listener) => {
                    if let Err(e) = woke {
                        tracing::debug!(error = %e, "outbox LISTEN connection lost; polling until it is back");
                        listener = None;
                    }
                }
            }
        }
    }

    /// Deletes what has expired and publishes the backlog's gauges; a
    /// failure is logged and tried again at the next interval.
    async fn housekeeping(&self) {
        if let Err(e) = self.store.delete_expired(&self.config.retention).await {
            tracing::warn!(error = %e, "outbox cleanup failed; tried again later");
        }
        match self.store.backlog().await {
            Ok((pending, oldest)) => {
                crate::metrics::backlog(pending, oldest.map_or(0.0, |d| d.as_secs_f64()))
            }
            Err(e) => tracing::debug!(error = %e, "outbox backlog not read"),
        }
    }
}

/// The message an outbox row holds, with the id it was stored with.
fn message_of(row: &sqlx::postgres::PgRow) -> Message {
    let payload: Vec<u8> = row.get("payload");
    let routing_key: String = row.get("routing_key");
    let mut message = Message::new(routing_key, payload).id(row.get::<String, _>("message_id"));
    message.content_type = row.get("content_type");
    message.headers = row.get::<JsonColumn<Headers>, _>("headers").0;
    message
}

/// How long a row waits after its `attempts`-th refusal: 1 s doubling, at
/// most `max`.
fn row_backoff(attempts: i32, max: Duration) -> Duration {
    let exponent = attempts.clamp(0, 30) as u32;
    Duration::from_secs(1u64 << exponent).min(max)
}

/// How long the relay waits after `failures` passes failed in a row
/// (broker or database away): 0.5 s doubling, at most 10 s.
fn retry_wait(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(5);
    Duration::from_millis(500 << exponent).min(Duration::from_secs(10))
}

async fn listen(store: &Store, channel: &str) -> Option<PgListener> {
    let listening = async {
        let mut listener = PgListener::connect_with(store.pool()).await?;
        listener.listen(channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listening.await {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::debug!(error = %e, "cannot LISTEN for outbox rows; polling");
            None
        }
    }
}

/// Waits for a notification; forever when there is no listener.
async fn wake_up(listener: &mut Option<PgListener>) -> std::result::Result<(), sqlx::Error> {
    match listener {
        Some(l) => l.recv().await.map(drop),
        None => std::future::pending().await,
    }
}

/// Sleeps `wait` unless the relay is stopped first; true if it was.
async fn stopped_within(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(wait) => *stop.borrow(),
    }
}

/// A relay running in its own task.
#[derive(Debug)]
pub struct RunningRelay {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl RunningRelay {
    /// Stops the relay after the batch it is publishing, if any, is
    /// recorded.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }

    /// Stops the relay at once, as a crash would: a batch half published
    /// is rolled back by the database and published again, same ids, by
    /// the next relay.
    pub fn abort(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_rows_back_off_to_the_cap() {
        let max = Duration::from_secs(300);
        assert_eq!(row_backoff(0, max), Duration::from_secs(1));
        assert_eq!(row_backoff(3, max), Duration::from_secs(8));
        assert_eq!(row_backoff(9, max), max);
        assert_eq!(row_backoff(i32::MAX, max), max);
    }

    #[test]
    fn failed_passes_back_off_to_ten_seconds() {
        assert_eq!(retry_wait(1), Duration::from_millis(500));
        assert_eq!(retry_wait(2), Duration::from_secs(1));
        assert_eq!(retry_wait(50), Duration::from_secs(10));
    }
}
