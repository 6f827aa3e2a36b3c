//! `ticketrail stats QUEUE... [--space SPACE]...`; with no queue, every
//! queue of each topic space the broker can list.

use std::io::Write;

use clap::Args;
use serde_json::json;
use ticketrail::{ErrorKind, SharedBroker};

use crate::output::{count, json_line, table};
use crate::Outcome;

#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// The work queues; with none, every queue of each `--space` (where
    /// the broker lists them: AMQP lists no queues, so on RabbitMQ name
    /// them).
    #[arg(required_unless_present = "spaces", value_name = "QUEUE")]
    queues: Vec<String>,
    /// A topic space (repeatable): how many messages published for later
    /// it holds, not yet due (they are not counted as ready before then).
    #[arg(long = "space", value_name = "SPACE")]
    spaces: Vec<String>,
    /// One JSON object per queue and line: queue, ready, in_flight,
    /// waiting_retries, dead_letters, consumers (null where unknown); and
    /// per topic space: topic_space, scheduled, all_topic_spaces.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(broker: &SharedBroker, args: StatsArgs) -> Outcome {
    let mut queues = args.queues.clone();
    if queues.is_empty() {
        for space in &args.spaces {
            match broker.queues(space).await {
                Ok(names) => queues.extend(names),
                Err(e) if e.kind() == ErrorKind::Unsupported => eprintln!("ticketrail: {e}"),
                Err(e) => return Err(e.into()),
            }
        }
    }
    if queues.len() >= crate::topology::MANY {
        eprintln!(
            "reading the statistics of {} queues on {}...",
            queues.len(),
            broker.describe()
        );
    }
    let mut rows = Vec::new();
    for queue in &queues {
        rows.push(broker.queue_stats(queue).await?);
    }
    let mut scheduled = Vec::new();
    for space in &args.spaces {
        scheduled.push((space, broker.scheduled(space).await?));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for (space, held) in &scheduled {
            json_line(
                &mut out,
                &json!({
                    "topic_space": space,
                    "scheduled": held.map(|h| h.held),
                    "all_topic_spaces": held.map(|h| h.all_topic_spaces),
                }),
            )?;
        }
        for s in &rows {
            json_line(
                &mut out,
                &json!({
                    "queue": s.queue,
                    "ready": s.ready,
                    "in_flight": s.in_flight,
                    "waiting_retries": s.waiting_retries,
                    "dead_letters": s.dead_letters,
                    "consumers": s.consumers,
                }),
            )?;
        }
        return Ok(());
    }
    let mut t = table(&[
        "queue",
        "ready",
        "in flight",
        "waiting retries",
        "dead letters",
        "consumers",
    ]);
    for s in &rows {
        t.add_row(vec![
            s.queue.clone(),
            count(s.ready),
            count(s.in_flight),
            count(s.waiting_retries),
            count(s.dead_letters),
            count(s.consumers),
        ]);
    }
    for (space, held) in &scheduled {
        match held {
            None => writeln!(out, "`{space}`: this broker cannot hold messages for later")?,
            Some(h) if h.all_topic_spaces => writeln!(
                out,
                "`{space}`: {} held for later, with those of every topic space (the broker \
                 holds them together)",
                h.held
            )?,
            Some(h) => writeln!(out, "`{space}`: {} held for later", h.held)?,
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "{t}")?;
    if rows.iter().any(|s| s.in_flight.is_none()) {
        writeln!(
            out,
            "(blank: the broker does not tell a client; RabbitMQ reports unacked deliveries \
             only through its management plugin)"
        )?;
    }
    Ok(())
}
