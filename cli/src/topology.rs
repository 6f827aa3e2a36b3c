//! `ticketrail topology declare|check|delete SPACE --queue Q --bind PATTERN...`
//!
//! `--queue` may repeat; the `--bind` options after a `--queue` are its
//! bindings.

use std::io::Write;

use clap::{ArgAction, Args, Subcommand};
use serde_json::json;
use ticketrail::inspect::FindingStatus;
use ticketrail::{QueueSpec, SharedBroker, Topology};

use crate::output::{json_line, table};
use crate::{Failure, Outcome};

#[derive(Debug, Subcommand)]
pub(crate) enum TopologyCommand {
    /// Declares the topic space, the queues, their DLQs and bindings (idempotent).
    Declare(TopologyArgs),
    /// Declares nothing: reports, object by object, whether the broker has
    /// what `declare` would make, what differs, and what to do about it.
    Check {
        #[command(flatten)]
        topology: TopologyArgs,
        /// One JSON object per object and line: object, status, detail.
        #[arg(long)]
        json: bool,
    },
    /// Deletes the queues (with their DLQs and retry queues) and the topic
    /// space once nothing else is bound to it.
    Delete(TopologyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TopologyArgs {
    /// The topic space.
    space: String,
    /// A work queue (repeatable); the --bind options after it are its bindings.
    #[arg(long = "queue", value_name = "QUEUE", action = ArgAction::Append, required = true)]
    queues: Vec<String>,
    /// A binding pattern of the queue before it (`user.#`, `*.created`).
    #[arg(long = "bind", value_name = "PATTERN", action = ArgAction::Append)]
    binds: Vec<String>,
    /// The delivery limit of the queues (C13).
    #[arg(long, default_value_t = 5)]
    delivery_limit: u32,
}

/// The topology the arguments describe: each `--bind` belongs to the
/// `--queue` before it on the command line.
fn topology(args: &TopologyArgs, matches: &clap::ArgMatches) -> Result<Topology, Failure> {
    let queue_at: Vec<usize> = matches
        .indices_of("queues")
        .map(Iterator::collect)
        .unwrap_or_default();
    let bind_at: Vec<usize> = matches
        .indices_of("binds")
        .map(Iterator::collect)
        .unwrap_or_default();
    let mut specs: Vec<QueueSpec> = args
        .queues
        .iter()
        .map(|q| QueueSpec::new(q.clone()).delivery_limit(args.delivery_limit))
        .collect();
    for (pattern, at) in args.binds.iter().zip(bind_at) {
        let owner = queue_at.iter().rposition(|q| *q < at).ok_or_else(|| {
            Failure::Error(format!(
                "--bind {pattern} comes before any --queue; put it after the queue it binds"
            ))
        })?;
        specs[owner].bindings.push(pattern.clone());
    }
    let topology = specs
        .into_iter()
        .fold(Topology::new(args.space.clone()), Topology::queue);
    topology.validate()?;
    Ok(topology)
}

pub(crate) async fn run(
    broker: &SharedBroker,
    command: TopologyCommand,
    matches: &clap::ArgMatches,
) -> Outcome {
    match command {
        TopologyCommand::Declare(args) => {
            let topology = topology(&args, matches)?;
            announce("declaring", &topology, broker);
            broker.declare(&topology).await?;
            println!(
                "declared topic space `{}` with {} queue(s)",
                topology.topic_space,
                topology.queues.len()
            );
            Ok(())
        }
        TopologyCommand::Delete(args) => {
            let topology = topology(&args, matches)?;
            announce("deleting", &topology, broker);
            broker.delete(&topology).await?;
            println!(
                "deleted {} queue(s) of `{}`",
                topology.queues.len(),
                topology.topic_space
            );
            Ok(())
        }
        TopologyCommand::Check {
            topology: args,
            json,
        } => {
            let topology = topology(&args, matches)?;
            announce("checking", &topology, broker);
            let findings = broker.inspect(&topology).await?;
            let mut out = std::io::stdout().lock();
            if json {
                for f in &findings {
                    json_line(
                        &mut out,
                        &json!({"object": f.object, "status": f.status.as_str(), "detail": f.detail}),
                    )?;
                }
            } else {
                let mut t = table(&["object", "status", "detail"]);
                for f in &findings {
                    t.add_row(vec![
                        f.object.clone(),
                        f.status.to_string(),
                        f.detail.clone(),
                    ]);
                }
                writeln!(out, "{t}")?;
            }
            let differs = findings
                .iter()
                .filter(|f| f.status == FindingStatus::Differs)
                .count();
            if differs > 0 {
                return Err(Failure::Error(format!(
                    "{differs} object(s) differ from what ticketrail declares; see above"
                )));
            }
            if !json {
                writeln!(
                    out,
                    "nothing differs: `ticketrail topology declare` makes what is missing"
                )?;
            }
            Ok(())
        }
    }
}

/// How many queues make an operation long enough to say, on stderr, what
/// it is doing: 100 take about a second on RabbitMQ, 1,000 ten to fifteen.
pub(crate) const MANY: usize = 100;

/// Says on stderr what a long topology operation is doing.
fn announce(doing: &str, topology: &Topology, broker: &SharedBroker) {
    if topology.queues.len() >= MANY {
        eprintln!(
            "{doing} {} queues of `{}` on {} (with their dead-letter queues; about 10 s per \
             1,000 on RabbitMQ)...",
            topology.queues.len(),
            topology.topic_space,
            broker.describe()
        );
    }
}
