//! The whole conformance suite on the in-process broker, one test per rule.
//! Every rule must pass except C15 (no broker process to restart), which
//! must be reported not applicable.

use ticketrail_conformance::{run_rule, MemoryHarness, Verdict};

macro_rules! rules {
    ($($test:ident => $id:literal),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let verdict = run_rule(&MemoryHarness::default(), $id).await.expect("known rule");
            if $id == "C15" {
                assert!(matches!(verdict, Verdict::NotApplicable(_)), "{} should be n/a on memory: {verdict}", $id);
            } else {
                assert_eq!(verdict, Verdict::Passed, "{}", $id);
            }
        }
    )*};
}

rules! {
    c01_confirmed_publish => "C01",
    c02_round_trip => "C02",
    c03_ack_is_final => "C03",
    c04_at_least_once => "C04",
    c05_prefetch => "C05",
    c06_competing_consumers => "C06",
    c07_delayed_retry => "C07",
    c08_exhaustion => "C08",
    c09_no_pointless_retries => "C09",
    c10_dead_letter_record => "C10",
    c11_dlq_operations => "C11",
    c12_crash_safe_backoff => "C12",
    c13_crash_loops_end => "C13",
    c14_graceful_shutdown => "C14",
    c15_reconnect => "C15",
    c16_topic_routing => "C16",
    c17_foreign_messages => "C17",
}

#[test]
fn every_rule_has_a_test_here() {
    assert_eq!(ticketrail_conformance::RULES.len(), 17);
}
