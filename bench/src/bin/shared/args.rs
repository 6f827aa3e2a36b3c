//! The arguments the small bench programs (`effects`, `flow`, `outage`)
//! share: a broker by name, then numbers with defaults.

/// What a bench program's `main` returns.
pub(crate) type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The command line after the program's name: the broker first, then
/// numbers in order.
pub(crate) struct Args(std::iter::Skip<std::env::Args>);

impl Args {
    pub(crate) fn new() -> Self {
        Args(std::env::args().skip(1))
    }

    /// The broker named first (default `memory`) and its URL: `memory://`,
    /// `AMQP_URL` or `NATS_URL`, or the local default.
    pub(crate) fn broker(&mut self) -> BenchResult<(String, String)> {
        let name = self.0.next().unwrap_or_else(|| "memory".to_owned());
        let url = match name.as_str() {
            "memory" => "memory://".to_owned(),
            "rabbitmq" => std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            "nats" => {
                std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
            }
            other => return Err(format!("no broker `{other}` (memory, rabbitmq, nats)").into()),
        };
        Ok((name, url))
    }

    /// The next number, or `default`.
    pub(crate) fn number<T: std::str::FromStr>(&mut self, default: T) -> BenchResult<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(self
            .0
            .next()
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    }
}
