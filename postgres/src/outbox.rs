//! Writing messages into the outbox, inside the caller's transaction.

use std::sync::Arc;

use serde::Serialize;
use sqlx::types::Json as JsonColumn;
use sqlx::PgConnection;
use ticketrail_core::{Codec, Json, Message, Result};

use crate::error::database;
use crate::tables::Tables;

/// What the outbox names as the place a stored message waits in, in its
/// `publish` span (C18).
const SYSTEM: &str = "postgresql";

/// Publishes into the outbox table of one topic space, inside the caller's
/// transaction: the message leaves for the broker only once that
/// transaction commits, and never if it rolls back. A
/// [`Relay`](crate::Relay) sends it, with the id it has here.
///
/// ```no_run
/// # async fn demo(store: ticketrail_postgres::Store) -> ticketrail_core::Result<()> {
/// let outbox = store.outbox("app.events")?;
/// let mut tx = store.pool().begin().await.expect("begin");
/// sqlx::query("INSERT INTO users (email) VALUES ($1)")
///     .bind("ada@example.com")
///     .execute(&mut *tx)
///     .await
///     .expect("insert");
/// let id = outbox
///     .publish(&mut tx, "user.welcome", &serde_json::json!({"to": "ada@example.com"}))
///     .await?;
/// tx.commit().await.expect("commit"); // now, and only now, the relay sees it
/// # let _ = id; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox<C: Codec = Json> {
    insert: Arc<str>,
    topic_space: Arc<str>,
    stored: metrics::Counter,
    codec: C,
}

impl Outbox<Json> {
    pub(crate) fn new(tables: &Tables, topic_space: &str) -> Result<Self> {
        ticketrail_core::validate_name("topic space", topic_space)?;
        let insert = format!(
            "INSERT INTO {} (message_id, topic_space, routing_key, payload, content_type, headers)
             VALUES ($1, $2, $3, $4, $5, $6)",
            tables.outbox()
        );
        Ok(Outbox {
            insert: insert.into(),
            stored: crate::metrics::stored(topic_space),
            topic_space: topic_space.into(),
            codec: Json,
        })
    }
}

impl<C: Codec> Outbox<C> {
    /// Uses another codec.
    pub fn with_codec<C2: Codec>(self, codec: C2) -> Outbox<C2> {
        Outbox {
            insert: self.insert,
            topic_space: self.topic_space,
            stored: self.stored,
            codec,
        }
    }

    /// The topic space this outbox publishes to.
    pub fn topic_space(&self) -> &str {
        &self.topic_space
    }

    /// Encodes `message`, stores it with a fresh id in the transaction
    /// `conn` is in (pass `&mut tx` for an `sqlx::Transaction`) and returns
    /// the id. Nothing reaches the broker before the transaction commits.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        conn: &mut PgConnection,
        routing_key: &str,
        message: &T,
    ) -> Result<String> {
        let payload = self.codec.encode(message)?;
        let message = Message::new(routing_key, payload).content_type(self.codec.content_type());
        let id = message.id.clone();
        self.publish_message(conn, message).await?;
        Ok(id)
    }

    /// Stores a prepared message (its id, headers and content type kept) in
    /// the transaction `conn` is in.
    ///
    /// The routing key and id are checked here, so a bad one fails the
    /// caller's transaction with a clear error instead of waiting in the
    /// outbox; the payload's size is the broker's to judge when the relay
    /// sends it (a refused row is kept with its error).
    pub async fn publish_message(
        &self,
        conn: &mut PgConnection,
        mut message: Message,
    ) -> Result<()> {
        message.check_contents(usize::MAX, "the outbox")?;
        ticketrail_core::trace::record_stored_publish(SYSTEM, &self.topic_space, &mut message);
        sqlx::query(&self.insert)
            .bind(&message.id)
            .bind(&*self.topic_space)
            .bind(&message.routing_key)
            .bind(&message.payload[..])
            .bind(message.content_type.as_deref())
            .bind(JsonColumn(&message.headers))
            .execute(conn)
            .await
            .map_err(database("writing an outbox row"))?;
        self.stored.increment(1);
        Ok(())
    }
}
