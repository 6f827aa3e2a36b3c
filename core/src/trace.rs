//! Trace context through the broker (C18), with the `otel` feature.
//!
//! A message published inside an OpenTelemetry context is handled inside
//! it: publishing opens a `publish` span (kind producer) and writes W3C
//! `traceparent` (and `tracestate`) into the message's headers; each attempt
//! opens a `process` span (kind consumer) whose parent is the context those
//! headers carry, so retries stay in the trace; a dead-letter record keeps
//! the headers; a replay opens a new `publish` span linked to the original.
//! A message from a plain client with a `traceparent` header joins its trace.
//!
//! Spans follow OpenTelemetry's messaging conventions
//! (`messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type`, `messaging.message.id`, the routing key,
//! `error.type`) plus `ticketrail.attempt` and `ticketrail.outcome`. They go
//! to the global tracer provider (`opentelemetry::global`); with none
//! installed they cost next to nothing, and without the feature, nothing.
//!
//! The parent of a publish span is the current OpenTelemetry context of the
//! task that publishes: run the publish with
//! `opentelemetry::context::FutureExt::with_context`, or inside
//! `Context::attach` / `Tracer::in_span`.

/// The W3C trace-context header that carries the trace id and parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor trace state.
pub const TRACESTATE: &str = "tracestate";

pub(crate) use imp::{ProcessSpan, PublishSpan};

/// Opens a `publish` span for a message that is stored now and sent later
/// (a transactional outbox row), writes its context into the message's
/// headers and ends it: the handler's `process` span then becomes its child
/// however late the message leaves, so the trace runs from the code that
/// stored the message to every attempt at handling it (C18). `system` names
/// where the message is stored (`postgresql`). Without the `otel` feature it
/// does nothing.
pub fn record_stored_publish(
    system: &'static str,
    topic_space: &str,
    message: &mut crate::envelope::Message,
) {
    let span = PublishSpan::start(
        system,
        topic_space,
        &message.id,
        &message.routing_key,
        &mut message.headers,
    );
    span.end(None);
}

#[cfg(feature = "otel")]
mod imp {
    use std::borrow::Cow;

    use opentelemetry::global::{self, BoxedSpan};
    use opentelemetry::trace::{
        Link, Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer,
    };
    use opentelemetry::{Context, KeyValue};

    use super::{TRACEPARENT, TRACESTATE};
    use crate::envelope::{Envelope, Headers};

    const TRACER: &str = "ticketrail";

    fn tracer() -> global::BoxedTracer {
        global::tracer(TRACER)
    }

    /// The span context a `traceparent` (and `tracestate`) header carries;
    /// `None` for a missing or malformed one (version 00, W3C).
    pub(crate) fn extract(headers: &Headers) -> Option<SpanContext> {
        let parent = headers.get(TRACEPARENT)?;
        let mut parts = parent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        let state = headers
            .get(TRACESTATE)
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Some(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags),
            true,
            state,
        ))
    }

    /// Writes `context` as `traceparent` and `tracestate` headers.
    pub(crate) fn inject(context: &SpanContext, headers: &mut Headers) {
        if !context.is_valid() {
            return;
        }
        headers.insert(
            TRACEPARENT.to_owned(),
            format!(
                "00-{}-{}-{:02x}",
                context.trace_id(),
                context.span_id(),
                context.trace_flags().to_u8()
            ),
        );
        let state = context.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            headers.insert(TRACESTATE.to_owned(), state);
        }
    }

    fn routing_key_attribute(system: &str, routing_key: &str) -> KeyValue {
        let key = if system == "rabbitmq" {
            "messaging.rabbitmq.destination.routing_key"
        } else {
            "ticketrail.routing_key"
        };
        KeyValue::new(key, routing_key.to_owned())
    }

    /// A `publish` span, ended once the broker confirmed the message or
    /// refused it.
    pub(crate) struct PublishSpan(BoxedSpan);

    impl PublishSpan {
        /// Opens the span as a child of the current context and writes its
        /// context into `headers`.
        pub(crate) fn start(
            system: &'static str,
            topic_space: &str,
            id: &str,
            routing_key: &str,
            headers: &mut Headers,
        ) -> Self {
            Self::start_with(
                system,
                topic_space,
                id,
                routing_key,
                headers,
                &Context::current(),
                Vec::new(),
            )
        }

        /// A replay's publish span: a new trace (or the caller's), linked to
        /// the trace the dead letter was in.
        pub(crate) fn replay(system: &'static str, queue: &str, envelope: &mut Envelope) -> Self {
            let links = extract(&envelope.headers)
                .map(|original| {
                    vec![Link::new(
                        original,
                        vec![KeyValue::new("ticketrail.link", "replay of a dead letter")],
                        0,
                    )]
                })
                .unwrap_or_default();
            let id = envelope.id.clone();
            let routing_key = envelope.routing_key.clone();
            Self::start_with(
                system,
                queue,
                &id,
                &routing_key,
                &mut envelope.headers,
                &Context::current(),
                links,
            )
        }

        fn start_with(
            system: &'static str,
            destination: &str,
            id: &str,
            routing_key: &str,
            headers: &mut Headers,
            parent: &Context,
            links: Vec<Link>,
        ) -> Self {
            let tracer = tracer();
            let span = tracer
                .span_builder(format!("publish {destination}"))
                .with_kind(SpanKind::Producer)
                .with_links(links)
                .with_attributes(vec![
                    KeyValue::new("messaging.system", system),
                    KeyValue::new("messaging.destination.name", destination.to_owned()),
                    KeyValue::new("messaging.operation.type", "send"),
                    KeyValue::new("messaging.operation.name", "publish"),
                    KeyValue::new("messaging.message.id", id.to_owned()),
                    routing_key_attribute(system, routing_key),
                ])
                .start_with_context(&tracer, parent);
            inject(span.span_context(), headers);
            PublishSpan(span)
        }

        /// Ends the span with the outcome of the publish.
        pub(crate) fn end(mut self, error: Option<&crate::Error>) {
            if let Some(e) = error {
                self.0
                    .set_attribute(KeyValue::new("error.type", e.kind().code()));
                self.0.set_status(Status::error(e.to_string()));
            }
            self.0.end();
        }
    }

    /// The `process` span of one attempt, in the context the handler runs in.
    pub(crate) struct ProcessSpan(Context);

    impl ProcessSpan {
        /// Opens the span as a child of the context the message carries (a
        /// new trace if it carries none).
        pub(crate) fn start(system: &'static str, queue: &str, envelope: &Envelope) -> Self {
            let parent = match extract(&envelope.headers) {
                Some(remote) => Context::new().with_remote_span_context(remote),
                None => Context::new(),
            };
            let tracer = tracer();
            let span = tracer
                .span_builder(Cow::Owned(format!("process {queue}")))
                .with_kind(SpanKind::Consumer)
                .with_attributes(vec![
                    KeyValue::new("messaging.system", system),
                    KeyValue::new("messaging.destination.name", queue.to_owned()),
                    KeyValue::new("messaging.operation.type", "process"),
                    KeyValue::new("messaging.operation.name", "process"),
                    KeyValue::new("messaging.message.id", envelope.id.clone()),
                    routing_key_attribute(system, &envelope.routing_key),
                    KeyValue::new("ticketrail.attempt", i64::from(envelope.attempt)),
                ])
                .start_with_context(&tracer, &parent);
            ProcessSpan(parent.with_span(span))
        }

        /// Runs `future` (the handler) inside this span's context.
        pub(crate) fn within<F: std::future::Future>(
            &self,
            future: F,
        ) -> impl std::future::Future<Output = F::Output> {
            opentelemetry::context::FutureExt::with_context(future, self.0.clone())
        }

        /// Records how the attempt was settled (`acked`, `retried`,
        /// `dead-lettered`) and, for a failure, its kind and error, then ends.
        pub(crate) fn end(self, outcome: &'static str, error: Option<(&'static str, &str)>) {
            let span = self.0.span();
            span.set_attribute(KeyValue::new("ticketrail.outcome", outcome));
            if let Some((kind, text)) = error {
                span.set_attribute(KeyValue::new("error.type", kind));
                span.set_status(Status::error(text.to_owned()));
            }
            span.end();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn traceparent_round_trips_and_garbage_is_ignored() {
            let mut headers = Headers::new();
            headers.insert(
                TRACEPARENT.to_owned(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            );
            headers.insert(TRACESTATE.to_owned(), "congo=t61rcWkgMzE".to_owned());
            let context = extract(&headers).unwrap();
            assert_eq!(
                context.trace_id().to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert!(context.is_sampled());
            let mut out = Headers::new();
            inject(&context, &mut out);
            assert_eq!(out, headers);
            for bad in [
                "",
                "00-xyz",
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            ] {
                let mut headers = Headers::new();
                headers.insert(TRACEPARENT.to_owned(), bad.to_owned());
                assert!(extract(&headers).is_none(), "{bad:?}");
            }
        }
    }
}

#[cfg(not(feature = "otel"))]
mod imp {
    use crate::envelope::{Envelope, Headers};

    /// Without the `otel` feature: nothing.
    pub(crate) struct PublishSpan;

    impl PublishSpan {
        #[inline(always)]
        pub(crate) fn start(
            _system: &'static str,
            _topic_space: &str,
            _id: &str,
            _routing_key: &str,
            _headers: &mut Headers,
        ) -> Self {
            PublishSpan
        }

        #[inline(always)]
        pub(crate) fn replay(
            _system: &'static str,
            _queue: &str,
            _envelope: &mut Envelope,
        ) -> Self {
            PublishSpan
        }

        #[inline(always)]
        pub(crate) fn end(self, _error: Option<&crate::Error>) {}
    }

    /// Without the `otel` feature: nothing.
    pub(crate) struct ProcessSpan;

    impl ProcessSpan {
        #[inline(always)]
        pub(crate) fn start(_system: &'static str, _queue: &str, _envelope: &Envelope) -> Self {
            ProcessSpan
        }

        #[inline(always)]
        pub(crate) fn within<F: std::future::Future>(&self, future: F) -> F {
            future
        }

        #[inline(always)]
        pub(crate) fn end(self, _outcome: &'static str, _error: Option<(&'static str, &str)>) {}
    }
}
