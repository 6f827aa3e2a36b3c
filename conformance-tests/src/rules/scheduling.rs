//! C24: a message published for later waits in the broker, arrives at its
//! time (never before), unchanged, and holds no consumer's slot meanwhile;
//! where the broker can list and cancel what it holds, a cancelled one
//! never comes.

use std::time::{Duration, SystemTime};

use ticketrail_core::{ErrorKind, Message, Publisher, QueueSpec};

use super::{checked, Skip};
use crate::harness::Harness;
use crate::support::{ensure, prefetch, receive, Doing, Scenario};

/// How late a delivery may be here: the contract's max(1 s, 1 %) and a
/// second more for a test machine running the whole suite at once.
const LATE: Duration = Duration::from_secs(2);

pub(crate) async fn c24_scheduled_publishing(h: &dyn Harness) -> Result<(), Skip> {
    let probe = h
        .connect()
        .await
        .map_err(|e| Skip::Failed(format!("connecting: {e}")))?;
    let capable = probe.capabilities().scheduling;
    let _ = probe.close().await;
    if !capable {
        return Err(Skip::NotApplicable(format!(
            "the {} backend (this server) cannot hold a message for later",
            h.name()
        )));
    }
    let sc = Scenario::new(h, "c24", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            // Published by a connection that is closed before anything is
            // due: the messages wait in the broker, not in this process.
            let publishing = h.connect().await.doing("connecting a publisher")?;
            let publisher = Publisher::new(publishing.clone(), sc.space());
            let now = SystemTime::now();
            let later = now + Duration::from_millis(3000);
            let sooner = now + Duration::from_millis(1500);
            let schedule = |key: &str, at: SystemTime| {
                let message = Message::new("jobs.later", key.to_owned())
                    .content_type("text/plain")
                    .header("x-kept", key.to_owned());
                let id = message.id.clone();
                let publisher = publisher.clone();
                async move {
                    publisher
                        .send_message_at(message, at)
                        .await?
                        .await
                        .map(|()| id)
                }
            };
            // The later one first: delivery follows the time, not the order.
            let later_id = schedule("later", later)
                .await
                .doing("scheduling a message 3 s ahead")?;
            let sooner_id = schedule("sooner", sooner)
                .await
                .doing("scheduling a message 1.5 s ahead")?;
            let past_id = schedule("past", now - Duration::from_secs(5))
                .await
                .doing("scheduling a message for a time already passed")?;
            // Where the broker can read and cancel what it holds: one
            // scheduled between the two, cancelled, never comes.
            match publishing.list_scheduled(sc.space(), 10).await {
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                Err(e) => return Err(format!("listing the messages held for later: {e}")),
                Ok(_) => {
                    let between = now + Duration::from_millis(2000);
                    let doomed = schedule("cancelled", between)
                        .await
                        .doing("scheduling a message to cancel")?;
                    let held = publishing
                        .list_scheduled(sc.space(), 10)
                        .await
                        .doing("listing the messages held for later")?;
                    // The one already due may still be listed, or not.
                    let held: Vec<_> = held.into_iter().filter(|m| m.id != past_id).collect();
                    let ids: Vec<&str> = held.iter().map(|m| m.id.as_str()).collect();
                    ensure!(
                        ids == [sooner_id.as_str(), doomed.as_str(), later_id.as_str()],
                        "held for later, soonest first: expected sooner, cancelled, later; \
                         listed {held:?}"
                    );
                    for (m, at) in held.iter().zip([sooner, between, later]) {
                        let off = m.due.duration_since(at).unwrap_or_default();
                        ensure!(
                            m.due >= at
                                && off < Duration::from_secs(1)
                                && m.routing_key == "jobs.later",
                            "listed {m:?}, due at {at:?}"
                        );
                    }
                    ensure!(
                        publishing
                            .cancel_scheduled(sc.space(), &doomed)
                            .await
                            .doing("cancelling")?,
                        "cancelling a message held for later said none was held"
                    );
                    ensure!(
                        !publishing
                            .cancel_scheduled(sc.space(), &doomed)
                            .await
                            .doing("cancelling again")?,
                        "cancelling a message a second time said it was still held"
                    );
                }
            }
            let _ = publishing.close().await;

            // Prefetch 1: were a waiting message holding the slot, nothing
            // else would get through.
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), prefetch(1))
                .await
                .doing("subscribing")?;
            let mut first = receive(&mut sub, Duration::from_secs(5))
                .await
                .map_err(|e| format!("the message scheduled in the past: {e}"))?;
            ensure!(
                first.envelope().id == past_id,
                "a message scheduled for a time already passed should come at once; got {} ({:?}) \
                 first",
                first.envelope().id,
                String::from_utf8_lossy(&first.envelope().payload)
            );
            first.ack().await.doing("acking")?;
            sc.publish_job("jobs.now", "now").await?;
            let mut now_delivery = receive(&mut sub, Duration::from_secs(5))
                .await
                .map_err(|e| format!("a message published now, while two wait: {e}"))?;
            ensure!(
                now_delivery.envelope().routing_key == "jobs.now",
                "the message published now should pass the waiting ones; got {} (`{}`)",
                now_delivery.envelope().id,
                now_delivery.envelope().routing_key
            );
            now_delivery.ack().await.doing("acking")?;
            // A consumer restart while they wait.
            drop(sub);
            let mut sub = sc
                .broker
                .subscribe(&sc.queue("q"), prefetch(1))
                .await
                .doing("subscribing again")?;
            for (key, id, at) in [("sooner", &sooner_id, sooner), ("later", &later_id, later)] {
                let mut delivery = receive(&mut sub, Duration::from_secs(10))
                    .await
                    .map_err(|e| format!("the message scheduled as `{key}`: {e}"))?;
                let arrived = SystemTime::now();
                let envelope = delivery.envelope();
                ensure!(
                    &envelope.id == id,
                    "expected `{key}` ({id}) next, got {} ({:?})",
                    envelope.id,
                    String::from_utf8_lossy(&envelope.payload)
                );
                ensure!(
                    arrived >= at,
                    "`{key}` arrived {:?} early",
                    at.duration_since(arrived).unwrap_or_default()
                );
                let late = arrived.duration_since(at).unwrap_or_default();
                ensure!(late <= LATE, "`{key}` arrived {late:?} late");
                ensure!(
                    envelope.payload == key.as_bytes()
                        && envelope.routing_key == "jobs.later"
                        && envelope.content_type.as_deref() == Some("text/plain")
                        && envelope.headers.get("x-kept").map(String::as_str) == Some(key)
                        && envelope.attempt == 1,
                    "`{key}` arrived changed: {envelope:?}"
                );
                ensure!(
                    !envelope
                        .headers
                        .keys()
                        .any(|k| k.to_ascii_lowercase().contains("schedule")
                            || k.starts_with("Nats-")),
                    "`{key}` arrived with the broker's scheduling headers: {:?}",
                    envelope.headers
                );
                delivery.ack().await.doing("acking")?;
            }
            Ok(())
        })
        .await,
    )
}
