//! C18: a message published inside a trace is handled inside it, through
//! retries, the DLQ and a replay; a plain client's `traceparent` is joined.
//!
//! The rule installs a global OpenTelemetry tracer provider that keeps
//! finished spans in memory (once per process), and looks only at the
//! spans of the traces it started itself, so other rules running at the
//! same time do not disturb it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{SpanId, SpanKind, TraceContextExt, TraceId, Tracer};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, InMemorySpanExporterBuilder, SpanData};
use ticketrail_core::trace::TRACEPARENT;
use ticketrail_core::{Consumer, DeadLetterReason, Fixed, QueueSpec, Replay};

use super::{checked, Skip};
use crate::harness::{Foreign, Harness};
use crate::support::{ensure, wait_for_dead_letters, wait_until, Act, Doing, Scenario, Scripted};

const WAIT: Duration = Duration::from_secs(10);

/// The in-memory exporter behind the global tracer provider.
pub(super) fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporterBuilder::new().build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider);
        exporter
    })
}

/// The finished spans of `trace`.
pub(super) fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// Waits until `trace` has `count` spans of `kind`; returns them by start.
async fn wait_for_spans(
    trace: TraceId,
    kind: SpanKind,
    count: usize,
) -> Result<Vec<SpanData>, String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut spans: Vec<SpanData> = spans_of(trace)
            .into_iter()
            .filter(|s| s.span_kind == kind)
            .collect();
        if spans.len() >= count {
            spans.sort_by_key(|s| s.start_time);
            return Ok(spans);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "trace {trace} has {} {kind:?} spans after {WAIT:?}, expected {count}: {}",
                spans.len(),
                describe(&spans_of(trace))
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    attribute(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

fn describe(spans: &[SpanData]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} ({:?}, span {}, parent {}, attempt {}, outcome {})",
                s.name,
                s.span_kind,
                s.span_context.span_id(),
                s.parent_span_id,
                text(s, "ticketrail.attempt"),
                text(s, "ticketrail.outcome"),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks the conventional attributes of a span about message `id`.
fn conventional(
    span: &SpanData,
    system: &str,
    destination: &str,
    operation: &str,
    id: &str,
) -> Result<(), String> {
    for (key, expected) in [
        ("messaging.system", system),
        ("messaging.destination.name", destination),
        ("messaging.operation.type", operation),
        ("messaging.message.id", id),
    ] {
        let got = text(span, key);
        ensure!(
            got == expected,
            "span `{}` has {key} = {got:?}, expected {expected:?}",
            span.name
        );
    }
    Ok(())
}

pub(crate) async fn c18_trace_context(h: &dyn Harness) -> Result<(), Skip> {
    exporter();
    let sc = Scenario::new(h, "c18", vec![QueueSpec::new("q").bind("jobs.#")]).await?;
    checked(
        sc.run(|sc| async move {
            let system = sc.broker.backend();
            let q = sc.queue("q");
            // Two failed attempts, dead-lettered; after the replay it works.
            // A plain client's message works at once.
            let handler = Scripted::new(|key, attempt, before| match (key, before) {
                ("plain", _) => Act::Succeed,
                (_, 0 | 1) => Act::Retry(format!("attempt {attempt} failed")),
                _ => Act::Succeed,
            });
            let policy = Fixed::new(Duration::from_millis(200), 2).expect("valid");
            let consumer = Consumer::new(sc.broker.clone(), q.clone(), handler.clone())
                .retry_policy(policy)
                .spawn();

            // An API request's span, and the publish inside it.
            let tracer = opentelemetry::global::tracer("ticketrail-conformance");
            let request = Context::current_with_span(tracer.start("c18 request"));
            let root = request.span().span_context().clone();
            let trace = root.trace_id();
            let message = crate::support::job_message("jobs.a", "traced");
            let id = message.id.clone();
            sc.broker
                .publish(sc.space(), message)
                .with_context(request.clone())
                .await
                .doing("publishing inside a trace")?;
            request.span().end();

            let records = wait_for_dead_letters(&sc.broker, &q, 1, WAIT).await?;
            let publish = wait_for_spans(trace, SpanKind::Producer, 1).await?;
            let publish = &publish[0];
            ensure!(
                publish.parent_span_id == root.span_id(),
                "the publish span's parent is {}, expected the request span {}",
                publish.parent_span_id,
                root.span_id()
            );
            conventional(publish, system, sc.space(), "send", &id)?;
            if system == "rabbitmq" {
                let key = text(publish, "messaging.rabbitmq.destination.routing_key");
                ensure!(key == "jobs.a", "the publish span's routing key is {key:?}");
            }
            let expected_parent = format!(
                "00-{trace}-{}-01",
                publish.span_context.span_id()
            );

            // Each attempt a `process` span, child of the publish span.
            let process = wait_for_spans(trace, SpanKind::Consumer, 2).await?;
            for (span, (attempt, outcome)) in process.iter().zip([(1, "retried"), (2, "dead-lettered")]) {
                conventional(span, system, &q, "process", &id)?;
                ensure!(
                    span.parent_span_id == publish.span_context.span_id(),
                    "attempt {attempt}'s process span has parent {}, expected the publish span {}: {}",
                    span.parent_span_id,
                    publish.span_context.span_id(),
                    describe(&process)
                );
                let seen = attribute(span, "ticketrail.attempt").map(|v| v.to_string());
                ensure!(
                    seen.as_deref() == Some(&attempt.to_string()),
                    "process spans in order have attempts {}",
                    describe(&process)
                );
                let settled = text(span, "ticketrail.outcome");
                ensure!(
                    settled == outcome,
                    "attempt {attempt} ended {settled:?}, expected {outcome:?}"
                );
                let error = text(span, "error.type");
                ensure!(error == "retryable", "attempt {attempt} has error.type {error:?}");
            }

            // The DLQ record keeps the original traceparent.
            let record = &records[0];
            ensure!(
                record.reason == DeadLetterReason::Exhausted,
                "dead-lettered as {}",
                record.reason
            );
            let kept = record.envelope.headers.get(TRACEPARENT);
            ensure!(
                kept == Some(&expected_parent),
                "the DLQ record's traceparent is {kept:?}, expected {expected_parent:?}"
            );

            // A replay, from an operator's own trace: a new publish span
            // linked to the original, and the attempt after it its child.
            let operator = Context::current_with_span(tracer.start("c18 replay"));
            let replay_trace = operator.span().span_context().trace_id();
            sc.broker
                .replay(&q, Replay::Id(id.clone()))
                .with_context(operator.clone())
                .await
                .doing("replaying")?;
            operator.span().end();
            let replayed = wait_for_spans(replay_trace, SpanKind::Producer, 1).await?;
            let replayed = &replayed[0];
            conventional(replayed, system, &q, "send", &id)?;
            let linked = replayed.links.links.iter().any(|link| {
                link.span_context.trace_id() == trace
                    && link.span_context.span_id() == publish.span_context.span_id()
            });
            ensure!(
                linked,
                "the replay's publish span links to {:?}, expected the original publish span {} of trace {trace}",
                replayed
                    .links
                    .links
                    .iter()
                    .map(|l| format!("{}/{}", l.span_context.trace_id(), l.span_context.span_id()))
                    .collect::<Vec<_>>(),
                publish.span_context.span_id()
            );
            let after = wait_for_spans(replay_trace, SpanKind::Consumer, 1).await?;
            ensure!(
                after[0].parent_span_id == replayed.span_context.span_id()
                    && text(&after[0], "ticketrail.outcome") == "acked",
                "after the replay: {}, expected an acked attempt, child of the replay's publish span",
                describe(&after)
            );

            // A plain client's traceparent: its message joins that trace.
            // A trace of this run's own, so runs side by side do not mix.
            let plain_trace = TraceId::from_bytes(fastrand::u128(1..).to_be_bytes());
            let plain_parent = SpanId::from_bytes(fastrand::u64(1..).to_be_bytes());
            let traceparent = format!("00-{plain_trace}-{plain_parent}-01");
            let payload = br#"{"key":"plain"}"#;
            let plain = Foreign {
                headers: &[(TRACEPARENT, &traceparent)],
                ..Foreign::new("jobs.plain", payload)
            };
            h.publish_foreign(sc.space(), plain)
                .await
                .doing("publishing with a plain client")?;
            let joined = wait_for_spans(plain_trace, SpanKind::Consumer, 1).await?;
            ensure!(
                joined[0].parent_span_id == plain_parent && joined[0].parent_span_is_remote,
                "the plain client's message was processed in {}, expected a child of span {plain_parent}",
                describe(&joined)
            );
            wait_until(WAIT, || handler.finished("plain"), || handler.describe()).await?;
            consumer.shutdown().await.doing("shutting down")?;
            Ok(())
        })
        .await,
    )
}
