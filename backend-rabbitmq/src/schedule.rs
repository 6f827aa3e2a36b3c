//! Messages published for later (C24), held by RabbitMQ without a plugin.
//!
//! The delay, in units of 100 ms, is written in binary, one header per
//! bit, and the message walks down a ladder of levels shared by every
//! topic space of the virtual host. Level `L` is a headers exchange and a
//! quorum queue whose messages expire after 2^L units:
//! - at exchange `L`, a message whose bit `L` is 1 goes into queue `L` and
//!   waits there; one whose bit is 0 goes on at once to exchange `L - 1`;
//! - queue `L` dead-letters (at least once) to exchange `L - 1`, with the
//!   routing key the message was published with;
//! - below level 0 is the delivery exchange, bound to each topic exchange
//!   by a header naming the topic space: at its time the message reaches
//!   its topic exchange with its own routing key, and goes to the queues
//!   bound then.
//!
//! Every message in a queue of the ladder waits as long as the others, so
//! the one at the head always expires first: RabbitMQ expires messages
//! only at the head of a queue. A delay takes at most [`LEVELS`] hops and
//! is rounded up to the next 100 ms: never early. 25 levels reach 38 days;
//! the whole ladder is 25 queues and 26 exchanges, whatever the number of
//! topic spaces and queues. (NServiceBus's delayed delivery on RabbitMQ
//! works the same way.)
//!
//! A message that comes due with no queue bound to its routing key stays,
//! not ready, in the last queue of the ladder it waited in: at-least-once
//! dead-lettering keeps what it cannot route and tries again.

use std::time::{Duration, SystemTime};

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use ticketrail_core::{Confirmation, Error, ErrorKind, Message, Result};

use crate::config::RabbitConfig;
use crate::connection::{within, Link};
use crate::error::map;
use crate::headers::long;
use crate::publish;

/// Levels of the ladder: delays up to (2^25 - 1) × 100 ms, about 38.8 days.
pub(crate) const LEVELS: u32 = 25;
/// The unit of a delay.
const UNIT: Duration = Duration::from_millis(100);
/// Names of the ladder's exchanges and queues start with this.
const PREFIX: &str = "ticketrail.schedule";
/// Headers the ladder routes by start with this; consumers drop them.
/// (Not `x-`: a headers exchange matches on no header named `x-…`.)
pub(crate) const HEADER_PREFIX: &str = "Ticketrail-Schedule-";
/// The header naming a scheduled message's topic space.
const SPACE_HEADER: &str = "Ticketrail-Schedule-Space";

/// The delivery exchange, below level 0.
fn delivery_exchange() -> String {
    format!("{PREFIX}.deliver")
}

/// The exchange and queue of level `level`.
fn level_name(level: u32) -> String {
    format!("{PREFIX}.{level:02}")
}

/// The ladder's queues, level 0 first.
pub(crate) fn ladder() -> impl Iterator<Item = String> {
    (0..LEVELS).map(level_name)
}

/// Where level `level` sends a message on: the next level down, or the
/// delivery exchange.
fn below(level: u32) -> String {
    match level {
        0 => delivery_exchange(),
        _ => level_name(level - 1),
    }
}

fn bit_header(level: u32) -> String {
    format!("{HEADER_PREFIX}{level:02}")
}

/// A header match on `name` being `value`.
fn matching(name: &str, value: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-match".into(), long("all"));
    args.insert(ShortString::from(name), long(value));
    args
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// How many units from now `at` is, rounded up; zero if it has passed.
pub(crate) fn units_until(at: SystemTime, now: SystemTime) -> Result<u64> {
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    let units = wait.as_nanos().div_ceil(UNIT.as_nanos());
    let most = (1u64 << LEVELS) - 1;
    u64::try_from(units)
        .ok()
        .filter(|u| *u <= most)
        .ok_or_else(|| {
            let days = |d: Duration| d.as_secs_f64() / 86_400.0;
            Error::config(format!(
                "a message scheduled {:.1} days ahead: the RabbitMQ backend holds messages for \
                 at most {:.1} days",
                days(wait),
                days(UNIT * most as u32)
            ))
        })
}

/// Declares the delivery exchange (every topic space needs it, to be bound
/// to it) and binds `space` to it.
pub(crate) async fn bind_space(channel: &Channel, space: &str) -> Result<()> {
    let deliver = delivery_exchange();
    channel
        .exchange_declare(
            deliver.as_str().into(),
            ExchangeKind::Headers,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map(&format!("declaring exchange `{deliver}`"), e))?;
    channel
        .exchange_bind(
            space.into(),
            deliver.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            matching(SPACE_HEADER, space),
        )
        .await
        .map_err(|e| map(&format!("binding `{space}` to `{deliver}`"), e))
}

/// Declares the ladder: idempotent, shared by every topic space. Each
/// level is bounded by the connect timeout, as any declare.
pub(crate) async fn declare_ladder(config: &RabbitConfig, channel: &Channel) -> Result<()> {
    // From the bottom up, so each level's next one exists when it is bound.
    for level in 0..LEVELS {
        let what = format!("declaring level {level} of the ladder of scheduled messages");
        within(config, &what, declare_level(channel, level)).await?;
    }
    Ok(())
}

async fn declare_level(channel: &Channel, level: u32) -> Result<()> {
    let name = level_name(level);
    let next = below(level);
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Headers,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| map(&format!("declaring exchange `{name}`"), e))?;
    let mut args = quorum_args_to_exchange(&next);
    let ttl = UNIT.as_millis() << level;
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl as i64));
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| map(&format!("declaring queue `{name}`"), e))?;
    let bit = bit_header(level);
    channel
        .queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            matching(&bit, "1"),
        )
        .await
        .map_err(|e| map(&format!("binding queue `{name}`"), e))?;
    channel
        .exchange_bind(
            next.as_str().into(),
            name.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            matching(&bit, "0"),
        )
        .await
        .map_err(|e| map(&format!("binding `{next}` to `{name}`"), e))?;
    Ok(())
}

/// A quorum queue's arguments, dead-lettering at least once to `exchange`
/// with the message's own routing key.
fn quorum_args_to_exchange(exchange: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args.insert("x-dead-letter-exchange".into(), long(exchange));
    // As the work queues: without reject-publish, at-least-once
    // dead-lettering silently falls back to at-most-once.
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args
}

/// Why the ladder's messages cannot be listed or cancelled: `what`.
pub(crate) fn not_readable(what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "RabbitMQ cannot {what} messages held for later: they wait in the queues of the \
             ladder (`{PREFIX}.NN`), which a client reads only by taking them; `ticketrail \
             stats --space` counts them, and a handler can skip an id it should no longer act on"
        ),
    )
}

/// Publishes `message` into the ladder, to reach `topic_space` at `at`.
pub(crate) async fn send_at(
    link: &Link,
    topic_space: &str,
    message: Message,
    at: SystemTime,
) -> Result<Confirmation> {
    message.check(topic_space, link.config.max_payload, "RabbitMQ")?;
    let units = units_until(at, SystemTime::now())?;
    link.ensure_ladder().await?;
    let mut properties = publish::properties(&message)?;
    let mut headers = properties.headers().clone().unwrap_or_default();
    for level in 0..LEVELS {
        let bit = if units >> level & 1 == 1 { "1" } else { "0" };
        headers.insert(ShortString::from(bit_header(level)), long(bit));
    }
    headers.insert(SPACE_HEADER.into(), long(topic_space));
    properties = properties.with_headers(headers);
    let confirm = link
        .send(
            &level_name(LEVELS - 1),
            &message.routing_key,
            message.payload.clone(),
            properties,
        )
        .await?;
    Ok(Confirmation::new(message.id, confirm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_the_unit_and_are_never_early() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let units = |d: Duration| units_until(now + d, now).unwrap();
        assert_eq!(units(Duration::ZERO), 0);
        assert_eq!(units(Duration::from_millis(1)), 1);
        assert_eq!(units(Duration::from_millis(100)), 1);
        assert_eq!(units(Duration::from_millis(101)), 2);
        assert_eq!(units_until(now - Duration::from_secs(5), now).unwrap(), 0);
        let month = Duration::from_secs(30 * 24 * 3600);
        assert_eq!(units(month), 25_920_000);
        assert!(units_until(now + Duration::from_secs(40 * 24 * 3600), now).is_err());
    }

    #[test]
    fn the_ladder_ends_in_the_delivery_exchange() {
        assert_eq!(below(0), "ticketrail.schedule.deliver");
        assert_eq!(below(24), "ticketrail.schedule.23");
        assert_eq!(bit_header(3), "Ticketrail-Schedule-03");
    }
}
