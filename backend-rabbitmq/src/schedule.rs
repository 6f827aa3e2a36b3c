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

use std::sync::atomic::Ordering;

use lapin::types::ShortString;
use lapin::Channel;
use ticketrail_core::{Confirmation, Error, ErrorKind, Message, Result};

use crate::config::RabbitConfig;
use crate::connection::{within, Link};
use crate::headers::long;
use crate::ladder::{self, bit_header, level_name, LEVELS, PREFIX, SPACE_HEADER, UNIT};
use crate::publish;

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

/// Makes sure the ladder exists: declared once per connection, as the
/// wait queues are (a reconnect forgets).
async fn ensure_ladder(link: &Link) -> Result<()> {
    if link.ladder.load(Ordering::Acquire) {
        return Ok(());
    }
    let channel = link.channel().await?;
    declare_ladder(&link.config, &channel).await?;
    let _ = channel.close(200, "done".into()).await;
    link.ladder.store(true, Ordering::Release);
    Ok(())
}

/// Declares the ladder: idempotent, shared by every topic space. Each
/// level is bounded by the connect timeout, as any declare.
async fn declare_ladder(config: &RabbitConfig, channel: &Channel) -> Result<()> {
    // From the bottom up, so each level's next one exists when it is bound.
    for level in 0..LEVELS {
        let what = format!("declaring level {level} of the ladder of scheduled messages");
        within(config, &what, ladder::declare_level(channel, level)).await?;
    }
    Ok(())
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
    ensure_ladder(link).await?;
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
}
