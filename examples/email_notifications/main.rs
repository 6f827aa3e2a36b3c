//! The seed's scenario: an API publishes welcome and password-reset emails to
//! `app.events`; a worker on `email.notifications` (bound to `user.#`) sends
//! them. Sending fails about 10% of the time (seeded, so runs repeat), and
//! one mail domain is down until an operator fixes it: those messages retry
//! after 1 s, 2 s and 4 s, then land in the DLQ. The program lists the DLQ
//! with its reasons, "fixes" the domain, replays the DLQ and prints a summary.
//!
//! ```text
//! cargo run --example email_notifications                      # in-process broker
//! cargo run --example email_notifications --features rabbitmq -- --broker amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo run --example email_notifications --features nats -- --broker nats://127.0.0.1:4222
//! ```
//!
//! With `--breaker` the outage is the whole mail provider's, for 8 s, and
//! the worker runs with a circuit breaker: it pauses instead of spending
//! the emails' attempts, probes now and then, and sends everything once
//! the provider is back: nothing in the DLQ, no operator needed. The
//! summary says how long the worker was paused.
//!
//! With `--cleanup` it deletes its queues and topic space at the end. With
//! `--leave-dead-letters` it stops before the replay, leaving the DLQ for
//! the `ticketrail` command line to list, group and replay.
//!
//! With `--metrics-addr 127.0.0.1:9464` it serves Prometheus metrics at
//! `/metrics` and the worker's health at `/health` (`/health/live`,
//! `/health/ready`), and keeps running after the summary until Ctrl-C.
//! With `--trace` (and `--features otel`) it prints, at the end, the trace
//! of every email that failed at least once: the API request, the publish,
//! each attempt, and the replay linked to it.

mod observe;

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::context::FutureExt;
use opentelemetry::trace::{TraceContextExt, Tracer};
use serde::{Deserialize, Serialize};
use ticketrail::{
    CircuitBreaker, Consumer, Context, Exponential, Handler, HandlerError, Publisher, QueueSpec,
    Replay, RetryPolicy, SharedBroker, Topology,
};

const EXCHANGE: &str = "app.events";
const QUEUE: &str = "email.notifications";
const SEED: u64 = 42;
const EMAILS: usize = 20;

/// The seed's message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmailMessage {
    to: String,
    subject: String,
    template: String,
    data: BTreeMap<String, String>,
    user_id: String,
    timestamp: String,
}

/// The worker's `send_email`, with a flaky SMTP relay and one mail domain
/// that is down until [`Mailer::outage_over`] is set.
struct Mailer {
    policy: Exponential,
    outage_over: AtomicBool,
    /// With `--breaker`: the whole provider is down until then.
    provider_down_until: Option<Instant>,
    sent: Mutex<HashSet<String>>,
    retried: AtomicUsize,
}

impl Mailer {
    /// Whether the relay fails this attempt: about 10%, the same on every run.
    fn relay_fails(user_id: &str, attempt: u32) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (user_id, attempt).hash(&mut hasher);
        fastrand::Rng::with_seed(SEED ^ hasher.finish()).f64() < 0.1
    }
}

impl Handler for Mailer {
    type Message = EmailMessage;

    async fn handle(&self, email: EmailMessage, ctx: &Context) -> Result<(), HandlerError> {
        let provider_down = self.provider_down_until.is_some_and(|t| Instant::now() < t);
        let failure = if provider_down {
            Some("the mail provider refuses connections".to_owned())
        } else if email.to.ends_with("@outage.example") && !self.outage_over.load(Ordering::SeqCst)
        {
            Some(format!("mail server for {} refuses connections", email.to))
        } else if Mailer::relay_fails(&email.user_id, ctx.attempt()) {
            Some("SMTP connection failed".to_owned())
        } else {
            None
        };
        if let Some(error) = failure {
            if ctx.attempt() < self.policy.max_attempts() {
                self.retried.fetch_add(1, Ordering::SeqCst);
            }
            return Err(HandlerError::retryable(error));
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // the work itself
        println!(
            "sent {:<15} to {:<24} (attempt {})",
            email.template,
            email.to,
            ctx.attempt()
        );
        self.sent
            .lock()
            .expect("not poisoned")
            .insert(ctx.id().to_owned());
        Ok(())
    }
}

fn email(i: usize) -> (&'static str, EmailMessage) {
    let (routing_key, template, subject) = if i.is_multiple_of(2) {
        ("user.welcome", "welcome", "Welcome to the platform")
    } else {
        ("user.password-reset", "password-reset", "Password Reset")
    };
    let domain = if i % 9 == 4 {
        "outage.example"
    } else {
        "example.com"
    };
    let message = EmailMessage {
        to: format!("user{i}@{domain}"),
        subject: subject.to_owned(),
        template: template.to_owned(),
        data: BTreeMap::from([("name".to_owned(), format!("User {i}"))]),
        user_id: format!("user-{i}"),
        timestamp: format!("2026-11-28T12:{:02}:00Z", i % 60),
    };
    (routing_key, message)
}

async fn wait_for(
    what: &str,
    within: Duration,
    mut done: impl AsyncFnMut() -> ticketrail::Result<bool>,
) -> ticketrail::Result<()> {
    let deadline = Instant::now() + within;
    while !done().await? {
        if Instant::now() > deadline {
            return Err(ticketrail::Error::new(
                ticketrail::ErrorKind::Timeout,
                format!("{what} took over {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .init();
    let args = arguments()?;
    let url = args.url.clone();
    let traces = if args.trace {
        if !cfg!(feature = "otel") {
            return Err("--trace needs the otel feature: \
                 cargo run --example email_notifications --features otel -- --trace"
                .into());
        }
        Some(observe::install_tracing())
    } else {
        None
    };
    let metrics = match args.metrics_addr {
        Some(_) => Some(observe::install_metrics()?),
        None => None,
    };
    let broker: SharedBroker = ticketrail::connect(&url).await?;
    println!(
        "broker: {} ({})",
        broker.backend(),
        ticketrail::redact_url(&url)
    );

    // The seed's topology; declaring is idempotent.
    let topology = Topology::new(EXCHANGE).queue(QueueSpec::new(QUEUE).bind("user.#"));
    broker.declare(&topology).await?;

    // Seed defaults: 1 s, x2, 3 retries (4 attempts), then the DLQ.
    let policy = Exponential::builder()
        .initial(Duration::from_secs(1))
        .multiplier(2.0)
        .max_attempts(4)
        .build()?;
    let mailer = Arc::new(Mailer {
        policy: policy.clone(),
        // With the breaker, the provider's own outage stands in for the
        // one domain's, and ends by itself.
        outage_over: AtomicBool::new(args.breaker),
        provider_down_until: args
            .breaker
            .then(|| Instant::now() + Duration::from_secs(8)),
        sent: Mutex::default(),
        retried: AtomicUsize::new(0),
    });
    let mut worker = Consumer::new(broker.clone(), QUEUE, Arc::clone(&mailer))
        .retry_policy(policy)
        .prefetch(5);
    if args.breaker {
        worker = worker.circuit_breaker(
            CircuitBreaker::default()
                .min_attempts(4)
                .cool_down(Duration::from_secs(1), Duration::from_secs(4)),
        );
    }
    let worker = worker.spawn();
    if let (Some(addr), Some(metrics)) = (args.metrics_addr, &metrics) {
        let bound = observe::serve(addr, metrics.clone(), worker.probe()).await?;
        println!("metrics at http://{bound}/metrics, health at http://{bound}/health");
    }

    // The API side: publish and return; each publish is confirmed.
    let publisher = Publisher::new(broker.clone(), EXCHANGE);
    let mut published = HashSet::new();
    let tracer = opentelemetry::global::tracer("email_notifications");
    for i in 0..EMAILS {
        let (routing_key, message) = email(i);
        // The API request that publishes, as its trace's root span.
        let request = opentelemetry::Context::current_with_span(tracer.start("POST /users"));
        let id = publisher
            .publish(routing_key, &message)
            .with_context(request.clone())
            .await?;
        request.span().end();
        published.insert(id);
    }
    println!("published {} emails", published.len());

    // This run's emails only: a broker may still hold earlier runs' ones
    // (left with --leave-dead-letters, then replayed).
    let sent = |mailer: &Mailer| {
        let sent = mailer.sent.lock().expect("not poisoned");
        sent.iter().filter(|id| published.contains(*id)).count()
    };
    // How long the breaker held the worker, as its health tells.
    let mut paused = Duration::ZERO;
    let mut last_look = Instant::now();
    wait_for(
        "handling or dead-lettering every email",
        Duration::from_secs(60),
        async || {
            if worker.health().paused.is_some() {
                paused += last_look.elapsed();
            }
            last_look = Instant::now();
            let dead = broker.dead_letters(QUEUE, 1000).await?.len();
            Ok(sent(&mailer) + dead >= published.len())
        },
    )
    .await?;

    let dead = broker.dead_letters(QUEUE, 1000).await?;
    println!("dead-letter queue of {QUEUE}: {} message(s)", dead.len());
    for record in &dead {
        println!(
            "  {} {} reason={} attempts={} error={:?}",
            record.envelope.id,
            record.envelope.routing_key,
            record.reason,
            record.attempts,
            record.last_error
        );
    }

    if args.leave_dead_letters {
        worker.shutdown().await?;
        broker.close().await?;
        println!(
            "left {} message(s) in the DLQ of {QUEUE}; see why with \
             `ticketrail dlq list {QUEUE}`, replay with `ticketrail dlq replay {QUEUE} --all --first`",
            dead.len()
        );
        return Ok(());
    }

    let replayed = if dead.is_empty() {
        0
    } else {
        println!("operator: the mail server is back; replaying the dead-letter queue");
        mailer.outage_over.store(true, Ordering::SeqCst);
        let operator = opentelemetry::Context::current_with_span(tracer.start("replay DLQ"));
        let replayed = broker
            .replay(QUEUE, Replay::All)
            .with_context(operator.clone())
            .await?;
        operator.span().end();
        replayed
    };
    wait_for(
        "handling the replayed emails",
        Duration::from_secs(60),
        async || Ok(sent(&mailer) >= published.len()),
    )
    .await?;

    let handled = sent(&mailer);
    let paused = if args.breaker {
        format!(", paused {:.1} s", paused.as_secs_f64())
    } else {
        String::new()
    };
    println!(
        "published {}, handled {}, retried {}, dead-lettered {}, replayed {}{paused}",
        published.len(),
        handled,
        mailer.retried.load(Ordering::SeqCst),
        dead.len(),
        replayed
    );
    if let Some(exporter) = &traces {
        println!("traces of the emails that failed at least once:");
        observe::print_failed_traces(exporter);
    }
    if metrics.is_some() {
        println!("still serving metrics and health; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    worker.shutdown().await?;
    if args.cleanup {
        broker.delete(&topology).await?;
    }
    broker.close().await?;
    if handled != published.len() {
        return Err(format!(
            "{} of {} emails were not handled",
            published.len() - handled,
            published.len()
        )
        .into());
    }
    Ok(())
}

/// The command line.
struct Arguments {
    /// `--broker <url>`, else `TICKETRAIL_BROKER`, else the in-process broker.
    url: String,
    /// `--cleanup`.
    cleanup: bool,
    /// `--leave-dead-letters`: stop before the operator's replay.
    leave_dead_letters: bool,
    /// `--metrics-addr <host:port>`.
    metrics_addr: Option<SocketAddr>,
    /// `--trace`.
    trace: bool,
    /// `--breaker`: a provider outage, ridden out by a circuit breaker.
    breaker: bool,
}

fn arguments() -> Result<Arguments, String> {
    const USAGE: &str =
        "usage: email_notifications [--broker URL] [--cleanup] [--leave-dead-letters] \
         [--metrics-addr HOST:PORT] [--trace] [--breaker]";
    let mut args = std::env::args().skip(1);
    let mut parsed = Arguments {
        url: std::env::var("TICKETRAIL_BROKER").unwrap_or_else(|_| "memory://".to_owned()),
        cleanup: false,
        leave_dead_letters: false,
        metrics_addr: None,
        trace: false,
        breaker: false,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--broker" => parsed.url = args.next().ok_or("--broker needs a URL")?,
            "--cleanup" => parsed.cleanup = true,
            "--leave-dead-letters" => parsed.leave_dead_letters = true,
            "--trace" => parsed.trace = true,
            "--breaker" => parsed.breaker = true,
            "--metrics-addr" => {
                let addr = args.next().ok_or("--metrics-addr needs HOST:PORT")?;
                let addr = addr
                    .parse()
                    .map_err(|e| format!("--metrics-addr `{addr}`: {e} (e.g. 127.0.0.1:9464)"))?;
                parsed.metrics_addr = Some(addr);
            }
            other => return Err(format!("unknown argument `{other}`; {USAGE}")),
        }
    }
    if parsed.leave_dead_letters && parsed.url.starts_with("memory:") {
        return Err(
            "--leave-dead-letters needs a broker that outlives this program \
                    (--broker amqp://... or nats://...)"
                .into(),
        );
    }
    Ok(parsed)
}
