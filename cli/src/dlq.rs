//! `ticketrail dlq list|show|stats|replay|purge|export QUEUE`: a DLQ of any
//! size, walked one record at a time with the broker's dead-letter cursor.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{ArgGroup, Args, Subcommand};
use serde_json::json;
use ticketrail::backend::{DeadLetterCursor, DeadLetterEntry};
use ticketrail::{DeadLetter, DeadLetterReason, SharedBroker};

use crate::output::{confirm, interactive, json_line, table, Progress};
use crate::records::{group_of, one_line, rfc3339, selects, to_json};
use crate::{Failure, Filters, Outcome};

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Lists dead letters, oldest first: id, routing key, reason, attempts,
    /// first and last failure, the error.
    List {
        /// The work queue whose DLQ to read.
        queue: String,
        #[command(flatten)]
        filters: Filters,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON object per record and line: the whole record.
        #[arg(long)]
        json: bool,
    },
    /// Shows one record in full, the payload pretty-printed when it is JSON.
    Show {
        /// The work queue whose DLQ to read.
        queue: String,
        /// The message id.
        id: String,
        /// The record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Counts by reason, and failure groups: errors that differ only in
    /// numbers, ids, e-mail addresses or quoted values.
    Stats {
        /// The work queue whose DLQ to read.
        queue: String,
        /// One JSON object per group and line.
        #[arg(long)]
        json: bool,
    },
    /// Replays dead letters to their work queue: same id, attempts reset,
    /// each removed from the DLQ only once its republish is confirmed.
    Replay(ReplayArgs),
    /// Removes dead letters for good.
    Purge {
        /// The work queue whose DLQ to purge.
        queue: String,
        #[command(flatten)]
        filters: Filters,
        /// Do not ask (required when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Writes dead letters as JSON lines (the objects of `list --json`).
    Export {
        /// The work queue whose DLQ to read.
        queue: String,
        #[command(flatten)]
        filters: Filters,
        /// The file to write (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("which")
        .required(true)
        .multiple(true)
        .args(["all", "ids", "group", "reason", "grep", "since"]),
))]
pub(crate) struct ReplayArgs {
    /// The work queue whose DLQ to replay.
    queue: String,
    /// Every record.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    filters: Filters,
    /// Lists what would be replayed; changes nothing.
    #[arg(long)]
    dry_run: bool,
    /// At most this many messages per second.
    #[arg(long, value_name = "N")]
    rate: Option<f64>,
    /// Replays one, waits until it is handled or dead-lettered again,
    /// reports which, and asks before going on.
    #[arg(long)]
    first: bool,
    /// With --first: how long to wait for the first one.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Do not ask before going on.
    #[arg(long)]
    yes: bool,
    /// Replays each as a new message, with a fresh id (the old one in the
    /// `replayed-from` header): for messages an inbox already handled, which
    /// it would skip as duplicates under their own id.
    #[arg(long)]
    new_id: bool,
}

pub(crate) async fn run(broker: &SharedBroker, command: DlqCommand) -> Outcome {
    match command {
        DlqCommand::List {
            queue,
            filters,
            limit,
            json,
        } => list(broker, &queue, &filters, limit, json).await,
        DlqCommand::Show { queue, id, json } => show(broker, &queue, &id, json).await,
        DlqCommand::Stats { queue, json } => stats(broker, &queue, json).await,
        DlqCommand::Replay(args) => replay(broker, args).await,
        DlqCommand::Purge {
            queue,
            filters,
            yes,
        } => purge(broker, &queue, &filters, yes).await,
        DlqCommand::Export {
            queue,
            filters,
            output,
        } => export(broker, &queue, &filters, output).await,
    }
}

/// Walks the DLQ of `queue`, calling `each` with every record the filters
/// select until it returns `false`. Records stay in the DLQ.
async fn walk(
    broker: &SharedBroker,
    queue: &str,
    filters: &Filters,
    mut each: impl FnMut(DeadLetter) -> Result<bool, Failure>,
) -> Outcome {
    let now = SystemTime::now();
    let mut cursor = broker.dead_letter_cursor(queue).await?;
    let walked = async {
        while let Some(entry) = cursor.next().await {
            let record = entry?.into_record();
            if selects(filters, &record, now) && !each(record)? {
                break;
            }
        }
        Ok(())
    }
    .await;
    close_after(cursor, walked).await
}

/// Closes `cursor` once a walk over it is over, so that what follows (a
/// replay after its count, a listing after Ctrl-C) meets every record it
/// held; the walk's own failure is the one reported.
async fn close_after<T>(
    cursor: Box<dyn DeadLetterCursor>,
    walked: Result<T, Failure>,
) -> Result<T, Failure> {
    let closed = cursor.close().await;
    let value = walked?;
    closed?;
    Ok(value)
}

/// How many records the filters select.
async fn count_selected(
    broker: &SharedBroker,
    queue: &str,
    filters: &Filters,
) -> Result<u64, Failure> {
    let mut n = 0;
    walk(broker, queue, filters, |_| {
        n += 1;
        Ok(true)
    })
    .await?;
    Ok(n)
}

const LIST_HEADERS: [&str; 7] = [
    "id",
    "routing key",
    "reason",
    "attempts",
    "first failed",
    "last failed",
    "error",
];

fn list_row(record: &DeadLetter) -> Vec<String> {
    vec![
        record.envelope.id.clone(),
        record.envelope.routing_key.clone(),
        record.reason.to_string(),
        record.attempts.to_string(),
        rfc3339(record.first_failed_at),
        rfc3339(record.last_failed_at),
        one_line(&record.last_error),
    ]
}

/// Rows per printed table: a long listing is printed page by page, so
/// nothing but one page is ever held.
const PAGE: usize = 100;

async fn list(
    broker: &SharedBroker,
    queue: &str,
    filters: &Filters,
    limit: Option<usize>,
    json: bool,
) -> Outcome {
    let limit = limit.unwrap_or(usize::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut listed = 0usize;
    let mut page = Vec::new();
    walk(broker, queue, filters, |record| {
        if listed == limit {
            return Ok(false);
        }
        listed += 1;
        if json {
            json_line(&mut out, &to_json(&record))?;
        } else {
            page.push(list_row(&record));
            if page.len() == PAGE {
                print_page(&mut out, &mut page)?;
            }
        }
        Ok(true)
    })
    .await?;
    if !json {
        if !page.is_empty() {
            print_page(&mut out, &mut page)?;
        }
        writeln!(out, "{listed} dead letter(s) of `{queue}`")?;
    }
    out.flush()?;
    Ok(())
}

fn print_page(out: &mut impl Write, page: &mut Vec<Vec<String>>) -> std::io::Result<()> {
    let mut t = table(&LIST_HEADERS);
    for row in page.drain(..) {
        t.add_row(row);
    }
    writeln!(out, "{t}")
}

async fn show(broker: &SharedBroker, queue: &str, id: &str, json: bool) -> Outcome {
    let filters = Filters {
        ids: vec![id.to_owned()],
        ..Filters::default()
    };
    let mut found = None;
    walk(broker, queue, &filters, |record| {
        found = Some(record);
        Ok(false)
    })
    .await?;
    let record = found.ok_or_else(|| {
        Failure::Error(format!(
            "no dead letter with id `{id}` in the DLQ of `{queue}`"
        ))
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        json_line(&mut out, &to_json(&record))?;
        return Ok(());
    }
    let envelope = &record.envelope;
    let group = group_of(&record);
    let mut t = table(&["field", "value"]);
    for (field, value) in [
        ("id", envelope.id.clone()),
        ("queue", record.queue.clone()),
        ("routing key", envelope.routing_key.clone()),
        ("reason", record.reason.to_string()),
        ("attempts", record.attempts.to_string()),
        ("first failed", rfc3339(record.first_failed_at)),
        ("last failed", rfc3339(record.last_failed_at)),
        ("published", rfc3339(envelope.published_at)),
        ("error", record.last_error.clone()),
        ("group", format!("{} ({})", group.id, group.pattern)),
        (
            "content type",
            envelope.content_type.clone().unwrap_or_default(),
        ),
    ] {
        t.add_row(vec![field.to_owned(), value]);
    }
    for (key, value) in &envelope.headers {
        t.add_row(vec![format!("header {key}"), value.clone()]);
    }
    for note in &record.notes {
        t.add_row(vec!["note".to_owned(), note.clone()]);
    }
    writeln!(out, "{t}")?;
    let payload = match serde_json::from_slice::<serde_json::Value>(&envelope.payload) {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => match std::str::from_utf8(&envelope.payload) {
            Ok(text) => text.to_owned(),
            Err(_) => format!(
                "({} bytes, not text; base64) {}",
                envelope.payload.len(),
                to_json(&record)["payload"].as_str().unwrap_or_default()
            ),
        },
    };
    writeln!(out, "payload:\n{payload}")?;
    Ok(())
}

/// One failure group as `dlq stats` counts it.
struct GroupCount {
    reason: DeadLetterReason,
    pattern: String,
    sample: String,
    count: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

async fn stats(broker: &SharedBroker, queue: &str, json: bool) -> Outcome {
    let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut groups: HashMap<String, GroupCount> = HashMap::new();
    walk(broker, queue, &Filters::default(), |record| {
        *by_reason.entry(record.reason.as_str()).or_default() += 1;
        let group = group_of(&record);
        let entry = groups.entry(group.id).or_insert_with(|| GroupCount {
            reason: record.reason,
            pattern: group.pattern,
            sample: one_line(&record.last_error),
            count: 0,
            first_seen: record.first_failed_at,
            last_seen: record.last_failed_at,
        });
        entry.count += 1;
        entry.first_seen = entry.first_seen.min(record.first_failed_at);
        entry.last_seen = entry.last_seen.max(record.last_failed_at);
        Ok(true)
    })
    .await?;
    let mut groups: Vec<(String, GroupCount)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
    let mut out = std::io::stdout().lock();
    if json {
        for (id, g) in &groups {
            json_line(
                &mut out,
                &json!({
                    "group": id,
                    "reason": g.reason.as_str(),
                    "count": g.count,
                    "pattern": g.pattern,
                    "sample_error": g.sample,
                    "first_seen": rfc3339(g.first_seen),
                    "last_seen": rfc3339(g.last_seen),
                }),
            )?;
        }
        return Ok(());
    }
    let total: u64 = by_reason.values().sum();
    writeln!(out, "{total} dead letter(s) of `{queue}`")?;
    let mut reasons = table(&["reason", "count"]);
    for (reason, n) in &by_reason {
        reasons.add_row(vec![(*reason).to_owned(), n.to_string()]);
    }
    writeln!(out, "{reasons}")?;
    let mut t = table(&[
        "group",
        "reason",
        "count",
        "first seen",
        "last seen",
        "sample error",
    ]);
    for (id, g) in &groups {
        t.add_row(vec![
            id.clone(),
            g.reason.to_string(),
            g.count.to_string(),
            rfc3339(g.first_seen),
            rfc3339(g.last_seen),
            g.sample.clone(),
        ]);
    }
    writeln!(out, "{t}")?;
    if let Some((id, _)) = groups.first() {
        writeln!(
            out,
            "replay a group with `ticketrail dlq replay {queue} --group {id}`"
        )?;
    }
    Ok(())
}

/// Set by Ctrl-C: stop after the message in hand.
fn interrupt_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    stop
}

async fn replay(broker: &SharedBroker, args: ReplayArgs) -> Outcome {
    let queue = args.queue.as_str();
    let filters = &args.filters;
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(Failure::Error("--rate must be a positive number".into()));
    }
    let total = count_selected(broker, queue, filters).await?;
    if total == 0 {
        println!("no dead letters of `{queue}` match; nothing replayed");
        return Ok(());
    }
    if args.dry_run {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let mut page = Vec::new();
        walk(broker, queue, filters, |record| {
            page.push(list_row(&record));
            if page.len() == PAGE {
                print_page(&mut out, &mut page)?;
            }
            Ok(true)
        })
        .await?;
        if !page.is_empty() {
            print_page(&mut out, &mut page)?;
        }
        writeln!(
            out,
            "dry run: would replay {total} dead letter(s) of `{queue}`; nothing changed"
        )?;
        out.flush()?;
        return Ok(());
    }
    let stop = interrupt_flag();
    let mut left = total;
    if args.first {
        let first = replay_first(broker, queue, filters, args.wait, args.new_id).await?;
        left -= 1;
        println!("{first}");
        if left == 0 {
            return Ok(());
        }
        let go_on = if args.yes {
            true
        } else if interactive() {
            confirm(&format!("replay the other {left}?"))?
        } else {
            println!("not on a terminal: pass --yes to replay the other {left}");
            false
        };
        if !go_on {
            println!("stopped: replayed 1, left {left} in the DLQ");
            return Ok(());
        }
    }
    let mut progress = Progress::new("replaying", left);
    let pace = args.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_at = Instant::now();
    let mut replayed = 0u64;
    let now = SystemTime::now();
    let mut cursor = broker.dead_letter_cursor(queue).await?;
    let walked = async {
        while let Some(entry) = cursor.next().await {
            let entry: DeadLetterEntry = entry?;
            if !selects(filters, entry.record(), now) {
                continue;
            }
            if stop.load(Ordering::SeqCst) {
                return Ok(true);
            }
            if let Some(pace) = pace {
                tokio::time::sleep_until(next_at.into()).await;
                next_at = next_at.max(Instant::now() - pace) + pace;
                if stop.load(Ordering::SeqCst) {
                    return Ok(true);
                }
            }
            if args.new_id {
                entry.replay_with_new_id().await?;
            } else {
                entry.replay().await?;
            }
            replayed += 1;
            progress.inc();
        }
        Ok(false)
    }
    .await;
    let interrupted = close_after(cursor, walked).await?;
    progress.finish();
    let left = left - replayed;
    if interrupted {
        println!("interrupted: replayed {replayed}, left {left} in the DLQ of `{queue}`");
        return Err(Failure::Interrupted);
    }
    println!("replayed {replayed} dead letter(s) to `{queue}`");
    Ok(())
}

/// Replays the first selected record and waits for its fate.
async fn replay_first(
    broker: &SharedBroker,
    queue: &str,
    filters: &Filters,
    wait: Duration,
    new_id: bool,
) -> Result<String, Failure> {
    let before = broker
        .queue_stats(queue)
        .await
        .ok()
        .and_then(|s| s.dead_letters);
    let now = SystemTime::now();
    let mut cursor = broker.dead_letter_cursor(queue).await?;
    let walked = async {
        while let Some(entry) = cursor.next().await {
            let entry = entry?;
            if selects(filters, entry.record(), now) {
                let replayed_at = SystemTime::now();
                let id = if new_id {
                    entry.replay_with_new_id().await?
                } else {
                    let id = entry.record().envelope.id.clone();
                    entry.replay().await?;
                    id
                };
                return Ok((id, replayed_at));
            }
        }
        Err(Failure::Error("no dead letter matches".into()))
    }
    .await;
    let (id, replayed_at) = close_after(cursor, walked).await?;
    println!(
        "replayed {id}; waiting up to {} for it to be handled",
        humantime::format_duration(wait)
    );
    let deadline = Instant::now() + wait;
    let mut settled_since: Option<Instant> = None;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = broker.queue_stats(queue).await?;
        // Back in the DLQ? Only then is it worth reading it.
        if stats
            .dead_letters
            .zip(before)
            .is_some_and(|(now, before)| now >= before)
        {
            let again = Filters {
                ids: vec![id.clone()],
                ..Filters::default()
            };
            let mut record = None;
            walk(broker, queue, &again, |r| {
                if r.last_failed_at >= replayed_at {
                    record = Some(r);
                }
                Ok(record.is_none())
            })
            .await?;
            if let Some(r) = record {
                return Ok(format!(
                    "{id} was dead-lettered again ({}, attempt {}): {}",
                    r.reason,
                    r.attempts,
                    one_line(&r.last_error)
                ));
            }
        }
        let drained = stats.ready == Some(0)
            && stats.waiting_retries.unwrap_or(0) == 0
            && stats.in_flight.unwrap_or(0) == 0;
        match (drained, settled_since) {
            (false, _) => settled_since = None,
            (true, None) => settled_since = Some(Instant::now()),
            (true, Some(since)) if since.elapsed() >= Duration::from_secs(2) => {
                return Ok(format!(
                    "{id} was handled: it left the queue and did not come back to the DLQ"
                ));
            }
            (true, Some(_)) => {}
        }
    }
    Ok(format!(
        "{id} is still pending after {} (in the queue, in flight or waiting for a retry)",
        humantime::format_duration(wait)
    ))
}

fn no_filters(filters: &Filters) -> bool {
    filters.reason.is_none()
        && filters.grep.is_none()
        && filters.since.is_none()
        && filters.group.is_none()
        && filters.ids.is_empty()
}

async fn purge(broker: &SharedBroker, queue: &str, filters: &Filters, yes: bool) -> Outcome {
    let total = count_selected(broker, queue, filters).await?;
    if total == 0 {
        println!("no dead letters of `{queue}` match; nothing purged");
        return Ok(());
    }
    if !yes {
        if !interactive() {
            return Err(Failure::Error(format!(
                "refusing to purge {total} dead letter(s) of `{queue}` without --yes (not on a terminal)"
            )));
        }
        if !confirm(&format!(
            "purge {total} dead letter(s) of `{queue}` for good?"
        ))? {
            println!("nothing purged");
            return Ok(());
        }
    }
    let purged = if no_filters(filters) {
        broker.purge_dead_letters(queue).await? as u64
    } else {
        let now = SystemTime::now();
        let mut cursor = broker.dead_letter_cursor(queue).await?;
        let walked = async {
            let mut purged = 0u64;
            while let Some(entry) = cursor.next().await {
                let entry = entry?;
                if selects(filters, entry.record(), now) {
                    entry.remove().await?;
                    purged += 1;
                }
            }
            Ok(purged)
        }
        .await;
        close_after(cursor, walked).await?
    };
    println!("purged {purged} dead letter(s) of `{queue}`");
    Ok(())
}

async fn export(
    broker: &SharedBroker,
    queue: &str,
    filters: &Filters,
    output: Option<PathBuf>,
) -> Outcome {
    let mut out: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| Failure::Error(format!("creating `{}`: {e}", path.display())))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut exported = 0u64;
    walk(broker, queue, filters, |record| {
        json_line(&mut out, &to_json(&record))?;
        exported += 1;
        Ok(true)
    })
    .await?;
    out.flush()?;
    if let Some(path) = output {
        eprintln!(
            "exported {exported} dead letter(s) of `{queue}` to {}",
            path.display()
        );
    }
    Ok(())
}
