//! [`TcpProxy`]: a loopback TCP proxy that can pass, blackhole or cut traffic.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What a [`TcpProxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Forwards every byte both ways.
    Pass,
    /// Forwards nothing and answers nothing: connections stay open, bytes
    /// are held (as a network that drops packets makes TCP hold them), new
    /// connections are accepted and held. Nothing is reset.
    Blackhole,
}

/// A proxy between clients and one TCP server on loopback, run by tasks of
/// the current runtime and stopped when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    listen: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    connections: Mutex<JoinSet<()>>,
    accepted: AtomicU64,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `127.0.0.1:2379` from `http://127.0.0.1:2379` (or the address itself).
fn parse_target(target: &str) -> io::Result<SocketAddr> {
    let bare = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target)
        .trim_end_matches('/');
    bare.parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("proxy target {target:?} is not an ip:port address: {e}"),
        )
    })
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port in front of `target` (an
    /// `ip:port`, or a URL such as `http://127.0.0.1:2379`), passing traffic.
    pub async fn start(target: &str) -> io::Result<Self> {
        let target = parse_target(target)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            mode: watch::channel(ProxyMode::Pass).0,
            connections: Mutex::new(JoinSet::new()),
            accepted: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            listen,
            shared,
            accept,
        })
    }

    /// The proxy's address as an etcd endpoint: `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// What the proxy does now.
    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode.borrow()
    }

    /// How many client connections the proxy accepted so far. An HTTP/1
    /// client opens one for each request it has in flight beyond its idle
    /// ones, so a test can bound a client's concurrency with it.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops forwarding, silently (see [`ProxyMode::Blackhole`]).
    pub fn blackhole(&self) {
        self.shared.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Forwards again; bytes held meanwhile go through.
    pub fn pass(&self) {
        self.shared.mode.send_replace(ProxyMode::Pass);
    }

    /// Closes every connection open right now (both sides see them end).
    /// New connections are handled by the current mode.
    pub fn cut(&self) {
        self.shared.connections().abort_all();
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.connections().abort_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let connection = relay(client, Arc::clone(&shared));
        let mut connections = shared.connections();
        // Reap the finished ones as we go.
        while connections.try_join_next().is_some() {}
        connections.spawn(connection);
    }
}

/// One client connection: held until traffic passes, then joined to a fresh
/// connection to the target, both directions pumped until either side ends.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    if mode.wait_for(|m| *m == ProxyMode::Pass).await.is_err() {
        return;
    }
    let Ok(server) = TcpStream::connect(shared.target).await else {
        return; // the client sees its connection close
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    let up = pump(client_rx, server_tx, shared.mode.subscribe());
    let down = pump(server_rx, client_tx, shared.mode.subscribe());
    // When one direction ends, the connection is over.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Held here while blackholed.
        if mode.wait_for(|m| *m == ProxyMode::Pass).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
