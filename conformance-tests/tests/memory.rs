//! The conformance suite on the in-process broker, one test per rule:
//! `cargo test -p ticketrail-conformance memory_c12` runs exactly C12.
//! C15 must be reported not applicable (no broker process to restart).

ticketrail_conformance::rule_tests! {
    harness: ticketrail_conformance::MemoryHarness::default(),
    memory_c01 => "C01",
    memory_c02 => "C02",
    memory_c03 => "C03",
    memory_c04 => "C04",
    memory_c05 => "C05",
    memory_c06 => "C06",
    memory_c07 => "C07",
    memory_c08 => "C08",
    memory_c09 => "C09",
    memory_c10 => "C10",
    memory_c11 => "C11",
    memory_c12 => "C12",
    memory_c13 => "C13",
    memory_c14 => "C14",
    memory_c15 => "C15",
    memory_c16 => "C16",
    memory_c17 => "C17",
    memory_c18 => "C18",
    memory_c19 => "C19",
    memory_c20 => "C20",
    memory_c21 => "C21",
    memory_c22 => "C22",
    memory_c23 => "C23",
    memory_c24 => "C24",
}
