//! The ladder that holds messages published for later (C24): its names,
//! and its declaration on a channel. How it works is in `schedule.rs`,
//! which publishes into it.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use ticketrail_core::Result;

use crate::error::map;

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Levels of the ladder: delays up to (2^25 - 1) × 100 ms, about 38.8 days.
pub(crate) const LEVELS: u32 = 25;
/// The unit of a delay.
pub(crate) const UNIT: Duration = Duration::from_millis(100);
/// Names of the ladder's exchanges and queues start with this.
pub(crate) const PREFIX: &str = "ticketrail.schedule";
/// Headers the ladder routes by start with this; consumers drop them.
/// (Not `x-`: a headers exchange matches on no header named `x-…`.)
pub(crate) const HEADER_PREFIX: &str = "Ticketrail-Schedule-";
/// The header naming a scheduled message's topic space.
pub(crate) const SPACE_HEADER: &str = "Ticketrail-Schedule-Space";

/// The delivery exchange, below level 0.
fn delivery_exchange() -> String {
    format!("{PREFIX}.deliver")
}

/// The exchange and queue of level `level`.
pub(crate) fn level_name(level: u32) -> String {
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

pub(crate) fn bit_header(level: u32) -> String {
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

pub(crate) async fn declare_level(channel: &Channel, level: u32) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_ends_in_the_delivery_exchange() {
        assert_eq!(below(0), "ticketrail.schedule.deliver");
        assert_eq!(below(24), "ticketrail.schedule.23");
        assert_eq!(bit_header(3), "Ticketrail-Schedule-03");
    }
}
