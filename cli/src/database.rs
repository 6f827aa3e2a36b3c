//! `ticketrail db migrate` and `ticketrail outbox stats`: the PostgreSQL
//! tables of the outbox and inbox.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use serde_json::json;
use ticketrail::postgres::{Store, Tables};

use crate::output::{json_line, table};
use crate::Outcome;

/// Where the tables are.
#[derive(Debug, Args)]
pub(crate) struct DatabaseArgs {
    /// The application's database: postgres://user:pass@host:5432/db.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub(crate) database: String,
    /// The schema holding the tables (default: the connection's search_path).
    #[arg(long)]
    schema: Option<String>,
    /// The prefix of the table names (`tr_` for `tr_outbox`).
    #[arg(long, default_value = "")]
    prefix: String,
}

impl DatabaseArgs {
    async fn store(&self) -> ticketrail::Result<Store> {
        let mut tables = Tables::default().prefix(&self.prefix)?;
        if let Some(schema) = &self.schema {
            tables = tables.schema(schema)?;
        }
        Ok(Store::connect(&self.database).await?.with_tables(tables))
    }
}

/// `ticketrail db ...`
#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Create or update the outbox and inbox tables to this version.
    Migrate(DatabaseArgs),
}

/// `ticketrail outbox ...`
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// Pending rows and the oldest one's age, rows the broker refused (with
    /// why), sent rows and inbox markers kept.
    Stats {
        #[command(flatten)]
        database: DatabaseArgs,
        /// List at most this many refused rows.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON object: the counts and the refused rows.
        #[arg(long)]
        json: bool,
    },
}

impl DbCommand {
    pub(crate) fn database(&self) -> &str {
        match self {
            DbCommand::Migrate(args) => &args.database,
        }
    }
}

impl OutboxCommand {
    pub(crate) fn database(&self) -> &str {
        match self {
            OutboxCommand::Stats { database, .. } => &database.database,
        }
    }
}

pub(crate) async fn migrate(command: DbCommand) -> Outcome {
    let DbCommand::Migrate(args) = command;
    let store = args.store().await?;
    let applied = store.migrate().await?;
    let version = store.schema_version().await?;
    let mut out = std::io::stdout().lock();
    if applied.is_empty() {
        writeln!(
            out,
            "{} is up to date (schema version {version})",
            store.tables().outbox()
        )?;
    } else {
        let applied: Vec<String> = applied.iter().map(i32::to_string).collect();
        writeln!(
            out,
            "applied migration {} to {}; schema version {version}",
            applied.join(", "),
            store.tables().outbox()
        )?;
    }
    Ok(())
}

pub(crate) async fn outbox(command: OutboxCommand) -> Outcome {
    let OutboxCommand::Stats {
        database,
        limit,
        json,
    } = command;
    let stats = database.store().await?.outbox_stats(limit).await?;
    let mut out = std::io::stdout().lock();
    let seconds = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    if json {
        let refused: Vec<_> = stats
            .refused_rows
            .iter()
            .map(|r| {
                json!({
                    "row": r.row,
                    "message_id": r.message_id,
                    "topic_space": r.topic_space,
                    "routing_key": r.routing_key,
                    "attempts": r.attempts,
                    "error_kind": r.error_kind,
                    "error": r.error,
                    "next_try_ms": unix(r.next_try),
                })
            })
            .collect();
        return Ok(json_line(
            &mut out,
            &json!({
                "pending": stats.pending,
                "oldest_pending_seconds": seconds(stats.oldest_pending),
                "refused": stats.refused,
                "sent_kept": stats.sent_kept,
                "inbox_markers": stats.inbox_markers,
                "refused_rows": refused,
            }),
        )?);
    }
    let mut t = table(&[
        "pending",
        "oldest pending",
        "refused",
        "sent (kept)",
        "inbox markers",
    ]);
    t.add_row(vec![
        stats.pending.to_string(),
        stats
            .oldest_pending
            .map(|d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string())
            .unwrap_or_else(|| "-".to_owned()),
        stats.refused.to_string(),
        stats.sent_kept.to_string(),
        stats.inbox_markers.to_string(),
    ]);
    writeln!(out, "{t}")?;
    if !stats.refused_rows.is_empty() {
        let mut t = table(&["row", "message id", "routing key", "tries", "error"]);
        for r in &stats.refused_rows {
            t.add_row(vec![
                r.row.to_string(),
                r.message_id.clone(),
                format!("{} {}", r.topic_space, r.routing_key),
                r.attempts.to_string(),
                format!("{}: {}", r.error_kind, r.error),
            ]);
        }
        writeln!(
            out,
            "refused by the broker (kept, tried again with a growing wait):\n{t}"
        )?;
    }
    Ok(())
}
