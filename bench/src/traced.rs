//! The cost of tracing (bench feature `otel`): ticketrail's publish and
//! consume with an OpenTelemetry SDK tracer provider installed, every span
//! sampled and batched to an exporter that drops them, against the same
//! build with no provider installed. A build without the feature compiles
//! the tracing hooks out; its figures are the plain ones of the same run.

use opentelemetry::trace::noop::NoopTracerProvider;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

use crate::cpu::{CpuClock, Spent};
use crate::framework::Framework;
use crate::side::{BenchResult, Side};

/// Receives every finished span and keeps none: what is measured is the
/// cost on the message path, not an exporter's network.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(batch);
        Ok(())
    }
}

/// Throughputs and CPU of one way of running: publish, then consume.
#[derive(Default)]
pub(crate) struct Runs {
    pub(crate) publish: Vec<f64>,
    pub(crate) consume: Vec<f64>,
    pub(crate) publish_cpu: Spent,
    pub(crate) consume_cpu: Spent,
}

/// `[untraced, traced]`, alternating `repeats` times.
pub(crate) async fn measure(
    framework: &Framework,
    n: usize,
    window: usize,
    prefetch: u16,
    repeats: usize,
    clock: &CpuClock,
) -> BenchResult<[Runs; 2]> {
    let mut runs = [Runs::default(), Runs::default()];
    for _ in 0..repeats {
        for (traced, run) in runs.iter_mut().enumerate() {
            let provider = (traced == 1).then(|| {
                let provider = SdkTracerProvider::builder()
                    .with_batch_exporter(Discard)
                    .build();
                opentelemetry::global::set_tracer_provider(provider.clone());
                provider
            });
            let published = framework.publish(n, window);
            run.publish
                .push(clock.rate(&mut run.publish_cpu, n, published).await?);
            let consumed = framework.consume(n, prefetch, 1);
            run.consume
                .push(clock.rate(&mut run.consume_cpu, n, consumed).await?);
            if let Some(provider) = provider {
                opentelemetry::global::set_tracer_provider(NoopTracerProvider::new());
                provider.shutdown()?;
            }
        }
    }
    Ok(runs)
}
