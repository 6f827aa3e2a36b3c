//! A TCP proxy that injects the faults that close nothing: flows that go
//! silent (a NAT table or a load balancer forgetting them, a partition),
//! delay, and cuts. Tests connect through it instead of to the broker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ticketrail_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A proxy on a free loopback port forwarding to one broker address.
///
/// Faults:
/// - [`blackhole_existing`](FaultProxy::blackhole_existing): every open
///   flow stops forwarding in both directions and stays open: no FIN, no
///   RST; what either side sends is dropped. New flows work. What a NAT or
///   load balancer that forgot its flows does.
/// - [`blackhole_all`](FaultProxy::blackhole_all): the same for open flows
///   and for every new one, until [`heal`](FaultProxy::heal): a partition.
/// - [`delay`](FaultProxy::delay): each chunk waits this long before it
///   is forwarded.
/// - [`cut`](FaultProxy::cut): every open flow is reset at once.
///
/// A flow once blackholed stays dead after `heal`, as a forgotten NAT entry
/// does; only new flows pass again.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct State {
    /// Flows numbered below this are blackholed.
    dead_below: AtomicU64,
    next_flow: AtomicU64,
    /// New flows are blackholed from the start.
    partitioned: AtomicBool,
    delay_ms: AtomicU64,
    flows: Mutex<Vec<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| {
            Error::new(ErrorKind::Connection, "binding the fault proxy").with_source(e)
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Connection, "the proxy's port").with_source(e))?
            .port();
        let state = Arc::new(State::default());
        let target = target.to_owned();
        let accepting = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = accepting.next_flow.fetch_add(1, Ordering::SeqCst);
                let state = Arc::clone(&accepting);
                let target = target.clone();
                let flow = tokio::spawn(async move {
                    let dead_from_start = state.partitioned.load(Ordering::SeqCst);
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    forward(client, server, number, dead_from_start, state).await;
                });
                let mut flows = accepting.flows.lock().expect("not poisoned");
                flows.retain(|f| !f.is_finished());
                flows.push(flow);
            }
        });
        Ok(FaultProxy {
            port,
            state,
            accept,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every open flow goes silent for good; new flows work.
    pub fn blackhole_existing(&self) {
        let next = self.state.next_flow.load(Ordering::SeqCst);
        self.state.dead_below.store(next, Ordering::SeqCst);
    }

    /// Every open flow and every new one goes silent until [`heal`](Self::heal).
    pub fn blackhole_all(&self) {
        self.state.partitioned.store(true, Ordering::SeqCst);
        self.blackhole_existing();
    }

    /// Each chunk waits `delay` before it is forwarded.
    pub fn delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Resets every open flow.
    pub fn cut(&self) {
        for flow in self.state.flows.lock().expect("not poisoned").drain(..) {
            flow.abort();
        }
    }

    /// New flows pass again, undelayed; flows already silent stay so.
    pub fn heal(&self) {
        self.state.partitioned.store(false, Ordering::SeqCst);
        self.state.delay_ms.store(0, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Forwards both ways until either side closes, the flow is cut, or for
/// ever in silence once the flow is blackholed.
async fn forward(client: TcpStream, server: TcpStream, number: u64, dead: bool, state: Arc<State>) {
    // A cut resets rather than closes: nothing lingers.
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, number, dead, Arc::clone(&state));
    let down = pump(server_read, client_write, number, dead, state);
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    dead_from_start: bool,
    state: Arc<State>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let dead = || dead_from_start || number < state.dead_below.load(Ordering::SeqCst);
    loop {
        let n = match from.read(&mut buffer).await {
            // A silent flow does not pass a close on either: the other
            // side finds out by its own heartbeats, as it would.
            Ok(0) | Err(_) if dead() => std::future::pending().await,
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dead() {
            // Dropped, as a forgotten flow's packets are; the socket stays
            // open, so neither side hears of it.
            continue;
        }
        let delay = state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The first server a broker URL names (`host:port`, the scheme's default
/// port filled in) and the URL that reaches it through a proxy on `port`
/// instead, with `query` added to the URL's own.
///
/// ```
/// use ticketrail_conformance::testing::proxied;
///
/// let (target, url) = proxied("amqp://u:p@a:5672,b:5672/%2f", 7000, "heartbeat=2");
/// assert_eq!(target, "a:5672");
/// assert_eq!(url, "amqp://u:p@127.0.0.1:7000/%2f?heartbeat=2");
/// ```
pub fn proxied(url: &str, port: u16, query: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    let first = hosts.split(',').next().unwrap_or(hosts);
    let default_port = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        _ => 4222,
    };
    let target = if first.contains(':') {
        first.to_owned()
    } else {
        format!("{first}:{default_port}")
    };
    let joiner = match (query.is_empty(), tail.contains('?')) {
        (true, _) => "",
        (false, true) => "&",
        (false, false) => "?",
    };
    (
        target,
        format!("{scheme}://{userinfo}127.0.0.1:{port}{tail}{joiner}{query}"),
    )
}
