//! `ticketrail publish SPACE ROUTING_KEY [JSON | --file F] [--header K=V]...`

use std::path::PathBuf;

use clap::Args;
use ticketrail::{Message, SharedBroker};

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
    broker.publish(&args.space, message).await?;
    println!("{id}");
    Ok(())
}
