//! The conformance suite on the RabbitMQ at `AMQP_URL` (default
//! 127.0.0.1:5672), one test per rule: `cargo test -p
//! ticketrail-conformance rabbitmq_c07` runs exactly C07. C15 restarts a
//! throwaway node of its own. A broker that cannot be reached fails the
//! test, naming the command that starts it.

ticketrail_conformance::rule_tests! {
    harness: ticketrail_conformance::RabbitHarness::from_env(),
    rabbitmq_c01 => "C01",
    rabbitmq_c02 => "C02",
    rabbitmq_c03 => "C03",
    rabbitmq_c04 => "C04",
    rabbitmq_c05 => "C05",
    rabbitmq_c06 => "C06",
    rabbitmq_c07 => "C07",
    rabbitmq_c08 => "C08",
    rabbitmq_c09 => "C09",
    rabbitmq_c10 => "C10",
    rabbitmq_c11 => "C11",
    rabbitmq_c12 => "C12",
    rabbitmq_c13 => "C13",
    rabbitmq_c14 => "C14",
    rabbitmq_c15 => "C15",
    rabbitmq_c16 => "C16",
    rabbitmq_c17 => "C17",
    rabbitmq_c18 => "C18",
    rabbitmq_c19 => "C19",
    rabbitmq_c20 => "C20",
    rabbitmq_c21 => "C21",
    rabbitmq_c22 => "C22",
    rabbitmq_c23 => "C23",
    rabbitmq_c24 => "C24",
}
