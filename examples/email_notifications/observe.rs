//! What an operator's platform sees of the example: Prometheus metrics and
//! health probes over HTTP (`--metrics-addr`), and the traces of the emails
//! (`--trace`, with the `otel` feature).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{SpanId, Status, TraceId};
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, InMemorySpanExporterBuilder, SdkTracerProvider, SpanData,
};
use ticketrail::{Health, HealthProbe};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Installs the Prometheus recorder: every ticketrail metric from now on.
pub(crate) fn install_metrics() -> Result<PrometheusHandle, Box<dyn std::error::Error>> {
    let handle = PrometheusBuilder::new()
        // `_total` on counters, `_seconds` on the duration.
        .with_recommended_naming(true)
        // Real histograms, in buckets from 1 ms to 30 s, for handler durations.
        .set_buckets_for_metric(
            Matcher::Full(ticketrail::metrics::PROCESS_DURATION.to_owned()),
            &[0.001, 0.005, 0.025, 0.1, 0.25, 1.0, 5.0, 30.0],
        )?
        .install_recorder()?;
    // The exporter keeps histograms tidy only if asked now and then.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Serves `GET /metrics` (Prometheus text), `GET /health` (the worker's
/// health as JSON; 200 when ready, else 503), `GET /health/live` and
/// `GET /health/ready` (200 or 503, for liveness and readiness probes).
pub(crate) async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    probe: HealthProbe,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (metrics, probe) = (metrics.clone(), probe.clone());
            tokio::spawn(async move {
                // A client that hangs up early is its own business.
                let _ = respond(stream, &metrics, &probe).await;
            });
        }
    });
    Ok(bound)
}

/// Answers one HTTP/1.x request and closes the connection.
async fn respond(
    mut stream: TcpStream,
    metrics: &PrometheusHandle,
    probe: &HealthProbe,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut stream);
    let mut request = String::new();
    reader.read_line(&mut request).await?;
    // The headers, up to the blank line; none of them matter here.
    let mut line = String::new();
    while reader.read_line(&mut line).await? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let health = probe.health();
    let status = |ok: bool| {
        if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        }
    };
    let (status, content_type, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        "/health" => (
            status(health.is_ready()),
            "application/json",
            health_json(&health),
        ),
        "/health/live" => (
            status(health.is_live()),
            "text/plain",
            format!("{}\n", health.state.as_str()),
        ),
        "/health/ready" => (
            status(health.is_ready()),
            "text/plain",
            format!("{}\n", health.state.as_str()),
        ),
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /health\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn health_json(health: &Health) -> String {
    let json = serde_json::json!({
        "queue": health.queue,
        "state": health.state.as_str(),
        "live": health.is_live(),
        "ready": health.is_ready(),
        "in_flight": health.in_flight,
        "seconds_since_last_delivery": health.since_last_delivery.map(|d| d.as_secs_f64()),
        "consecutive_failures": health.consecutive_failures,
        "last_error": health.last_error,
        "handled": health.handled,
        "retried": health.retried,
        "dead_lettered": health.dead_lettered,
    });
    format!("{json}\n")
}

/// Keeps every finished span in memory, to print the traces at the end.
pub(crate) fn install_tracing() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporterBuilder::new().build();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider);
    exporter
}

/// Prints, as an indented tree, every trace in which a message failed at
/// least once: from the API request through each attempt, the DLQ and the
/// replay.
pub(crate) fn print_failed_traces(exporter: &InMemorySpanExporter) {
    let spans = exporter.get_finished_spans().unwrap_or_default();
    let mut traces: HashMap<TraceId, Vec<&SpanData>> = HashMap::new();
    for span in &spans {
        traces
            .entry(span.span_context.trace_id())
            .or_default()
            .push(span);
    }
    // In the order the requests came in.
    let mut traces: Vec<(TraceId, Vec<&SpanData>)> = traces.into_iter().collect();
    for (_, spans) in &mut traces {
        spans.sort_by_key(|s| s.start_time);
    }
    traces.sort_by_key(|(_, spans)| spans.first().map(|s| s.start_time));
    for (trace, spans) in &traces {
        if !spans
            .iter()
            .any(|s| matches!(s.status, Status::Error { .. }))
        {
            continue;
        }
        println!("trace {trace}");
        print_roots(spans);
        // Its message replayed: a publish span in another trace, linked here.
        for (other, others) in &traces {
            for replay in others.iter().filter(|s| {
                s.links
                    .links
                    .iter()
                    .any(|l| l.span_context.trace_id() == *trace)
            }) {
                println!("  replayed in trace {other}:");
                print_tree(replay, others, 2);
            }
        }
    }
}

/// Prints the spans of one trace whose parents are not in it, with their children.
fn print_roots(spans: &[&SpanData]) {
    for root in spans.iter().filter(|s| {
        !spans
            .iter()
            .any(|p| p.span_context.span_id() == s.parent_span_id)
    }) {
        print_tree(root, spans, 1);
    }
}

fn print_tree(span: &SpanData, all: &[&SpanData], depth: usize) {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let mut line = format!("{}{}", "  ".repeat(depth), span.name);
    if let Some(attempt) = attr("ticketrail.attempt") {
        line += &format!(" attempt={attempt}");
    }
    if let Some(outcome) = attr("ticketrail.outcome") {
        line += &format!(" outcome={outcome}");
    }
    if let Status::Error { description } = &span.status {
        line += &format!(" error={:?}", description.as_ref());
    }
    for link in &span.links.links {
        line += &format!(
            " (linked to trace {} span {})",
            link.span_context.trace_id(),
            link.span_context.span_id()
        );
    }
    println!("{line}  [span {}]", short(span.span_context.span_id()));
    for child in all
        .iter()
        .filter(|c| c.parent_span_id == span.span_context.span_id())
    {
        print_tree(child, all, depth + 1);
    }
}

fn short(id: SpanId) -> String {
    id.to_string()[..8].to_owned()
}
