//! `ticketrail scheduled list SPACE` and `ticketrail scheduled cancel SPACE ID`:
//! messages the broker holds for later (C24).

use std::io::Write;

use clap::{Args, Subcommand};
use serde_json::json;
use ticketrail::SharedBroker;

use crate::output::{json_line, table};
use crate::records::rfc3339;
use crate::{Failure, Outcome};

#[derive(Debug, Subcommand)]
pub(crate) enum ScheduledCommand {
    /// The messages held for later in a topic space, soonest first (NATS
    /// and memory; RabbitMQ cannot read them without taking them).
    List(ListArgs),
    /// Cancels a message held for later, by id (NATS and memory).
    Cancel(CancelArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// The topic space.
    space: String,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// One JSON object per line: id, routing_key, due.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CancelArgs {
    /// The topic space.
    space: String,
    /// The message's id, as `publish` printed it.
    id: String,
}

pub(crate) async fn run(broker: &SharedBroker, command: ScheduledCommand) -> Outcome {
    match command {
        ScheduledCommand::List(args) => {
            let held = broker.list_scheduled(&args.space, args.limit).await?;
            let mut out = std::io::stdout().lock();
            if args.json {
                for m in &held {
                    json_line(
                        &mut out,
                        &json!({"id": m.id, "routing_key": m.routing_key, "due": rfc3339(m.due)}),
                    )?;
                }
                return Ok(());
            }
            let mut t = table(&["due", "routing key", "id"]);
            for m in &held {
                t.add_row(vec![rfc3339(m.due), m.routing_key.clone(), m.id.clone()]);
            }
            writeln!(out, "{t}")?;
            Ok(())
        }
        ScheduledCommand::Cancel(args) => {
            if broker.cancel_scheduled(&args.space, &args.id).await? {
                println!("cancelled {}", args.id);
                Ok(())
            } else {
                Err(Failure::Error(format!(
                    "no message `{}` is held for later in `{}` (delivered already, or never \
                     scheduled there)",
                    args.id, args.space
                )))
            }
        }
    }
}
