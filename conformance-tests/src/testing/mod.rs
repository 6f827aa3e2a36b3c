//! Throwaway brokers and tools for tests: servers a test owns, restarts and
//! removes (C15, clusters), certificates for TLS, and publishers that write
//! what ordinary clients refuse to (the hostile-input battery). They run on
//! free loopback ports with their own data directories; the shared brokers
//! are never touched.

mod certs;
mod clusters;
mod freezer;
mod nats_server;
mod postgres;
mod postgres_server;
mod proxy;
mod rabbit_node;
mod raw;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use ticketrail_core::{Error, ErrorKind, Result, SharedBroker};

use crate::harness::Restartable;

pub use certs::TestCerts;
pub use clusters::{nats_server_215_binary, NatsCluster, RabbitCluster};
pub use freezer::Freezer;
pub use nats_server::{nats_server_binary, NatsServer};
pub use postgres::{database_url, TestDatabase, DEFAULT_DATABASE_URL};
pub use postgres_server::PostgresServer;
pub use proxy::{proxied, FaultProxy};
pub use rabbit_node::RabbitNode;
pub use raw::{raw_amqp, raw_nats_publish};

/// A broker server process a test owns.
#[async_trait]
pub trait ServerProcess: Send + Sync {
    /// The URL clients connect to.
    fn url(&self) -> String;
    /// Starts the server (again, with its data).
    async fn launch(&mut self) -> Result<()>;
    /// Stops the server, keeping its data.
    async fn halt(&mut self) -> Result<()>;
    /// Stops the server for good and removes its data.
    async fn remove(&mut self) -> Result<()>;
}

/// Connects a broker client to a URL.
pub type Connector = for<'a> fn(&'a str) -> BoxFuture<'a, Result<SharedBroker>>;

/// A throwaway server and how to connect to it: what C15 restarts.
pub struct Throwaway<S> {
    server: tokio::sync::Mutex<S>,
    url: String,
    connect: Connector,
}

impl<S: ServerProcess> Throwaway<S> {
    /// `server`, connected to with `connect`.
    pub fn new(server: S, connect: Connector) -> Self {
        Throwaway {
            url: server.url(),
            server: tokio::sync::Mutex::new(server),
            connect,
        }
    }
}

#[async_trait]
impl<S: ServerProcess> Restartable for Throwaway<S> {
    async fn connect(&self) -> Result<SharedBroker> {
        (self.connect)(&self.url).await
    }

    fn url(&self) -> Option<String> {
        Some(self.url.clone())
    }

    async fn halt(&self, _queue: &str) -> Result<()> {
        self.server.lock().await.halt().await
    }

    async fn resume(&self) -> Result<()> {
        self.server.lock().await.launch().await
    }

    async fn remove(&self) -> Result<()> {
        self.server.lock().await.remove().await
    }
}

/// A free TCP port on 127.0.0.1, never one this process was given before.
///
/// The port is free when chosen, not when the server binds it: tests that
/// start servers side by side could otherwise be handed the same port, and
/// one would talk to the other's server. Servers that can say who they are
/// are checked once up, too (see [`wait_for_nats`]).
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let finding = |e| Error::new(ErrorKind::Connection, "finding a free port").with_source(e);
    // Holding every listener until one is new keeps the kernel from
    // offering the same old port again.
    let mut held = Vec::new();
    for _ in 0..64 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(finding)?;
        let port = listener.local_addr().map_err(finding)?.port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
        held.push(listener);
    }
    Err(Error::new(
        ErrorKind::Connection,
        "finding a free port: 64 in a row had been handed out before",
    ))
}

/// Waits until something accepts connections on `port`.
pub async fn wait_for_port(port: u16, within: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("{what} did not accept connections on 127.0.0.1:{port} within {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the nats-server named `name` accepts connections on `port`.
/// Every NATS server introduces itself with an `INFO` line, which names it:
/// another server answering there (it took the port after it was chosen)
/// is `Ok(false)`, not a stranger the test goes on talking to.
pub async fn wait_for_nats(port: u16, name: &str, within: Duration, what: &str) -> Result<bool> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = nats_server_name(port).await {
            return Ok(found == name);
        }
        if Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("{what} did not introduce itself on 127.0.0.1:{port} within {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `server_name` of the `INFO` line the NATS server on `port` sends
/// first; `None` if nothing there speaks NATS (yet).
async fn nats_server_name(port: u16) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    let read = reader.read_line(&mut line);
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()?
        .ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
    Some(info.get("server_name")?.as_str()?.to_owned())
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::new(ErrorKind::Connection, what.to_owned()).with_source(e)
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}
