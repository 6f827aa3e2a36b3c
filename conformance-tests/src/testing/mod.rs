//! Throwaway brokers and tools for tests: servers a test owns, restarts and
//! removes (C15, clusters), certificates for TLS, and publishers that write
//! what ordinary clients refuse to (the hostile-input battery). They run on
//! free loopback ports with their own data directories; the shared brokers
//! are never touched.

mod certs;
mod clusters;
mod freezer;
mod nats_server;
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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::new(ErrorKind::Connection, "finding a free port").with_source(e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Connection, "finding a free port").with_source(e))?
        .port();
    Ok(port)
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
