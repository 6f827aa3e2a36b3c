//! One async function per rule of the contract, and the runner.

use std::future::Future;
use std::pin::Pin;

use crate::harness::{Harness, Verdict};
use crate::support::Check;

mod dead_letters;
mod deliveries;
mod lifecycle;
mod publishing;
mod retries;

type RuleFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// One rule of the contract.
#[derive(Clone, Copy)]
pub struct Rule {
    /// `C01`..`C17`.
    pub id: &'static str,
    /// The rule's name in DESIGN.md.
    pub name: &'static str,
    /// Runs the rule against a backend.
    pub run: for<'a> fn(&'a dyn Harness) -> RuleFuture<'a>,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.id, self.name)
    }
}

macro_rules! rule {
    ($id:literal, $name:literal, $f:path) => {
        Rule {
            id: $id,
            name: $name,
            run: |h| Box::pin(async move { verdict($f(h).await) }),
        }
    };
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

/// Every rule, in order.
pub const RULES: [Rule; 17] = [
    rule!(
        "C01",
        "confirmed publish",
        publishing::c01_confirmed_publish
    ),
    rule!("C02", "round trip", publishing::c02_round_trip),
    rule!("C03", "ack is final", deliveries::c03_ack_is_final),
    rule!("C04", "at least once", deliveries::c04_at_least_once),
    rule!("C05", "prefetch", deliveries::c05_prefetch),
    rule!(
        "C06",
        "competing consumers",
        deliveries::c06_competing_consumers
    ),
    rule!("C07", "delayed retry", retries::c07_delayed_retry),
    rule!("C08", "exhaustion", retries::c08_exhaustion),
    rule!(
        "C09",
        "no pointless retries",
        retries::c09_no_pointless_retries
    ),
    rule!(
        "C10",
        "dead-letter record",
        dead_letters::c10_dead_letter_record
    ),
    rule!("C11", "DLQ operations", dead_letters::c11_dlq_operations),
    rule!("C12", "crash-safe backoff", retries::c12_crash_safe_backoff),
    rule!("C13", "crash loops end", retries::c13_crash_loops_end),
    rule!("C14", "graceful shutdown", lifecycle::c14_graceful_shutdown),
    rule!("C15", "reconnect", lifecycle::c15_reconnect),
    rule!("C16", "topic routing", publishing::c16_topic_routing),
    rule!("C17", "foreign messages", publishing::c17_foreign_messages),
];

/// Runs one rule by id (`C07` or `c07`).
pub async fn run_rule(harness: &dyn Harness, id: &str) -> Option<Verdict> {
    let rule = RULES.iter().find(|r| r.id.eq_ignore_ascii_case(id))?;
    Some((rule.run)(harness).await)
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
/// per rule and the summary line.
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
    println!(
        "conformance {}: {} passed, {} n/a, {} failed",
        harness.name(),
        summary.passed,
        summary.not_applicable,
        summary.failed
    );
    summary
}
