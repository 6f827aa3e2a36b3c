//! `ticketrail publish SPACE ROUTING_KEY [JSON | --file F] [--header K=V]...
//! [--delay D | --at TIME]`

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use ticketrail::{Message, Publisher, SharedBroker};

use crate::records::rfc3339;

use crate::{Failure, Outcome};

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The topic space (exchange on RabbitMQ, stream on NATS).
    space: String,
    /// The routing key, e.g. `user.welcome`.
    routing_key: String,
    /// The payload, JSON.
    #[arg(conflicts_with = "file", required_unless_present = "file")]
    json: Option<String>,
    /// Reads the payload from a file (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// A header (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// The message id (default: a new UUID).
    #[arg(long)]
    id: Option<String>,
    /// The content type; a payload that is not `application/json` is sent
    /// as it is, unchecked.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Delivers the message this long from now (`90s`, `6h`, `14days`):
    /// the broker holds it until then.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "at")]
    delay: Option<Duration>,
    /// Delivers the message at this time (RFC 3339, e.g.
    /// `2026-12-24T18:00:00Z`): the broker holds it until then.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    at: Option<SystemTime>,
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("`{s}` is not an RFC 3339 time such as 2026-12-24T18:00:00Z: {e}"))
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

pub(crate) async fn run(broker: &SharedBroker, args: PublishArgs) -> Outcome {
    let payload: Vec<u8> = match (&args.json, &args.file) {
        (Some(json), _) => json.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)
                .map_err(|e| Failure::Error(format!("reading standard input: {e}")))?;
            buffer
        }
        (None, Some(path)) => std::fs::read(path)
            .map_err(|e| Failure::Error(format!("reading `{}`: {e}", path.display())))?,
        (None, None) => unreachable!("clap requires one"),
    };
    if args.content_type == "application/json" {
        serde_json::from_slice::<serde_json::Value>(&payload).map_err(|e| {
            Failure::Error(format!(
                "the payload is not JSON ({e}); pass --content-type to send something else"
            ))
        })?;
    }
    let mut message = Message::new(args.routing_key, payload).content_type(args.content_type);
    if let Some(id) = args.id {
        message = message.id(id);
    }
    for (key, value) in args.headers {
        message = message.header(key, value);
    }
    let id = message.id.clone();
    match args
        .at
        .or_else(|| args.delay.map(|d| SystemTime::now() + d))
    {
        Some(at) => {
            Publisher::new(broker.clone(), args.space)
                .send_message_at(message, at)
                .await?
                .await?;
            println!("{id}");
            eprintln!("held by the broker until {}", rfc3339(at));
        }
        None => {
            broker.publish(&args.space, message).await?;
            println!("{id}");
        }
    }
    Ok(())
}
