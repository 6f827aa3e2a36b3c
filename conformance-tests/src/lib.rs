//! # ticketrail-conformance
//!
//! The behaviour suite of ticketrail: one async function per rule of the
//! contract (C1..C17 in DESIGN.md), run against any backend through a
//! [`Harness`]. The binary prints one line per rule:
//!
//! ```text
//! cargo run -p ticketrail-conformance -- memory
//! conformance memory C01 passed
//! ...
//! conformance memory C15 n/a (the backend cannot reconnect: ...)
//! conformance memory: 16 passed, 1 n/a, 0 failed (the in-process memory broker)
//! ```
//!
//! `cargo test -p ticketrail-conformance rabbitmq_c07` runs one rule on one
//! backend: every backend's test file has one test per rule, made by
//! [`rule_tests!`]. Every rule uses fresh, unique names and deletes what it
//! declared.
//!
//! [`testing`] has the throwaway servers, certificates and raw publishers
//! the tests use; a new backend's tests use them too.

mod clusters;
mod drill;
mod effects;
mod harness;
mod memory;
mod nats;
mod rabbitmq;
pub mod rules;
mod scheduled_drill;
mod support;
pub mod testing;

pub use clusters::{NatsClusterHarness, RabbitClusterHarness};
pub use drill::{run_drill, run_drill_with, DrillReport};
pub use effects::{run_effects_drill, run_node, EffectsReport};
pub use harness::{harness_for, harness_for_url, Foreign, Harness, Restartable, Verdict};
pub use memory::MemoryHarness;
pub use nats::{NatsHarness, DEFAULT_NATS_URL};
pub use rabbitmq::{RabbitHarness, DEFAULT_AMQP_URL};
pub use rules::{
    assert_every_rule, assert_rule, run_rule, run_suite, Rule, Summary, DATABASE_RULES,
    RESTART_RULES, RULES,
};
pub use scheduled_drill::{run_scheduled_drill, ScheduledReport};

/// One test per rule on one backend, named as given, and a test that fails
/// if a rule of the suite has none:
///
/// ```ignore
/// ticketrail_conformance::rule_tests! {
///     harness: ticketrail_conformance::RabbitHarness::from_env(),
///     rabbitmq_c01 => "C01",
///     // ... one line per rule
/// }
/// ```
#[macro_export]
macro_rules! rule_tests {
    (harness: $harness:expr, $($test:ident => $id:literal),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let harness = $harness;
                $crate::assert_rule(&harness, $id).await;
            }
        )*

        #[test]
        fn every_rule_has_a_test() {
            $crate::assert_every_rule(&[$($id),*]);
        }
    };
}
