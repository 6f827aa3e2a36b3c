//! DLQ operations (C11): list without removing, replay, purge.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::Channel;
use ticketrail_core::{DeadLetter, Error, ErrorKind, Replay, Result};

use crate::error::map;
use crate::headers;
use crate::link::Link;
use crate::topology::dlq_name;

/// Takes the next message of the DLQ, unacked: it goes back to the DLQ when
/// the channel closes, unless acked.
async fn take(channel: &Channel, dlq: &str) -> Result<Option<(lapin::Acker, DeadLetter, String)>> {
    let got = channel
        .basic_get(dlq.into(), BasicGetOptions::default())
        .await
        .map_err(|e| map(&format!("reading dead-letter queue `{dlq}`"), e))?;
    Ok(got.map(|message| {
        let delivery = message.delivery;
        let queue = dlq.strip_suffix(".dlq").unwrap_or(dlq);
        let incoming = headers::incoming(
            delivery.properties,
            delivery.routing_key.as_str(),
            delivery.data,
        );
        let record = incoming.into_dead_letter(queue);
        (delivery.acker, record, queue.to_owned())
    }))
}

async fn close(channel: Channel) {
    // Closing hands every message taken but not acked back to the DLQ.
    let _ = channel
        .close(200, "done with the dead-letter queue".into())
        .await;
}

pub(crate) async fn list(link: &Link, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let dlq = dlq_name(queue);
    let channel = link.channel().await?;
    let mut records = Vec::new();
    let result = async {
        while records.len() < limit {
            match take(&channel, &dlq).await? {
                Some((_acker, record, _)) => records.push(record),
                None => break,
            }
        }
        Ok(())
    }
    .await;
    close(channel).await;
    result.map(|()| records)
}

pub(crate) async fn replay(link: &Link, queue: &str, which: &Replay) -> Result<usize> {
    let dlq = dlq_name(queue);
    let channel = link.channel().await?;
    let result = async {
        let mut replayed = 0;
        while let Some((acker, record, _)) = take(&channel, &dlq).await? {
            if !which.selects(&record.envelope.id) {
                continue; // stays unacked, so it goes back at close
            }
            // Back to the work queue, same id, attempt 1; the record leaves
            // the DLQ only once the republish is confirmed.
            let mut envelope = record.envelope;
            envelope.attempt = 1;
            let properties = headers::copy_properties(&envelope, &[]);
            link.publish("", &record.queue, &envelope.payload, properties).await?;
            match acker.ack(BasicAckOptions::default()).await {
                Ok(true) => {}
                _ => {
                    return Err(Error::closed(format!(
                        "message {} was replayed, but removing it from `{dlq}` failed; it may be replayed twice",
                        envelope.id
                    )))
                }
            }
            replayed += 1;
            if matches!(which, Replay::Id(_)) {
                break;
            }
        }
        Ok(replayed)
    }
    .await;
    close(channel).await;
    match (result, which) {
        (Ok(0), Replay::Id(id)) => Err(Error::new(
            ErrorKind::NotFound,
            format!("no dead letter with id `{id}` in `{dlq}`"),
        )),
        (result, _) => result,
    }
}

pub(crate) async fn purge(link: &Link, queue: &str) -> Result<usize> {
    let dlq = dlq_name(queue);
    let channel = link.channel().await?;
    let purged = channel
        .queue_purge(dlq.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| map(&format!("purging `{dlq}`"), e));
    close(channel).await;
    Ok(purged? as usize)
}
