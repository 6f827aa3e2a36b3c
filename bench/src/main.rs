//! ticketrail against the raw broker clients, side by side in one run.
//!
//! ```text
//! cargo run --release -p ticketrail-bench -- --broker memory|rabbitmq|nats|all [--messages N] [--backlog N]
//!     [--repeats N] [--prefetch N] [--window N] [--consumers N] [--payload BYTES] [--json]
//! ```
//!
//! `--prefetch`, `--window`, `--consumers` and `--payload` set every side,
//! for scale curves: prefetch per consumer (100), publishes awaiting their
//! confirm at once on a network broker (256), competing consumers in the
//! consume figures (1), and the size of each message's JSON (about 200
//! bytes).
//!
//! For each broker the same workload runs through the raw client and through
//! ticketrail, alternating, in one process: publish throughput (confirmed,
//! a window in flight), consume throughput (decode, handle, ack), end-to-end
//! latency at a fixed rate, healthy throughput while 10% of messages fail
//! and retry after 1 s, throughput until every message is handled while 10%
//! fail once and retry after 1 ms, and the peak memory of a consumer
//! draining a backlog. On the memory broker, where a round takes
//! milliseconds, the publish and consume figures run seven rounds a
//! repeat.
//! On NATS a second raw side carries ticketrail's two headers, so publish
//! and consume are also compared against a raw client sending the same
//! metadata. Built with `--features otel`, it adds the cost of tracing:
//! publish and consume with an OpenTelemetry tracer provider installed
//! against the same with none. Built with `--features peers`, other
//! frameworks run the publish and consume figures as further sides:
//! RustStream on every broker, omniqueue on memory and RabbitMQ.

mod cpu;
mod framework;
#[cfg(feature = "peers")]
mod peers;
mod raw_memory;
mod raw_nats;
mod raw_rabbitmq;
mod side;
#[cfg(feature = "otel")]
mod traced;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use cpu::{CpuClock, Spent};
use side::{BenchResult, Side};
use ticketrail::SharedBroker;

/// Publishes in flight at once on every side, on a network broker, unless
/// `--window` says otherwise. The in-process broker confirms a publish before
/// it returns, so every side publishes one after the other there.
const WINDOW: usize = 256;
/// The retry delay of the figure in which the retried messages are waited
/// for too.
const SUSTAINED_RETRY_AFTER: Duration = Duration::from_millis(1);
/// Prefetch on both sides, unless `--prefetch` says otherwise.
const PREFETCH: u16 = 100;
/// On the memory broker the publish and consume figures run this many
/// rounds a repeat: a round of 20,000 messages takes tens of milliseconds
/// there, and on a shared machine one such span can run at half the speed
/// of the next.
const MEMORY_ROUNDS: usize = 7;
/// Rate and count of the latency run.
const LATENCY_RATE: u32 = 1000;
const LATENCY_COUNT: usize = 3000;

struct Options {
    brokers: Vec<String>,
    messages: usize,
    backlog: usize,
    repeats: usize,
    json: bool,
    /// Prefetch per consumer, both sides.
    prefetch: u16,
    /// Publishes in flight on a network broker, every side.
    window: usize,
    /// Competing consumers in the consume figures, both sides.
    consumers: usize,
}

/// One figure and its raw baseline.
#[derive(Clone)]
struct Figure {
    broker: String,
    metric: String,
    unit: &'static str,
    higher_is_better: bool,
    ticketrail: f64,
    raw: f64,
    baseline: &'static str,
    /// CPU microseconds per message, ticketrail's and the baseline's: this
    /// process's and the broker's.
    cpu: Option<[(f64, Option<f64>); 2]>,
    /// Whether the figure is a cost whose difference (`ticketrail_minus_raw`)
    /// is the point: the framework's time per message over the baseline's.
    difference: bool,
}

impl Figure {
    fn with_cpu(mut self, cpu: Option<[(f64, Option<f64>); 2]>) -> Self {
        self.cpu = cpu;
        self
    }

    /// The framework's cost per message over the baseline's, from the same
    /// median throughputs: `1e6 / ours - 1e6 / theirs` microseconds.
    fn cost_per_message(mut self) -> Self {
        self.metric = self.metric.replace("throughput", "time per message");
        self.unit = "us";
        self.higher_is_better = false;
        self.ticketrail = 1e6 / self.ticketrail;
        self.raw = 1e6 / self.raw;
        self.cpu = None;
        self.difference = true;
        self
    }

    fn ratio(&self) -> f64 {
        self.ticketrail / self.raw
    }

    fn print(&self, json: bool) {
        if json {
            let line = serde_json::json!({
                "broker": self.broker,
                "metric": self.metric,
                "unit": self.unit,
                "better": if self.higher_is_better { "higher" } else { "lower" },
                "ticketrail": round(self.ticketrail),
                "raw": round(self.raw),
                "ratio": (self.ratio() * 1000.0).round() / 1000.0,
                "baseline": self.baseline,
            });
            let mut line = line;
            if self.difference {
                let exact = |x: f64| (x * 1000.0).round() / 1000.0;
                line["ticketrail"] = serde_json::json!(exact(self.ticketrail));
                line["raw"] = serde_json::json!(exact(self.raw));
                line["ticketrail_minus_raw"] = serde_json::json!(exact(self.ticketrail - self.raw));
            }
            if let Some([ours, theirs]) = self.cpu {
                line["client_cpu_us_per_msg"] = serde_json::json!({
                    "ticketrail": round(ours.0), "raw": round(theirs.0),
                });
                if let (Some(a), Some(b)) = (ours.1, theirs.1) {
                    line["broker_cpu_us_per_msg"] =
                        serde_json::json!({ "ticketrail": round(a), "raw": round(b) });
                }
            }
            println!("{line}");
        } else {
            let (precision, note) = if self.difference {
                let over = self.ticketrail - self.raw;
                (
                    3,
                    format!("{over:+.3} us over the baseline: {}", self.baseline),
                )
            } else {
                let better = if self.higher_is_better {
                    "higher"
                } else {
                    "lower"
                };
                (
                    0,
                    format!("{better} is better; baseline: {}", self.baseline),
                )
            };
            println!(
                "{:<9} {:<34} {:>12.precision$} {:>12.precision$} {:>7.3}  {} ({note})",
                self.broker,
                self.metric,
                self.ticketrail,
                self.raw,
                self.ratio(),
                self.unit,
            );
            if let Some([ours, theirs]) = self.cpu {
                let broker = match (ours.1, theirs.1) {
                    (Some(a), Some(b)) => format!(", broker {a:.1} vs {b:.1} ({:.2})", a / b),
                    _ => String::new(),
                };
                println!(
                    "{:<9}   cpu us/msg: client {:.1} vs {:.1} ({:.2}){broker}",
                    "",
                    ours.0,
                    theirs.0,
                    ours.0 / theirs.0
                );
            }
        }
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn parse() -> Result<Options, String> {
    let mut options = Options {
        brokers: vec!["memory".into()],
        messages: 20_000,
        backlog: 100_000,
        repeats: 3,
        json: false,
        prefetch: PREFETCH,
        window: WINDOW,
        consumers: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--broker" => {
                options.brokers = match value()?.as_str() {
                    "all" => vec!["memory".into(), "rabbitmq".into(), "nats".into()],
                    b @ ("memory" | "rabbitmq" | "nats") => vec![b.to_owned()],
                    other => return Err(format!("unknown broker `{other}`")),
                }
            }
            "--messages" => {
                options.messages = value()?.parse().map_err(|e| format!("--messages: {e}"))?
            }
            "--backlog" => {
                options.backlog = value()?.parse().map_err(|e| format!("--backlog: {e}"))?
            }
            "--repeats" => {
                options.repeats = value()?.parse().map_err(|e| format!("--repeats: {e}"))?
            }
            "--json" => options.json = true,
            "--prefetch" => {
                options.prefetch = value()?.parse().map_err(|e| format!("--prefetch: {e}"))?
            }
            "--window" => {
                options.window = value()?.parse().map_err(|e| format!("--window: {e}"))?
            }
            "--consumers" => {
                options.consumers = value()?.parse().map_err(|e| format!("--consumers: {e}"))?
            }
            "--payload" => {
                let bytes: usize = value()?.parse().map_err(|e| format!("--payload: {e}"))?;
                workload::set_payload_size(bytes);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(options)
}

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn url_of(broker: &str) -> String {
    match broker {
        "rabbitmq" => amqp_url(),
        "nats" => nats_url(),
        _ => "memory://".to_owned(),
    }
}

async fn connect(broker: &str) -> BenchResult<SharedBroker> {
    Ok(ticketrail::connect(&url_of(broker)).await?)
}

async fn raw_side(broker: &str, name: &str, capacity: usize) -> BenchResult<Box<dyn Side>> {
    Ok(match broker {
        "rabbitmq" => Box::new(raw_rabbitmq::RawRabbit::new(&amqp_url(), name).await?),
        "nats" => Box::new(raw_nats::RawNats::new(&nats_url(), name, false).await?),
        _ => Box::new(raw_memory::RawMemory::new(capacity.max(1))),
    })
}

/// Every side of one broker's run, each with queues or streams of its own
/// on the broker.
struct Sides {
    raw: Box<dyn Side>,
    framework: framework::Framework,
    /// Further baselines: what their figures add to the metric's name, the
    /// baseline they are, the side.
    others: Vec<(&'static str, &'static str, Box<dyn Side>)>,
    /// On RabbitMQ, raw lapin loops that retry crash-safely: the baseline
    /// for ticketrail's retries.
    raw_retry: Vec<raw_rabbitmq::RawRabbit>,
}

impl Sides {
    /// Removes what every side declared on the broker; a side that cannot
    /// is named, and the others are removed all the same.
    async fn teardown(&self) -> BenchResult<()> {
        let mut failed = Vec::new();
        let retry = self.raw_retry.iter().map(|side| side as &dyn Side);
        let others = self.others.iter().map(|(_, _, side)| side.as_ref());
        let all = [self.raw.as_ref(), &self.framework as &dyn Side]
            .into_iter()
            .chain(retry)
            .chain(others);
        for side in all {
            if let Err(e) = side.teardown().await {
                failed.push(e.to_string());
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(format!("tearing down: {}", failed.join("; ")).into())
    }
}

/// One broker's figures. What the sides declared on the broker is removed
/// also when a measurement fails half-way.
async fn bench(broker: &str, options: &Options) -> BenchResult<Vec<Figure>> {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let sides = set_up(broker, options, id).await?;
    let figures = measure(broker, options, id, &sides).await;
    let torn_down = sides.teardown().await;
    let figures = figures?;
    torn_down?;
    Ok(figures)
}

async fn set_up(broker: &str, options: &Options, id: &str) -> BenchResult<Sides> {
    let n = options.messages;
    let raw = raw_side(
        broker,
        &format!("bench-{id}-raw"),
        n.max(options.backlog).max(LATENCY_COUNT),
    )
    .await?;
    let framework =
        framework::Framework::new(connect(broker).await?, &format!("bench-{id}-tr")).await?;
    // On NATS a second baseline: the raw client carrying the same id and
    // content type headers as ticketrail, which the strict baseline omits.
    // Each further side: what its figures add to the metric's name, the
    // baseline it is, and the side.
    let mut others: Vec<(&str, &'static str, Box<dyn Side>)> = Vec::new();
    if broker == "nats" {
        others.push((
            ", same headers",
            "raw client with ticketrail's 2 headers",
            Box::new(raw_nats::RawNats::new(&nats_url(), &format!("bench-{id}-rawh"), true).await?),
        ));
    }
    #[cfg(feature = "peers")]
    others.extend(peers::sides(broker, &format!("bench-{id}"), options.prefetch).await?);
    let raw_retry = match broker {
        "rabbitmq" => vec![
            raw_rabbitmq::RawRabbit::with_retry(
                &amqp_url(),
                &format!("bench-{id}-rawcopy"),
                raw_rabbitmq::RetryDesign::CopyThenAck,
            )
            .await?,
            raw_rabbitmq::RawRabbit::with_retry(
                &amqp_url(),
                &format!("bench-{id}-rawreject"),
                raw_rabbitmq::RetryDesign::RejectToWaitQueue,
            )
            .await?,
        ],
        _ => Vec::new(),
    };
    Ok(Sides {
        raw,
        framework,
        others,
        raw_retry,
    })
}

async fn measure(
    broker: &str,
    options: &Options,
    id: &str,
    sides: &Sides,
) -> BenchResult<Vec<Figure>> {
    let Sides {
        raw,
        framework,
        others,
        raw_retry,
    } = sides;
    let n = options.messages;
    let mut sides: Vec<(&str, &dyn Side)> = vec![("raw", raw.as_ref()), ("ticketrail", framework)];
    for (_, baseline, side) in others {
        sides.push((baseline, side.as_ref()));
    }
    let window = window_on(broker, options.window);

    // Warm up connections, queues and code paths.
    let (prefetch, consumers) = (options.prefetch, options.consumers);
    for &(_, side) in &sides {
        side.publish(1000, window).await?;
        side.consume(1000, prefetch, consumers).await?;
    }
    let clock = CpuClock::new(broker, &url_of(broker));
    let mut publish = vec![Vec::new(); sides.len()];
    let mut consume = vec![Vec::new(); sides.len()];
    let mut publish_cpu = vec![Spent::default(); sides.len()];
    let mut consume_cpu = vec![Spent::default(); sides.len()];
    // In process a round takes milliseconds, and this machine's speed moves
    // by up to half between such spans: many rounds, so the medians hold.
    let rounds = match broker {
        "memory" => options.repeats * MEMORY_ROUNDS,
        _ => options.repeats,
    };
    for _ in 0..rounds {
        for (k, (_, side)) in sides.iter().enumerate() {
            let published = side.publish(n, window);
            publish[k].push(clock.rate(&mut publish_cpu[k], n, published).await?);
            let consumed = side.consume(n, prefetch, consumers);
            consume[k].push(clock.rate(&mut consume_cpu[k], n, consumed).await?);
        }
    }
    let total = n * options.repeats;
    let throughput_total = n * rounds;
    // p50 and p99 of each repeat, alternating sides; the medians are
    // reported, as one p99 is a handful of samples.
    let mut runs = vec![(Vec::new(), Vec::new()); 2];
    for _ in 0..options.repeats {
        for (k, &(_, side)) in sides[..2].iter().enumerate() {
            let (p50, p99) =
                workload::percentiles(side.latency(LATENCY_COUNT, LATENCY_RATE, prefetch).await?);
            runs[k].0.push(p50);
            runs[k].1.push(p99);
        }
    }
    let latency: Vec<(f64, f64)> = runs
        .into_iter()
        .map(|(p50, p99)| (workload::median(p50), workload::median(p99)))
        .collect();

    // Healthy throughput with 10% failing once, against no failures.
    let healthy = n - n.div_ceil(10);
    let mut with_failures = Vec::new();
    let mut without = Vec::new();
    // Index 0 is the baseline, as for `sides`: the run with no failures.
    // With failures, the CPU time includes the retries coming back.
    let mut healthy_cpu = [Spent::default(); 2];
    // All messages, the retried ones too, with retries after 1 ms: what
    // retries cost while they keep coming back.
    let mut sustained = Vec::new();
    let mut sustained_cpu = Spent::default();
    // On RabbitMQ, the raw loops that retry crash-safely run too.
    let mut raw_retry_rates = vec![Vec::new(); raw_retry.len()];
    let mut raw_retry_cpu = vec![Spent::default(); raw_retry.len()];
    for _ in 0..options.repeats {
        framework.publish(n, WINDOW).await?;
        let run = framework.consume_healthy(n, prefetch, 1, None);
        without.push(clock.rate(&mut healthy_cpu[0], healthy, run).await?);
        framework.publish(n, WINDOW).await?;
        let run = framework.consume_healthy(n, prefetch, 1, Some(10));
        with_failures.push(clock.rate(&mut healthy_cpu[1], healthy, run).await?);
        framework.publish(n, WINDOW).await?;
        let run = framework.consume_all_retrying(n, prefetch, 10, SUSTAINED_RETRY_AFTER);
        sustained.push(clock.rate(&mut sustained_cpu, n, run).await?);
        for (k, side) in raw_retry.iter().enumerate() {
            side.publish(n, WINDOW).await?;
            let run = side.consume_healthy(n, prefetch, 10);
            raw_retry_rates[k].push(clock.rate(&mut raw_retry_cpu[k], healthy, run).await?);
        }
    }

    #[cfg(feature = "otel")]
    let traced = traced::measure(framework, n, window, prefetch, options.repeats, &clock).await?;

    let rss = if broker == "memory" {
        None // the in-process broker keeps the backlog in the consumer's own process
    } else {
        let mut peaks = Vec::new();
        for &(label, side) in &sides[..2] {
            side.publish(options.backlog, WINDOW).await?;
            let queue = match label {
                "raw" => format!("bench-{id}-raw"),
                _ => framework.queue().to_owned(),
            };
            peaks.push(drain_in_child(broker, label, &queue, options.backlog).await?);
        }
        Some(peaks)
    };

    let b = broker.to_owned();
    let figure = |metric: &str, unit, higher_is_better, ticketrail, raw, baseline| Figure {
        broker: b.clone(),
        metric: metric.to_owned(),
        unit,
        higher_is_better,
        ticketrail,
        raw,
        baseline,
        cpu: None,
        difference: false,
    };
    // ticketrail's CPU per message against side `base`'s.
    let per_message = |spent: &[Spent], base: usize, messages: usize| {
        Some([
            spent[1].per_message(messages)?,
            spent[base].per_message(messages)?,
        ])
    };
    let mut figures = vec![
        figure(
            "publish throughput",
            "msg/s",
            true,
            workload::median(publish[1].clone()),
            workload::median(publish[0].clone()),
            "raw client",
        )
        .with_cpu(per_message(&publish_cpu, 0, throughput_total)),
        figure(
            "consume throughput",
            "msg/s",
            true,
            workload::median(consume[1].clone()),
            workload::median(consume[0].clone()),
            "raw client",
        )
        .with_cpu(per_message(&consume_cpu, 0, throughput_total)),
    ];
    // In process, the framework's cost is what it adds to each message's
    // time over the bare channel.
    if broker == "memory" {
        let two = figures.clone();
        figures.extend(two.into_iter().map(Figure::cost_per_message));
    }
    figures.extend([
        figure(
            "latency p50 (median of repeats)",
            "us",
            false,
            latency[1].0,
            latency[0].0,
            "raw client",
        ),
        figure(
            "latency p99 (median of repeats)",
            "us",
            false,
            latency[1].1,
            latency[0].1,
            "raw client",
        ),
        figure(
            "healthy throughput, 10% retrying",
            "msg/s",
            true,
            workload::median(with_failures.clone()),
            workload::median(without.clone()),
            "ticketrail with no failures",
        )
        .with_cpu(per_message(&healthy_cpu, 0, total)),
        figure(
            "throughput, 10% retried after 1 ms, all handled",
            "msg/s",
            true,
            workload::median(sustained),
            workload::median(without),
            "ticketrail with no failures",
        )
        .with_cpu(
            Some([
                sustained_cpu.per_message(total),
                healthy_cpu[0].per_message(total),
            ])
            .and_then(|[a, b]| Some([a?, b?])),
        ),
    ]);
    for (k, baseline) in [
        "raw lapin: confirmed copy to a TTL queue, then ack",
        "raw lapin: reject, broker dead-letters to a TTL queue",
    ]
    .into_iter()
    .enumerate()
    .take(raw_retry.len())
    {
        figures.push(
            figure(
                "healthy throughput, 10% retrying",
                "msg/s",
                true,
                workload::median(with_failures.clone()),
                workload::median(raw_retry_rates[k].clone()),
                baseline,
            )
            .with_cpu(
                Some([
                    healthy_cpu[1].per_message(total),
                    raw_retry_cpu[k].per_message(total),
                ])
                .and_then(|[a, b]| Some([a?, b?])),
            ),
        );
    }
    for (k, (suffix, baseline, _)) in others.iter().enumerate() {
        let k = k + 2;
        figures.push(
            figure(
                &format!("publish throughput{suffix}"),
                "msg/s",
                true,
                workload::median(publish[1].clone()),
                workload::median(publish[k].clone()),
                baseline,
            )
            .with_cpu(per_message(&publish_cpu, k, throughput_total)),
        );
        figures.push(
            figure(
                &format!("consume throughput{suffix}"),
                "msg/s",
                true,
                workload::median(consume[1].clone()),
                workload::median(consume[k].clone()),
                baseline,
            )
            .with_cpu(per_message(&consume_cpu, k, throughput_total)),
        );
    }
    #[cfg(feature = "otel")]
    {
        let [off, on] = traced;
        let cpu = |a: &Spent, b: &Spent| Some([a.per_message(total)?, b.per_message(total)?]);
        figures.push(
            figure(
                "publish throughput, traced",
                "msg/s",
                true,
                workload::median(on.publish),
                workload::median(off.publish),
                "ticketrail with no tracer provider",
            )
            .with_cpu(cpu(&on.publish_cpu, &off.publish_cpu)),
        );
        figures.push(
            figure(
                "consume throughput, traced",
                "msg/s",
                true,
                workload::median(on.consume),
                workload::median(off.consume),
                "ticketrail with no tracer provider",
            )
            .with_cpu(cpu(&on.consume_cpu, &off.consume_cpu)),
        );
    }
    if let Some(peaks) = rss {
        figures.push(figure(
            "consumer peak RSS, backlog",
            "KiB",
            false,
            peaks[1] as f64,
            peaks[0] as f64,
            "raw client",
        ));
    }
    Ok(figures)
}

/// Drains a backlog in a child process of this binary and returns the
/// child's peak resident memory.
async fn drain_in_child(broker: &str, side: &str, queue: &str, count: usize) -> BenchResult<u64> {
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args(["drain", broker, side, queue, &count.to_string()])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "drain child failed: {}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("peak_rss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("drain child printed no peak: {stdout}").into())
}

/// The child: drain `count` messages from `queue`, print peak memory.
async fn drain(args: &[String]) -> BenchResult<()> {
    let [broker, side, queue, count] = args else {
        return Err("usage: drain <broker> <raw|ticketrail> <queue> <count>".into());
    };
    let count: usize = count.parse()?;
    match side.as_str() {
        "raw" => {
            // Declaring is idempotent: attaching declares the same again.
            let side = raw_side(broker, queue, 0).await?;
            side.consume(count, PREFETCH, 1).await?;
        }
        _ => {
            let broker = connect(broker).await?;
            let framework = framework::Framework::new(broker, queue.trim_end_matches(".q")).await?;
            framework.consume(count, PREFETCH, 1).await?;
        }
    }
    println!("peak_rss_kib={}", workload::peak_rss_kib().unwrap_or(0));
    Ok(())
}

/// `one <broker> <side> <messages> <publish|both|retrying>`: one side
/// alone, after the usual warm-up, publishes `messages` and, with `both`,
/// consumes them (`retrying`: see [`one_retrying`]). For counting the
/// instructions a side spends per message (scripts/bench-instructions runs
/// it under cachegrind at two counts, so what set-up and warm-up cost
/// cancels out): a count this machine's noise does not move, where a rate
/// moves by tens of percent between runs. Each measured phase prints its
/// wall time and CPU time per message on stderr (see [`reported`]).
/// Sides: `raw`, `raw-headers` (NATS), `ticketrail`, and with `--features
/// peers` `ruststream` and `omniqueue`.
async fn one(args: &[String]) -> BenchResult<()> {
    let [broker, name, count, phase] = args else {
        return Err("usage: one <broker> <side> <messages> <publish|both|retrying>".into());
    };
    let count: usize = count.parse()?;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("bench-{id}-one");
    let consume = match phase.as_str() {
        "publish" => false,
        "both" => true,
        "retrying" if name == "ticketrail" => return one_retrying(broker, &prefix, count).await,
        "retrying" => return Err("phase `retrying`: ticketrail's side only".into()),
        other => return Err(format!("phase `{other}`: publish, both or retrying").into()),
    };
    let side: Box<dyn Side> = match name.as_str() {
        "raw" => raw_side(broker, &prefix, count.max(1000)).await?,
        "raw-headers" if broker == "nats" => {
            Box::new(raw_nats::RawNats::new(&nats_url(), &prefix, true).await?)
        }
        "ticketrail" => Box::new(framework::Framework::new(connect(broker).await?, &prefix).await?),
        #[cfg(feature = "peers")]
        peer => {
            // Every peer of the broker is set up; the others are taken
            // down again at once, queues and all.
            let mut chosen = None;
            for (_, baseline, side) in peers::sides(broker, &prefix, PREFETCH).await? {
                if chosen.is_none() && baseline.starts_with(peer) {
                    chosen = Some(side);
                } else {
                    side.teardown().await?;
                }
            }
            chosen.ok_or(format!("no side `{peer}` on {broker}"))?
        }
        #[cfg(not(feature = "peers"))]
        other => return Err(format!("no side `{other}` (peers need --features peers)").into()),
    };
    let window = window_on(broker, WINDOW);
    let run = async {
        side.publish(1000, window).await?;
        side.consume(1000, PREFETCH, 1).await?;
        let clock = CpuClock::new(broker, &url_of(broker));
        reported(&clock, "publish", count, side.publish(count, window)).await?;
        if consume {
            reported(&clock, "consume", count, side.consume(count, PREFETCH, 1)).await?;
        }
        BenchResult::Ok(())
    }
    .await;
    if run.is_ok() && !consume && broker == "memory" {
        // In process, what was published is left as it is until the
        // process ends, so freeing it counts in neither figure: consuming
        // frees it in `both`.
        std::mem::forget(side);
        return Ok(());
    }
    // Taken down also after a failed run: nothing is left on the broker.
    side.teardown().await?;
    run
}

/// Runs one phase of `one`, handling `count` messages, and says on stderr
/// what it took: its wall time against the CPU time this process's
/// threads spent (and the broker's), so a side that waits shows as wall
/// time over CPU time, and one running on both cores as CPU time over
/// wall time.
async fn reported(
    clock: &CpuClock,
    phase: &str,
    count: usize,
    work: impl std::future::Future<Output = BenchResult<Duration>>,
) -> BenchResult<()> {
    let (before, threads) = (clock.read(), cpu::threads_cpu());
    let took = work.await?;
    let threads = cpu::threads_cpu().saturating_sub(threads);
    let spent = clock.read().since(before);
    let micros = |d: Duration| d.as_secs_f64() * 1e6 / count.max(1) as f64;
    let broker = spent
        .broker
        .map(|b| format!(", broker CPU {:.2}", micros(b)))
        .unwrap_or_default();
    eprintln!(
        "{phase}: {count} messages, wall {:.2} us/msg, CPU {:.2} us/msg{broker}",
        micros(took),
        micros(threads),
    );
    Ok(())
}

/// `one`'s phase `retrying`: publishes `count` messages through ticketrail
/// and handles them all, every tenth user's failing its first attempt and
/// retried after `SUSTAINED_RETRY_AFTER`; against phase `both` at the same
/// count, what the retries cost, each through its whole way (failure
/// record, delayed nak, redelivery, record cleared).
async fn one_retrying(broker: &str, prefix: &str, count: usize) -> BenchResult<()> {
    let framework = framework::Framework::new(connect(broker).await?, prefix).await?;
    let window = window_on(broker, WINDOW);
    let run = async {
        framework.publish(1000, window).await?;
        framework.consume(1000, PREFETCH, 1).await?;
        let clock = CpuClock::new(broker, &url_of(broker));
        reported(&clock, "publish", count, framework.publish(count, window)).await?;
        let retrying = framework.consume_all_retrying(count, PREFETCH, 10, SUSTAINED_RETRY_AFTER);
        reported(&clock, "consume, every tenth retried", count, retrying).await?;
        BenchResult::Ok(())
    }
    .await;
    framework.teardown().await?;
    run
}

/// Publishes in flight at once on `broker`: the in-process broker confirms
/// a publish before it returns, so every side publishes one after the
/// other there.
fn window_on(broker: &str, window: usize) -> usize {
    if broker == "memory" {
        1
    } else {
        window
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let subcommand = match args.get(1).map(String::as_str) {
        Some("drain") => Some(("drain", drain(&args[2..]).await)),
        Some("one") => Some(("one", one(&args[2..]).await)),
        _ => None,
    };
    if let Some((name, result)) = subcommand {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("{e}\nusage: ticketrail-bench --broker memory|rabbitmq|nats|all [--messages N] [--backlog N] [--repeats N] [--json]");
            return ExitCode::from(2);
        }
    };
    if !options.json {
        println!(
            "{:<9} {:<34} {:>12} {:>12} {:>7}",
            "broker", "metric", "ticketrail", "raw", "ratio"
        );
    }
    let mut failed = false;
    for broker in &options.brokers {
        match bench(broker, &options).await {
            Ok(figures) => figures.iter().for_each(|f| f.print(options.json)),
            Err(e) => {
                eprintln!("{broker}: benchmark failed: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
