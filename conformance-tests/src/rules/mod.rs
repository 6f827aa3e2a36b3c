//! One async function per rule of the contract, and the runner.

use std::future::Future;
use std::pin::Pin;

use ticketrail_core::Capabilities;

use crate::harness::{Harness, Verdict};
use crate::support::Check;

mod dead_letters;
mod deliveries;
mod effects;
mod faults;
mod flow;
mod lifecycle;
mod publishing;
mod retries;
mod scheduling;
mod tracing;

type RuleFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// One rule of the contract.
#[derive(Clone, Copy)]
pub struct Rule {
    /// `C01`..`C18`.
    pub id: &'static str,
    /// The rule's name in DESIGN.md.
    pub name: &'static str,
    /// The capability a backend must declare for the rule to apply; the
    /// rule is not applicable (and must say so) on a backend without it.
    pub needs: Option<fn(&Capabilities) -> bool>,
    /// Runs the rule against a backend.
    pub run: for<'a> fn(&'a dyn Harness) -> RuleFuture<'a>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.id, self.name)
    }
}

/// A rule body's result: passed, failed with what was seen, or not
/// applicable to the backend.
pub(crate) enum Skip {
    Failed(String),
    NotApplicable(String),
}

impl From<String> for Skip {
    fn from(what: String) -> Self {
        Skip::Failed(what)
    }
}

fn verdict(result: Result<(), Skip>) -> Verdict {
    match result {
        Ok(()) => Verdict::Passed,
        Err(Skip::Failed(what)) => Verdict::Failed(what),
        Err(Skip::NotApplicable(why)) => Verdict::NotApplicable(why),
    }
}

fn checked(check: Check) -> Result<(), Skip> {
    check.map_err(Skip::Failed)
}

macro_rules! rules {
    ($($id:literal, $name:literal, $f:path $(, needs $needs:expr)?;)*) => {
        /// Every rule, in order.
        pub const RULES: &[Rule] = &[$(
            Rule {
                id: $id,
                name: $name,
                needs: rules!(@needs $($needs)?),
                run: |h| Box::pin(async move { verdict($f(h).await) }),
            },
        )*];
    };
    (@needs) => { None };
    (@needs $needs:expr) => { Some($needs) };
}

rules! {
    "C01", "confirmed publish", publishing::c01_confirmed_publish;
    "C02", "round trip", publishing::c02_round_trip;
    "C03", "ack is final", deliveries::c03_ack_is_final;
    "C04", "at least once", deliveries::c04_at_least_once;
    "C05", "prefetch", deliveries::c05_prefetch;
    "C06", "competing consumers", deliveries::c06_competing_consumers;
    "C07", "delayed retry", retries::c07_delayed_retry;
    "C08", "exhaustion", retries::c08_exhaustion;
    "C09", "no pointless retries", retries::c09_no_pointless_retries;
    "C10", "dead-letter record", dead_letters::c10_dead_letter_record;
    "C11", "DLQ operations", dead_letters::c11_dlq_operations;
    "C12", "crash-safe backoff", retries::c12_crash_safe_backoff;
    "C13", "crash loops end", retries::c13_crash_loops_end;
    "C14", "graceful shutdown", lifecycle::c14_graceful_shutdown;
    "C15", "reconnect", lifecycle::c15_reconnect, needs |c: &Capabilities| c.reconnect;
    "C16", "topic routing", publishing::c16_topic_routing;
    "C17", "foreign messages", publishing::c17_foreign_messages;
    "C18", "trace context", tracing::c18_trace_context;
    "C19", "outbox", effects::c19_outbox;
    "C20", "inbox", effects::c20_inbox;
    "C21", "silent faults", faults::c21_silent_faults, needs |c: &Capabilities| c.reconnect;
    "C22", "downstream outage", flow::c22_downstream_outage;
    "C23", "rate limit", flow::c23_rate_limit;
    "C24", "scheduled publishing", scheduling::c24_scheduled_publishing, needs |c: &Capabilities| c.scheduling;
}

/// Rules that restart or kill the broker (on a throwaway server of their
/// own): not run against a broker someone runs (`ticketrail check`).
pub const RESTART_RULES: &[&str] = &["C15"];

/// Rules that need a PostgreSQL database besides the broker (the outbox
/// and inbox): run by `ticketrail check` only when it is given one.
pub const DATABASE_RULES: &[&str] = &["C19", "C20"];

/// Runs one rule by id (`C07` or `c07`).
pub async fn run_rule(harness: &dyn Harness, id: &str) -> Option<Verdict> {
    let rule = RULES.iter().find(|r| r.id.eq_ignore_ascii_case(id))?;
    Some((rule.run)(harness).await)
}

/// Runs rule `id` and panics unless it passed, or is not applicable on a
/// backend that declares it lacks the rule's capability: what every
/// generated per-rule test does.
pub async fn assert_rule(harness: &dyn Harness, id: &str) {
    let rule = RULES
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no rule {id}"));
    let verdict = (rule.run)(harness).await;
    println!("conformance {} {} {verdict}", harness.name(), rule.id);
    match verdict {
        Verdict::Passed => {}
        Verdict::NotApplicable(why) => {
            let capable = match rule.needs {
                Some(needs) => {
                    let broker = harness.connect().await.expect("connecting");
                    let capable = needs(&broker.capabilities());
                    let _ = broker.close().await;
                    capable
                }
                None => true,
            };
            assert!(
                !capable,
                "{id} was reported not applicable on {}, which declares the capability: {why}",
                harness.name()
            );
        }
        Verdict::Failed(what) => panic!("{id} failed on {}: {what}", harness.name()),
    }
}

/// Panics unless `tested` names every rule of the suite once.
pub fn assert_every_rule(tested: &[&str]) {
    let mut tested: Vec<&str> = tested.to_vec();
    tested.sort_unstable();
    let all: Vec<&str> = RULES.iter().map(|r| r.id).collect();
    assert_eq!(
        tested, all,
        "the tests must cover every rule of the suite, once"
    );
}

/// Counts of a suite run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rules that held.
    pub passed: usize,
    /// Rules the backend declares it cannot honour.
    pub not_applicable: usize,
    /// Rules that did not hold.
    pub failed: usize,
}

/// Runs every rule in order, printing `conformance <backend> <rule> <verdict>`
/// per rule and the summary line, which names the broker's server.
pub async fn run_suite(harness: &dyn Harness) -> Summary {
    let mut summary = Summary::default();
    for rule in RULES {
        let verdict = (rule.run)(harness).await;
        match verdict {
            Verdict::Passed => summary.passed += 1,
            Verdict::NotApplicable(_) => summary.not_applicable += 1,
            Verdict::Failed(_) => summary.failed += 1,
        }
        println!("conformance {} {} {verdict}", harness.name(), rule.id);
    }
    let server = match harness.connect().await {
        Ok(broker) => {
            let described = broker.describe();
            let _ = broker.close().await;
            described
                .split_once(" at ")
                .map_or(described.clone(), |(server, _)| server.to_owned())
        }
        Err(e) => format!("unreachable: {e}"),
    };
    println!(
        "conformance {}: {} passed, {} n/a, {} failed ({server})",
        harness.name(),
        summary.passed,
        summary.not_applicable,
        summary.failed
    );
    summary
}
