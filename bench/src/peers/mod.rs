//! Other frameworks' sides, on the same workload as the raw clients and
//! ticketrail: built with `--features peers`.

pub(crate) mod omniqueue;
pub(crate) mod ruststream;

use crate::side::{BenchResult, Side};

/// The peers' sides on `broker`, each with what its figures add to the
/// metric's name (nothing: the baseline names the peer) and its name as a
/// baseline. Queues and streams are named after `prefix`.
pub(crate) async fn sides(
    broker: &str,
    prefix: &str,
    prefetch: u16,
) -> BenchResult<Vec<(&'static str, &'static str, Box<dyn Side>)>> {
    let side: Box<dyn Side> = match broker {
        "rabbitmq" => Box::new(
            ruststream::RustStreamRabbit::new(&crate::amqp_url(), &format!("{prefix}-rs")).await?,
        ),
        "nats" => Box::new(
            ruststream::RustStreamNats::new(&crate::nats_url(), &format!("{prefix}-rs"), prefetch)
                .await?,
        ),
        _ => Box::new(ruststream::RustStreamMemory::new()),
    };
    let mut sides = vec![("", "ruststream", side)];
    match broker {
        "rabbitmq" => sides.push((
            "",
            "omniqueue (publishes unconfirmed: it has no publisher confirms)",
            Box::new(
                omniqueue::OmniqueueRabbit::new(&crate::amqp_url(), &format!("{prefix}-oq"))
                    .await?,
            ) as Box<dyn Side>,
        )),
        "memory" => sides.push((
            "",
            "omniqueue",
            Box::new(omniqueue::OmniqueueMemory::new().await?),
        )),
        _ => {}
    }
    Ok(sides)
}
