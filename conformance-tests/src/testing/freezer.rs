//! A TCP relay in front of a broker that can stop answering: a node that
//! hangs (a long GC pause, a partition that drops packets instead of
//! refusing them) rather than going away. Clients keep their sockets open
//! and hear nothing, which a closed port never shows them.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Relays loopback connections to `upstream` until [`Freezer::freeze`]; then
/// it forwards nothing more either way and holds every socket open.
pub struct Freezer {
    address: SocketAddr,
    frozen: watch::Sender<bool>,
    accepting: JoinHandle<()>,
}

impl Freezer {
    /// Starts relaying from a free loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Freezer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (frozen, watching) = watch::channel(false);
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(relay(client_read, server_write, watching.clone()));
                tokio::spawn(relay(server_read, client_write, watching.clone()));
            }
        });
        Ok(Freezer {
            address,
            frozen,
            accepting,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// From now on nothing is forwarded, and nothing is closed.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Copies one direction until frozen, then holds both halves until the
/// relay goes; a side that closes ends it.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    while !*frozen.borrow() {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                // Read after the freeze: not forwarded.
                Ok(_) if *frozen.borrow() => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = frozen.changed() => {}
        }
    }
    // Frozen: the sockets stay open, silent, until the Freezer goes.
    while frozen.changed().await.is_ok() {}
    drop((from, to));
}
