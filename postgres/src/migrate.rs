//! The schema ticketrail needs, as numbered migrations applied in order.

use sqlx::{PgPool, Row};
use ticketrail_core::Result;

use crate::error::database;
use crate::tables::Tables;

/// One step of the schema: its number and its statements, with the table
/// names still to fill in.
struct Migration {
    version: i32,
    statements: fn(&Tables) -> Vec<String>,
}

/// Every migration, oldest first. A released migration is never changed:
/// a new one is added after it.
const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    statements: outbox_and_inbox,
}];

/// The version the newest migration brings the schema to.
pub const SCHEMA_VERSION: i32 = 1;

fn outbox_and_inbox(t: &Tables) -> Vec<String> {
    let (outbox, inbox, notify) = (t.outbox(), t.inbox(), t.notify_function());
    let channel = t.channel();
    vec![
        // `id` orders rows only roughly: two transactions may commit in the
        // other order than they took their ids, so relays never skip ahead
        // by id; they take every unsent row they can lock.
        format!(
            "CREATE TABLE {outbox} (
                id bigserial PRIMARY KEY,
                message_id text NOT NULL,
                topic_space text NOT NULL,
                routing_key text NOT NULL,
                payload bytea NOT NULL,
                content_type text,
                headers jsonb NOT NULL DEFAULT '{{}}',
                created_at timestamptz NOT NULL DEFAULT now(),
                available_at timestamptz NOT NULL DEFAULT now(),
                attempts integer NOT NULL DEFAULT 0,
                last_error_kind text,
                last_error text,
                sent_at timestamptz
            )"
        ),
        format!(
            "CREATE INDEX {} ON {outbox} (id) WHERE sent_at IS NULL",
            t.local("outbox_pending")
        ),
        format!(
            "CREATE INDEX {} ON {outbox} (sent_at) WHERE sent_at IS NOT NULL",
            t.local("outbox_sent")
        ),
        format!(
            "CREATE TABLE {inbox} (
                queue text NOT NULL,
                message_id text NOT NULL,
                handled_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (queue, message_id)
            )"
        ),
        format!(
            "CREATE INDEX {} ON {inbox} (handled_at)",
            t.local("inbox_handled")
        ),
        // One notification per inserting statement, sent at commit (and
        // never for a rolled-back one): a wake-up, not a queue.
        format!(
            "CREATE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$"
        ),
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {outbox}
             FOR EACH STATEMENT EXECUTE FUNCTION {notify}()",
            t.local("outbox_inserted")
        ),
    ]
}

/// Brings the tables of `tables` up to [`SCHEMA_VERSION`], creating the
/// schema if it is missing; returns the versions it applied. Safe to run
/// from several processes at once: they take turns under an advisory lock,
/// and each migration commits with the row that records it.
pub(crate) async fn migrate(pool: &PgPool, tables: &Tables) -> Result<Vec<i32>> {
    let mut tx = pool
        .begin()
        .await
        .map_err(database("starting the migration"))?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(tables.lock_key())
        .execute(&mut *tx)
        .await
        .map_err(database("taking the migration lock"))?;
    if let Some(schema) = tables.schema_name() {
        sqlx::query(&format!(r#"CREATE SCHEMA IF NOT EXISTS "{schema}""#))
            .execute(&mut *tx)
            .await
            .map_err(database("creating the schema"))?;
    }
    let migrations = tables.migrations();
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {migrations} (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )"
    ))
    .execute(&mut *tx)
    .await
    .map_err(database("creating the migrations table"))?;
    let current: i32 = sqlx::query(&format!(
        "SELECT coalesce(max(version), 0) FROM {migrations}"
    ))
    .fetch_one(&mut *tx)
    .await
    .map_err(database("reading the schema version"))?
    .get(0);
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        for statement in (migration.statements)(tables) {
            sqlx::query(&statement)
                .execute(&mut *tx)
                .await
                .map_err(database(&format!(
                    "applying migration {} of {}",
                    migration.version,
                    tables.outbox()
                )))?;
        }
        sqlx::query(&format!("INSERT INTO {migrations} (version) VALUES ($1)"))
            .bind(migration.version)
            .execute(&mut *tx)
            .await
            .map_err(database("recording the migration"))?;
        applied.push(migration.version);
    }
    tx.commit()
        .await
        .map_err(database("committing the migration"))?;
    Ok(applied)
}

/// The version the tables are at: 0 before the first migration.
pub(crate) async fn version(pool: &PgPool, tables: &Tables) -> Result<i32> {
    let exists: bool = sqlx::query("SELECT to_regclass($1) IS NOT NULL")
        .bind(tables.migrations())
        .fetch_one(pool)
        .await
        .map_err(database("looking for the migrations table"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let version: i32 = sqlx::query(&format!(
        "SELECT coalesce(max(version), 0) FROM {}",
        tables.migrations()
    ))
    .fetch_one(pool)
    .await
    .map_err(database("reading the schema version"))?
    .get(0);
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_up_to_the_schema_version() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i32> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
