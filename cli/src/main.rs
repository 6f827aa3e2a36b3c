//! `ticketrail`: the operator's command line. It sees why messages failed,
//! groups them, replays them safely, inspects topology, publishes, and runs
//! the conformance rules against the broker a team runs; over RabbitMQ's
//! and NATS's own client protocols, no management plugin needed.
//!
//! Exit status: 0 on success, 1 on an error (one line on stderr saying what
//! and why), 2 on a usage error, 130 when interrupted (Ctrl-C).

mod check;
mod database;
mod dlq;
mod output;
mod publish;
mod records;
mod scheduled;
mod stats;
mod topology;

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use ticketrail::SharedBroker;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "ticketrail",
    version,
    about = "See why messages failed, group them, replay them safely; inspect topology; check a broker.",
    long_about = None,
)]
struct Cli {
    /// The broker: amqp://user:pass@host:5672/vhost, amqps://..., nats://host:4222 or
    /// tls://...; several nodes as host1:port,host2:port.
    #[arg(long, global = true, env = "TICKETRAIL_BROKER", hide_env_values = true)]
    broker: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per queue: ready, in flight, waiting retries, dead letters, consumers.
    Stats(stats::StatsArgs),
    /// The dead-letter queue of a work queue: list, show, stats, replay, purge, export.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Declare, check or delete the topology ticketrail uses for a topic space.
    #[command(subcommand)]
    Topology(topology::TopologyCommand),
    /// Publish one message, confirmed; prints its id.
    Publish(publish::PublishArgs),
    /// Messages held for later: list, cancel.
    #[command(subcommand)]
    Scheduled(scheduled::ScheduledCommand),
    /// Run the conformance rules against the broker on throwaway queues.
    Check(check::CheckArgs),
    /// The outbox and inbox tables in the application's PostgreSQL database.
    #[command(subcommand)]
    Db(database::DbCommand),
    /// The outbox: what waits to be relayed, and what the broker refused.
    #[command(subcommand)]
    Outbox(database::OutboxCommand),
}

/// What a command ended with, beyond success.
#[derive(Debug)]
enum Failure {
    /// An error: one line on stderr, exit status 1.
    Error(String),
    /// Stopped by Ctrl-C, after reporting: exit status 130.
    Interrupted,
}

impl From<ticketrail::Error> for Failure {
    fn from(e: ticketrail::Error) -> Self {
        Failure::Error(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Error(format!("writing the output: {e}"))
    }
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ticketrail: error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let secret = match &cli.command {
        Command::Db(command) => password_of(command.database()),
        Command::Outbox(command) => password_of(command.database()),
        _ => cli.broker.as_deref().and_then(password_of),
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Interrupted) => ExitCode::from(130),
        Err(Failure::Error(message)) => {
            // Errors name URLs redacted; this makes sure of the password.
            let message = match &secret {
                Some(secret) => message.replace(secret.as_str(), "****"),
                None => message,
            };
            eprintln!("ticketrail: error: {}", message.replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli, matches: &clap::ArgMatches) -> Outcome {
    let url = cli.broker.as_deref();
    match cli.command {
        Command::Stats(args) => stats::run(&connect(url).await?, args).await,
        Command::Dlq(command) => dlq::run(&connect(url).await?, command).await,
        Command::Topology(command) => {
            let sub = matches
                .subcommand_matches("topology")
                .and_then(|m| m.subcommand())
                .map(|(_, m)| m.clone())
                .ok_or_else(|| Failure::Error("topology: no subcommand".into()))?;
            topology::run(&connect(url).await?, command, &sub).await
        }
        Command::Publish(args) => publish::run(&connect(url).await?, args).await,
        Command::Scheduled(command) => scheduled::run(&connect(url).await?, command).await,
        Command::Check(args) => check::run(&broker_url(url)?, args).await,
        Command::Db(command) => database::migrate(command).await,
        Command::Outbox(command) => database::outbox(command).await,
    }
}

/// The broker URL, refusing the memory broker.
fn broker_url(url: Option<&str>) -> Result<String, Failure> {
    let url = url.ok_or_else(|| {
        Failure::Error(
            "no broker: pass --broker URL or set TICKETRAIL_BROKER \
             (amqp://user:pass@host:5672/%2f or nats://host:4222)"
                .into(),
        )
    })?;
    if url.starts_with("memory:") {
        return Err(Failure::Error(
            "memory:// is the in-process broker: it lives inside one program, so the \
             command line cannot reach it; pass an amqp:// or nats:// URL"
                .into(),
        ));
    }
    Ok(url.to_owned())
}

async fn connect(url: Option<&str>) -> Result<SharedBroker, Failure> {
    let url = broker_url(url)?;
    Ok(ticketrail::connect(&url).await?)
}

/// The password in a broker URL, if it has one (`scheme://user:password@`).
fn password_of(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let userinfo = &rest[..rest.find('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// Which dead letters a command takes: shared by list, replay, purge, export.
#[derive(Debug, Clone, Default, Args)]
struct Filters {
    /// Only records with this reason: exhausted, permanent, undecodable,
    /// delivery-limit, unreadable, broker.
    #[arg(long)]
    reason: Option<ticketrail::DeadLetterReason>,
    /// Only records whose error, id, routing key or (text) payload contains TEXT.
    #[arg(long, value_name = "TEXT")]
    grep: Option<String>,
    /// Only records whose last failure is at most this long ago (`90s`, `2h`, `3days`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<std::time::Duration>,
    /// Only records of this failure group (see `dlq stats`).
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
}
