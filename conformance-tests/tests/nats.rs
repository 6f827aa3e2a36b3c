//! The conformance suite on the NATS server at `NATS_URL` (default
//! 127.0.0.1:4222), one test per rule: `cargo test -p
//! ticketrail-conformance nats_c13` runs exactly C13. C15 restarts a
//! throwaway server of its own (`NATS_SERVER_BIN`, default `nats-server`).

ticketrail_conformance::rule_tests! {
    harness: ticketrail_conformance::NatsHarness::from_env(),
    nats_c01 => "C01",
    nats_c02 => "C02",
    nats_c03 => "C03",
    nats_c04 => "C04",
    nats_c05 => "C05",
    nats_c06 => "C06",
    nats_c07 => "C07",
    nats_c08 => "C08",
    nats_c09 => "C09",
    nats_c10 => "C10",
    nats_c11 => "C11",
    nats_c12 => "C12",
    nats_c13 => "C13",
    nats_c14 => "C14",
    nats_c15 => "C15",
    nats_c16 => "C16",
    nats_c17 => "C17",
    nats_c18 => "C18",
    nats_c19 => "C19",
    nats_c20 => "C20",
    nats_c21 => "C21",
    nats_c22 => "C22",
    nats_c23 => "C23",
    nats_c24 => "C24",
}
