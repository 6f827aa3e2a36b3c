//! DLQ operations (C11) on the dead-letter stream of a topic space.

use async_nats::jetstream::message::StreamMessage;
use ticketrail_core::{DeadLetter, Error, ErrorKind, Replay, Result};

use crate::broker::{Inner, QueueInfo};
use crate::error::map;
use crate::headers;
use crate::topology;

/// Walks the dead letters of a queue in order, from `sequence` on.
async fn next_record(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    sequence: u64,
) -> Result<Option<StreamMessage>> {
    match stream
        .raw_message_builder()
        .sequence(sequence)
        .next_by_subject(subject)
        .send()
        .await
    {
        Ok(message) => Ok(Some(message)),
        Err(e)
            if e.to_string()
                .to_ascii_lowercase()
                .contains("no message found") =>
        {
            Ok(None)
        }
        Err(e) => Err(map(&format!("reading dead letters of `{subject}`"), e)),
    }
}

fn record(message: &StreamMessage, queue: &str) -> DeadLetter {
    let headers = Some(&message.headers);
    let attempts = headers::incoming(headers, "", message.payload.clone(), message.time.into(), 1);
    let envelope = headers::incoming(
        headers,
        &attempts.routing_key,
        message.payload.clone(),
        message.time.into(),
        1,
    );
    headers::dead_letter(headers, envelope, queue)
}

async fn dlq_stream(
    inner: &Inner,
    info: &QueueInfo,
) -> Result<async_nats::jetstream::stream::Stream> {
    let name = topology::dlq_stream_name(&info.stream);
    inner
        .js
        .get_stream(&name)
        .await
        .map_err(|e| map(&format!("finding dead-letter stream `{name}`"), e))
}

pub(crate) async fn list(inner: &Inner, info: &QueueInfo, limit: usize) -> Result<Vec<DeadLetter>> {
    let stream = dlq_stream(inner, info).await?;
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let mut records = Vec::new();
    let mut sequence = 1;
    while records.len() < limit {
        let Some(message) = next_record(&stream, &subject, sequence).await? else {
            break;
        };
        sequence = message.sequence + 1;
        records.push(record(&message, &info.name));
    }
    Ok(records)
}

pub(crate) async fn replay(inner: &Inner, info: &QueueInfo, which: &Replay) -> Result<usize> {
    let stream = dlq_stream(inner, info).await?;
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let mut replayed = 0;
    let mut sequence = 1;
    while let Some(message) = next_record(&stream, &subject, sequence).await? {
        sequence = message.sequence + 1;
        let dead = record(&message, &info.name);
        if !which.selects(&dead.envelope.id) {
            continue;
        }
        // Back to this queue only (the header addresses it), same id, attempt
        // 1; removed from the DLQ once the stream has acknowledged it.
        let envelope = dead.envelope;
        let mut headers = headers::copy(
            &envelope,
            &format!("{}:replay:{}", envelope.id, message.sequence),
        );
        headers.insert(headers::QUEUE, info.name.as_ref());
        let target = topology::subject(&info.space, &envelope.routing_key);
        inner
            .publish(target, headers, envelope.payload.clone())
            .await?;
        stream.delete_message(message.sequence).await.map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("message {} was replayed, but removing it from the DLQ failed; it may be replayed twice", envelope.id),
            )
            .with_source(e)
        })?;
        replayed += 1;
        if matches!(which, Replay::Id(_)) {
            break;
        }
    }
    match (replayed, which) {
        (0, Replay::Id(id)) => Err(Error::new(
            ErrorKind::NotFound,
            format!("no dead letter with id `{id}` for queue `{}`", info.name),
        )),
        (n, _) => Ok(n),
    }
}

pub(crate) async fn purge(inner: &Inner, info: &QueueInfo) -> Result<usize> {
    let stream = dlq_stream(inner, info).await?;
    let subject = topology::dlq_subject(&info.stream, &info.name);
    let purged = stream
        .purge()
        .filter(&subject)
        .await
        .map_err(|e| map(&format!("purging `{subject}`"), e))?;
    Ok(purged.purged as usize)
}
