//! One application database holding ticketrail's outbox and inbox.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Row};
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};

/// How long [`Store::connect`] waits for the database to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

use crate::error::database;
use crate::inbox::{Inbox, InboxHandler};
use crate::outbox::Outbox;
use crate::relay::Relay;
use crate::tables::Tables;

/// ticketrail's tables in the application's PostgreSQL database: the
/// outbox a transaction publishes into, the relay that sends it, and the
/// inbox that runs each handler's effects once. Cheap to clone.
///
/// ```no_run
/// # async fn demo(broker: ticketrail_core::SharedBroker) -> ticketrail_core::Result<()> {
/// use ticketrail_postgres::Store;
///
/// let store = Store::connect("postgres://app@127.0.0.1/app").await?;
/// store.migrate().await?; // creates or updates the tables
/// let relay = store.relay(broker).spawn(); // beside the API, or in the worker
/// // ... on SIGTERM:
/// relay.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    tables: Arc<Tables>,
}

/// How long cleanup keeps sent outbox rows and inbox markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    /// Sent outbox rows are kept this long. Default 1 h.
    pub sent: Duration,
    /// Inbox markers are kept this long: a redelivery or replay of a
    /// handled message later than this runs its handler again. Default 7
    /// days.
    pub inbox: Duration,
    /// Rows one cleanup statement deletes at most. Default 1,000.
    pub batch: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            sent: Duration::from_secs(3600),
            inbox: Duration::from_secs(7 * 24 * 3600),
            batch: 1000,
        }
    }
}

impl Retention {
    /// Keeps sent rows for `sent` and inbox markers for `inbox`, deleting
    /// 1,000 rows a statement.
    pub fn new(sent: Duration, inbox: Duration) -> Self {
        Retention {
            sent,
            inbox,
            ..Retention::default()
        }
    }

    /// Deletes at most `rows` rows a statement.
    pub fn batch(mut self, rows: u32) -> Self {
        self.batch = rows.max(1);
        self
    }
}

/// Rows deleted by one cleanup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deleted {
    /// Sent outbox rows past their retention.
    pub sent: u64,
    /// Inbox markers past their retention.
    pub inbox: u64,
}

/// The state of an outbox, for an operator or a health check.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Rows committed and not yet sent.
    pub pending: u64,
    /// How long the oldest unsent row has waited, by the database's clock.
    pub oldest_pending: Option<Duration>,
    /// Unsent rows the broker refused at least once.
    pub refused: u64,
    /// Sent rows kept until cleanup.
    pub sent_kept: u64,
    /// Inbox markers kept.
    pub inbox_markers: u64,
    /// Up to the asked number of refused rows, oldest first.
    pub refused_rows: Vec<RefusedRow>,
}

/// An outbox row the broker refused, with why.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RefusedRow {
    /// The row's key in the outbox table.
    pub row: i64,
    /// The message's id.
    pub message_id: String,
    /// Where it goes.
    pub topic_space: String,
    /// Its routing key.
    pub routing_key: String,
    /// How often the broker refused it.
    pub attempts: i32,
    /// The last error's kind (`unroutable`, `payload_too_large`, ...).
    pub error_kind: String,
    /// The last error's text.
    pub error: String,
    /// When it is tried next.
    pub next_try: SystemTime,
}

impl Store {
    /// A store over the application's own pool, with the default table
    /// names (`outbox`, `inbox`, `migrations` in the `search_path`).
    pub fn new(pool: PgPool) -> Self {
        Store {
            pool,
            tables: Arc::new(Tables::default()),
        }
    }

    /// Connects a pool of up to 10 connections to `url`: for programs
    /// without a pool of their own (the CLI, examples). The error names the
    /// host, never the password.
    pub async fn connect(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse().map_err(|e| {
            Error::config(format!(
                "not a PostgreSQL URL: `{}`",
                ticketrail_core::redact_url(url)
            ))
            .with_source(e)
        })?;
        let doing = format!(
            "connecting to {}:{} as `{}`",
            options.get_host(),
            options.get_port(),
            options.get_username()
        );
        // One connection first, so a refused or wrong login says so at once
        // instead of as a pool timeout.
        let first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("PostgreSQL: {doing} took over {CONNECT_TIMEOUT:?}"),
                )
            })?
            .map_err(database(&doing))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Store::new(pool))
    }

    /// Uses other table names (a schema, a prefix).
    pub fn with_tables(mut self, tables: Tables) -> Self {
        self.tables = Arc::new(tables);
        self
    }

    /// The pool, to begin the transactions the outbox writes in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table names.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// Creates or updates the tables to this version of the crate; returns
    /// the migrations it applied (none when up to date). Several processes
    /// may call it at once.
    pub async fn migrate(&self) -> Result<Vec<i32>> {
        crate::migrate::migrate(&self.pool, &self.tables).await
    }

    /// The schema version the database is at: 0 before [`migrate`](Self::migrate).
    pub async fn schema_version(&self) -> Result<i32> {
        crate::migrate::version(&self.pool, &self.tables).await
    }

    /// An outbox publishing to `topic_space`, in the caller's transactions.
    pub fn outbox(&self, topic_space: &str) -> Result<Outbox> {
        Outbox::new(&self.tables, topic_space)
    }

    /// A relay publishing this outbox's committed rows to `broker`.
    pub fn relay(&self, broker: SharedBroker) -> Relay {
        Relay::new(self.clone(), broker)
    }

    /// Wraps `handler` so that its database effects and the message's inbox
    /// marker commit in one transaction: a [`Handler`](ticketrail_core::Handler) to give a
    /// [`Consumer`](ticketrail_core::Consumer).
    pub fn inbox<H: InboxHandler>(&self, handler: H) -> Inbox<H> {
        Inbox::new(self.pool.clone(), &self.tables, handler)
    }

    /// Unsent rows and how long the oldest has waited, read through the
    /// pending rows' index alone: what a relay's gauges need every minute,
    /// without counting every sent row and inbox marker as
    /// [`outbox_stats`](Self::outbox_stats) does.
    pub(crate) async fn backlog(&self) -> Result<(u64, Option<Duration>)> {
        let row = sqlx::query(&format!(
            "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8
             FROM {} WHERE sent_at IS NULL",
            self.tables.outbox()
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(database("counting pending outbox rows"))?;
        Ok((
            row.get::<i64, _>(0).max(0) as u64,
            row.get::<Option<f64>, _>(1)
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
        ))
    }

    /// Counts pending, refused and kept rows, and lists up to
    /// `refused_rows` refused ones, oldest first.
    pub async fn outbox_stats(&self, refused_rows: u32) -> Result<OutboxStats> {
        let (outbox, inbox) = (self.tables.outbox(), self.tables.inbox());
        let counts = sqlx::query(&format!(
            "SELECT
                count(*) FILTER (WHERE sent_at IS NULL),
                extract(epoch FROM now() - min(created_at) FILTER (WHERE sent_at IS NULL))::float8,
                count(*) FILTER (WHERE sent_at IS NULL AND last_error IS NOT NULL),
                count(*) FILTER (WHERE sent_at IS NOT NULL),
                (SELECT count(*) FROM {inbox})
             FROM {outbox}"
        ))
        .fetch_one(&self.pool)
        .await
        .map_err(database("counting outbox rows"))?;
        let count = |i: usize| counts.get::<i64, _>(i).max(0) as u64;
        let rows = sqlx::query(&format!(
            "SELECT id, message_id, topic_space, routing_key, attempts, last_error_kind,
                    last_error,
                    extract(epoch FROM available_at)::float8 AS next_try
             FROM {outbox}
             WHERE sent_at IS NULL AND last_error IS NOT NULL
             ORDER BY id LIMIT $1"
        ))
        .bind(i64::from(refused_rows))
        .fetch_all(&self.pool)
        .await
        .map_err(database("listing refused outbox rows"))?;
        Ok(OutboxStats {
            pending: count(0),
            oldest_pending: counts
                .get::<Option<f64>, _>(1)
                .map(|s| Duration::from_secs_f64(s.max(0.0))),
            refused: count(2),
            sent_kept: count(3),
            inbox_markers: count(4),
            refused_rows: rows
                .iter()
                .map(|r| RefusedRow {
                    row: r.get("id"),
                    message_id: r.get("message_id"),
                    topic_space: r.get("topic_space"),
                    routing_key: r.get("routing_key"),
                    attempts: r.get("attempts"),
                    error_kind: r
                        .get::<Option<String>, _>("last_error_kind")
                        .unwrap_or_default(),
                    error: r.get::<Option<String>, _>("last_error").unwrap_or_default(),
                    next_try: SystemTime::UNIX_EPOCH
                        + Duration::from_secs_f64(r.get::<f64, _>("next_try").max(0.0)),
                })
                .collect(),
        })
    }

    /// Deletes sent outbox rows older than `sent` and inbox markers older
    /// than `inbox`, by the database's clock, `batch` rows per statement so
    /// no statement holds many locks or runs long. A running relay does
    /// this every minute; a process with inboxes and no relay calls it.
    pub async fn delete_expired(&self, retention: &Retention) -> Result<Deleted> {
        let (outbox, inbox) = (self.tables.outbox(), self.tables.inbox());
        let sent = delete_in_batches(
            &self.pool,
            &format!(
                "DELETE FROM {outbox} WHERE id IN (
                    SELECT id FROM {outbox}
                    WHERE sent_at < now() - make_interval(secs => $1)
                    ORDER BY sent_at LIMIT $2)"
            ),
            retention.sent,
            retention.batch,
        )
        .await?;
        let inbox = delete_in_batches(
            &self.pool,
            &format!(
                "DELETE FROM {inbox} WHERE (queue, message_id) IN (
                    SELECT queue, message_id FROM {inbox}
                    WHERE handled_at < now() - make_interval(secs => $1)
                    ORDER BY handled_at LIMIT $2)"
            ),
            retention.inbox,
            retention.batch,
        )
        .await?;
        Ok(Deleted { sent, inbox })
    }
}

/// Runs `delete` (with `$1` the age in seconds and `$2` the batch) until a
/// statement deletes fewer than a batch; at most 100 statements a call, so
/// a huge backlog is worked off over several cleanups.
async fn delete_in_batches(pool: &PgPool, delete: &str, age: Duration, batch: u32) -> Result<u64> {
    let mut total = 0;
    for _ in 0..100 {
        let deleted = sqlx::query(delete)
            .bind(age.as_secs_f64())
            .bind(i64::from(batch))
            .execute(pool)
            .await
            .map_err(database("deleting expired rows"))?
            .rows_affected();
        total += deleted;
        if deleted < u64::from(batch) {
            break;
        }
    }
    Ok(total)
}
