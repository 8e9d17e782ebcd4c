//! Throwaway etcd servers: one member, or a cluster of three.

use std::ffi::OsString;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::ConnectOptions;

use super::builder::Security;

/// How long a fresh etcd may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The prefix of every data dir, followed by `$TLL_TEST_RUN-` when that is
/// set, so that a test run can tell its own servers from others'.
pub const DATA_DIR_PREFIX: &str = "tll-etcd-";

/// When set, each running member has a file `etcd-<pid>` in this directory
/// (removed when it is killed), so a test runner can stop what a crashed
/// test left behind by pid.
const PID_DIR_VAR: &str = "TLL_TEST_PID_DIR";

/// One etcd member process.
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client_url: String,
    peer_url: String,
    initial_cluster: String,
    data_dir: PathBuf,
    child: Option<Child>,
    paused: AtomicBool,
    /// TLS and auth flags.
    extra_args: Vec<OsString>,
    /// Where `/metrics` is served, when not at the client URL (TLS).
    metrics_url: Option<String>,
}

/// A single-member etcd for one test.
#[derive(Debug)]
pub struct EtcdServer {
    member: EtcdMember,
    security: Security,
    _dir: tempfile::TempDir,
}

/// A three-member etcd cluster for fault tests.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

fn etcd_bin() -> String {
    std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".to_string())
}

/// A loopback port nobody listens on right now, below the kernel's
/// ephemeral range (32768 and up on Linux): a port the kernel hands out
/// itself could be taken as the source port of some outgoing connection
/// before the server that is to listen on it binds it.
pub fn free_port() -> io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How often a server whose start failed (a port taken meanwhile, say) is
/// tried again, on fresh ports.
const START_ATTEMPTS: usize = 3;

impl EtcdMember {
    fn new(name: &str, data_dir: &Path, initial_cluster: String, ports: (u16, u16)) -> Self {
        Self {
            name: name.to_string(),
            client_url: format!("http://127.0.0.1:{}", ports.0),
            peer_url: format!("http://127.0.0.1:{}", ports.1),
            initial_cluster,
            data_dir: data_dir.join(name),
            child: None,
            paused: AtomicBool::new(false),
            extra_args: Vec::new(),
            metrics_url: None,
        }
    }

    /// Serves clients as `security` says (`https` with TLS, metrics then
    /// on `metrics_port` in plain HTTP).
    fn secure(&mut self, security: &Security, dir: &Path, metrics_port: u16) -> io::Result<()> {
        let metrics_url = format!("http://127.0.0.1:{metrics_port}");
        self.extra_args = security.args(dir, &metrics_url)?;
        if security.https() {
            self.client_url = self.client_url.replacen("http://", "https://", 1);
            self.metrics_url = Some(metrics_url);
        }
        Ok(())
    }

    fn spawn(&mut self) -> io::Result<()> {
        let state = if self.data_dir.join("member").exists() {
            "existing"
        } else {
            "new"
        };
        let child = Command::new(etcd_bin())
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "tower-lease-lock-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "error"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start etcd ({}): {e}; install etcd-server",
                        etcd_bin()
                    ),
                )
            })?;
        if let Some(dir) = std::env::var_os(PID_DIR_VAR) {
            let _ = std::fs::write(
                Path::new(&dir).join(format!("etcd-{}", child.id())),
                self.data_dir.to_string_lossy().as_bytes(),
            );
        }
        self.child = Some(child);
        self.paused.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn endpoint(&self) -> &str {
        &self.client_url
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the member at once (SIGKILL) and reaps it. A paused member dies
    /// without running again: it is not thawed first, so it cannot act on
    /// what it missed (a leader paused past a lease's TTL would revoke it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.paused.store(false, Ordering::Relaxed);
            let _ = child.kill();
            let _ = child.wait();
            if let Some(dir) = std::env::var_os(PID_DIR_VAR) {
                let _ = std::fs::remove_file(Path::new(&dir).join(format!("etcd-{}", child.id())));
            }
        }
    }

    /// Freezes the member (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            let _ = super::signal(pid, "STOP");
            self.paused.store(true, Ordering::Relaxed);
        }
    }

    /// Thaws a paused member (SIGCONT).
    ///
    /// On etcd before the fix of etcd-io/etcd#12528 (pull request 16822, 2023;
    /// Debian's 3.4.23 predates it), a leader paused longer than a lease's TTL
    /// may revoke that lease when it is thawed, though the lease was renewed
    /// through the new leader all along. Where a test pauses a member that
    /// may lead for that long, [`restart`](Self::restart) it instead.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            let _ = super::signal(pid, "CONT");
            self.paused.store(false, Ordering::Relaxed);
        }
    }

    /// The value of a metric on the member's `/metrics` page (the sum over
    /// its label sets), or `None` when the page does not have it. For
    /// example `etcd_debugging_mvcc_watcher_total`, the watchers the member
    /// serves right now.
    pub async fn metric(&self, name: &str) -> io::Result<Option<f64>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = self.metrics_url.as_ref().unwrap_or(&self.client_url);
        let address = url.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut page = String::new();
        stream.read_to_string(&mut page).await?;
        let mut found = None;
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let metric = series.split('{').next().unwrap_or(series);
            if metric == name {
                let value: f64 = value.trim().parse().unwrap_or(0.0);
                *found.get_or_insert(0.0) += value;
            }
        }
        Ok(found)
    }

    /// Starts the member again on the same ports and data dir.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the members answer a client with `options`; fails at once
/// when one of them exited (it could not bind its ports, say).
async fn wait_ready(members: &mut [EtcdMember], options: &ConnectOptions) -> io::Result<()> {
    let endpoints: Vec<String> = members.iter().map(|m| m.client_url.clone()).collect();
    let started = Instant::now();
    let mut last_error = String::new();
    while started.elapsed() < START_TIMEOUT {
        for member in members.iter_mut() {
            let exited = member
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                member.kill(); // reaps it and forgets its pid
                return Err(io::Error::other(format!(
                    "etcd member {} exited at start ({status})",
                    member.name
                )));
            }
        }
        let options = options
            .clone()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2));
        match etcd_client::Client::connect(&endpoints, Some(options)).await {
            Ok(mut client) => match client.get("tll-ready-probe", None).await {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("etcd did not answer within {START_TIMEOUT:?}: {last_error}"),
    ))
}

fn temp_dir() -> io::Result<tempfile::TempDir> {
    let prefix = match std::env::var("TLL_TEST_RUN") {
        Ok(run) if !run.is_empty() => format!("{DATA_DIR_PREFIX}{run}-"),
        _ => DATA_DIR_PREFIX.to_string(),
    };
    tempfile::Builder::new().prefix(&prefix).tempdir()
}

impl EtcdServer {
    /// Starts a single member on free ports and waits until it answers.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(Security::default()).await
    }

    /// Starts a single member set up as `security` says.
    pub(super) async fn start_with(security: Security) -> io::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::try_start(&security).await {
                Err(err) if attempt < START_ATTEMPTS => {
                    eprintln!("etcd did not start ({err}); trying again on other ports");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_start(security: &Security) -> io::Result<Self> {
        let dir = temp_dir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let mut member = EtcdMember::new(
            "n1",
            dir.path(),
            format!("n1=http://127.0.0.1:{peer}"),
            (client, peer),
        );
        member.secure(security, dir.path(), free_port()?)?;
        member.spawn()?;
        let members = std::slice::from_mut(&mut member);
        wait_ready(members, &security.apply(ConnectOptions::new(), false)).await?;
        let mut server = Self {
            member,
            security: security.clone(),
            _dir: dir,
        };
        if security.enable_auth(&server.endpoints()).await? {
            server.wait_ready().await?; // as root
        }
        Ok(server)
    }

    pub(super) fn security(&self) -> &Security {
        &self.security
    }

    async fn wait_ready(&mut self) -> io::Result<()> {
        let options = self.security.apply(ConnectOptions::new(), true);
        wait_ready(std::slice::from_mut(&mut self.member), &options).await
    }

    /// The client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.member.client_url.clone()]
    }

    /// A new client connected to this server, with
    /// [`connect_options`](Self::connect_options) for a 2 s request timeout
    /// (as root, with auth).
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = self.connect_options(Duration::from_secs(2));
        etcd_client::Client::connect(self.endpoints(), Some(options)).await
    }

    /// The member process, to kill, pause or restart it.
    pub fn member(&mut self) -> &mut EtcdMember {
        &mut self.member
    }

    /// The member process, to pause or resume it or read its metrics.
    pub fn member_ref(&self) -> &EtcdMember {
        &self.member
    }

    /// Restarts the server and waits until it answers again.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.member.restart()?;
        self.wait_ready().await
    }
}

impl EtcdCluster {
    /// Starts three members on free ports and waits until the cluster answers.
    pub async fn start() -> io::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::try_start().await {
                Err(err) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "the etcd cluster did not start ({err}); trying again on other ports"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_start() -> io::Result<Self> {
        let dir = temp_dir()?;
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push((free_port()?, free_port()?));
        }
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("n{}=http://127.0.0.1:{peer}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let mut member =
                EtcdMember::new(&format!("n{}", i + 1), dir.path(), initial.clone(), *p);
            member.spawn()?;
            members.push(member);
        }
        let mut cluster = Self { members, _dir: dir };
        wait_ready(&mut cluster.members, &ConnectOptions::new()).await?;
        Ok(cluster)
    }

    /// The client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// A new client connected to every member.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        connect(&self.endpoints()).await
    }

    /// Member `i` (0, 1 or 2).
    pub fn member(&mut self, i: usize) -> Option<&mut EtcdMember> {
        self.members.get_mut(i)
    }

    /// Restarts member `i` (on the same ports and data dir) and waits until
    /// that member itself answers, so that another can be stopped next
    /// with a quorum up. Also the way to bring back a paused member that may
    /// have led: see [`EtcdMember::resume`].
    pub async fn restart_member(&mut self, i: usize) -> io::Result<()> {
        let member = self
            .members
            .get_mut(i..=i)
            .ok_or_else(|| io::Error::other(format!("no member {i}")))?;
        member[0].restart()?;
        wait_ready(member, &ConnectOptions::new()).await
    }

    /// Waits until the cluster answers (after members were restarted).
    pub async fn wait_ready(&mut self) -> io::Result<()> {
        wait_ready(&mut self.members, &ConnectOptions::new()).await
    }

    /// Every member (to pause or resume them through a shared reference).
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }
}

/// The client every helper here hands out: [`connect_options`] for a 2 s
/// request timeout.
///
/// [`connect_options`]: crate::etcd::connect_options
async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = crate::etcd::connect_options(Duration::from_secs(2));
    etcd_client::Client::connect(endpoints, Some(options)).await
}
