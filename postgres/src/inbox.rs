//! The inbox: a handler's database effects and its message's marker commit
//! together, so a redelivered message does not apply them twice.

use std::future::Future;

use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool};
use ticketrail_core::{Context, Handler, HandlerError};

use crate::error::database;
use crate::tables::Tables;

/// A handler whose effects go into the application's database, in the
/// transaction the inbox gives it. Wrap it with
/// [`Store::inbox`](crate::Store::inbox) and give that to a
/// [`Consumer`](ticketrail_core::Consumer).
///
/// ```no_run
/// use serde::Deserialize;
/// use sqlx::PgConnection;
/// use ticketrail_core::{Context, HandlerError};
/// use ticketrail_postgres::InboxHandler;
///
/// #[derive(Deserialize)]
/// struct Welcome { user_id: i64 }
///
/// struct RecordWelcome;
///
/// impl InboxHandler for RecordWelcome {
///     type Message = Welcome;
///
///     async fn handle(&self, msg: Welcome, ctx: &Context, db: &mut PgConnection) -> Result<(), HandlerError> {
///         sqlx::query("INSERT INTO sent_emails (user_id, message_id) VALUES ($1, $2)")
///             .bind(msg.user_id)
///             .bind(ctx.id())
///             .execute(db)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
///
/// Effects outside the database (an email sent over SMTP, an HTTP call)
/// still happen at least once: the inbox cannot take back a call made
/// before its transaction failed to commit. Record such a call's own
/// idempotency key where the provider takes one.
pub trait InboxHandler: Send + Sync + 'static {
    /// The message type, decoded by the consumer's codec.
    type Message: DeserializeOwned + Send + 'static;

    /// Applies the message's effects through `db`, a connection inside the
    /// transaction that also records the message as handled. `Ok` commits
    /// both; an error (or a panic) rolls both back and takes the normal
    /// retry or dead-letter path.
    fn handle(
        &self,
        message: Self::Message,
        ctx: &Context,
        db: &mut PgConnection,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A [`Handler`] that runs an [`InboxHandler`] at most once per queue and
/// message id with committed effects.
///
/// # Behavior
/// For each delivery it begins a transaction and inserts the marker
/// `(queue, message id)`:
/// - a new marker: the handler runs in the same transaction; `Ok` commits
///   effects and marker together, then the delivery is acked;
/// - a marker already committed: the message's effects are in the
///   database, so the handler is skipped and the delivery acked (counted in
///   `ticketrail.inbox.duplicates`). This is a redelivery after a lost ack,
///   a duplicate publish, or a replay of a message that had succeeded;
/// - a marker another consumer holds uncommitted (two copies of one id at
///   once): the insert waits for that transaction, then either skips (it
///   committed) or runs (it rolled back).
///
/// A failed attempt commits nothing, marker included, so its retries and a
/// DLQ replay run the handler again. Copies of one message in two queues
/// (fan-out) have distinct markers and each runs once.
pub struct Inbox<H> {
    pool: PgPool,
    mark: String,
    handler: H,
}

impl<H> std::fmt::Debug for Inbox<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("mark", &self.mark).finish()
    }
}

impl<H: InboxHandler> Inbox<H> {
    pub(crate) fn new(pool: PgPool, tables: &Tables, handler: H) -> Self {
        Inbox {
            pool,
            mark: format!(
                "INSERT INTO {} (queue, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                tables.inbox()
            ),
            handler,
        }
    }
}

impl<H: InboxHandler> Handler for Inbox<H> {
    type Message = H::Message;

    async fn handle(&self, message: H::Message, ctx: &Context) -> Result<(), HandlerError> {
        let mut tx =
            self.pool.begin().await.map_err(|e| {
                HandlerError::retryable(database("beginning the inbox transaction")(e))
            })?;
        let fresh = sqlx::query(&self.mark)
            .bind(ctx.queue())
            .bind(ctx.id())
            .execute(&mut *tx)
            .await
            .map_err(|e| HandlerError::retryable(database("writing the inbox marker")(e)))?
            .rows_affected()
            == 1;
        if !fresh {
            // Nothing written: ending the transaction releases the
            // connection's snapshot and nothing else.
            let _ = tx.rollback().await;
            crate::metrics::duplicate(ctx.queue());
            tracing::info!(
                queue = ctx.queue(),
                id = ctx.id(),
                attempt = ctx.attempt(),
                "already handled: effects committed before; skipped"
            );
            return Ok(());
        }
        // An error returns before the commit: dropping `tx` rolls back the
        // effects and the marker together. So does a panic, which the
        // consumer catches.
        self.handler.handle(message, ctx, &mut tx).await?;
        tx.commit().await.map_err(|e| {
            HandlerError::retryable(database("committing the inbox transaction")(e))
        })?;
        Ok(())
    }
}
