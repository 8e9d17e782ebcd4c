//! What [`Azurite`](super::Azurite) and [`Dynalite`](super::Dynalite) share:
//! finding the emulator's program, running it as a child process that is
//! killed by pid on drop (with a pid file for the test runner), and waiting
//! for the line it prints once it listens.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long an emulator may take to print that it listens (Azurite needs
/// 1-2 s on a 2-core machine, dynalite a quarter of a second).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the first request may take once the emulator said it listens.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many attempts on fresh ports, when the port picked was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// Where `scripts/ensure-emulators.sh` installs the emulators (npm ci in
/// `.emulators/` of this repository).
const LOCAL_BIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.emulators/node_modules/.bin");

/// The same variable as the etcd members': each running emulator has a file
/// `<kind>-<pid>` there while it runs.
const PID_DIR_VAR: &str = "TLL_TEST_PID_DIR";

/// How many lines of the emulator's stderr an error message quotes.
const STDERR_LINES: usize = 20;

/// One emulator, described for [`EmulatorProcess::start`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Emulator {
    /// `azurite` or `dynalite`: logs, errors and the pid file's name.
    pub(super) kind: &'static str,
    /// The variable naming the program, e.g. `TLL_AZURITE_BIN`.
    pub(super) bin_var: &'static str,
    /// The program's name in `node_modules/.bin` and on `PATH`.
    pub(super) bin_name: &'static str,
    /// What to install, for the error when the program is missing.
    pub(super) npm_package: &'static str,
    /// The start of the stdout line printed once the port is open.
    pub(super) ready_line: &'static str,
}

impl Emulator {
    /// The program: `$<bin_var>` when set, else the one in this repository's
    /// `.emulators/` when installed there, else `<bin_name>` from `PATH`.
    pub(super) fn program(&self) -> PathBuf {
        if let Some(path) = std::env::var_os(self.bin_var).filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
        let local = Path::new(LOCAL_BIN_DIR).join(self.bin_name);
        if local.exists() {
            return local;
        }
        PathBuf::from(self.bin_name)
    }

    fn not_found(&self, program: &Path, err: &io::Error) -> io::Error {
        io::Error::new(
            err.kind(),
            format!(
                "cannot start {} ({}): {err}; install it with scripts/ensure-emulators.sh \
                 (in this repository), or `npm install {}` and set {} to its \
                 node_modules/.bin/{}",
                self.kind,
                program.display(),
                self.npm_package,
                self.bin_var,
                self.bin_name,
            ),
        )
    }
}

/// A running emulator, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub(super) struct EmulatorProcess {
    kind: &'static str,
    child: Option<Child>,
    pid_file: Option<PathBuf>,
}

impl EmulatorProcess {
    /// Starts `emulator` on a free loopback port, with the arguments
    /// `args(port)`; tries again on another port when the one picked was
    /// taken meanwhile. Returns the process and its port.
    pub(super) async fn start_on_free_port(
        emulator: &Emulator,
        args: impl Fn(&str) -> Vec<OsString>,
    ) -> io::Result<(Self, u16)> {
        let mut attempt = 1;
        loop {
            let port = super::free_port()?;
            match Self::start(emulator, &args(&port.to_string()), port).await {
                Ok(process) => return Ok((process, port)),
                Err(err) if attempt < START_ATTEMPTS => {
                    tracing::warn!(
                        "{} did not start ({err}); trying again on another port",
                        emulator.kind
                    );
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Starts `emulator` with `args` and waits until it printed its ready
    /// line and answered one HTTP request on `port`.
    pub(super) async fn start(
        emulator: &Emulator,
        args: &[OsString],
        port: u16,
    ) -> io::Result<Self> {
        let program = emulator.program();
        let mut child = Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| emulator.not_found(&program, &e))?;
        let pid_file = std::env::var_os(PID_DIR_VAR).map(|dir| {
            let file = Path::new(&dir).join(format!("{}-{}", emulator.kind, child.id()));
            let _ = std::fs::write(&file, format!("{} port {port}\n", program.display()));
            file
        });
        let ready = child.stdout.take().map(|out| watch_stdout(emulator, out));
        let stderr = child
            .stderr
            .take()
            .map(|err| keep_stderr(emulator.kind, err));
        let mut process = Self {
            kind: emulator.kind,
            child: Some(child),
            pid_file,
        };
        // The ready line is the event to wait for; stdout closing first
        // means the emulator exited (a port taken meanwhile, say).
        let printed = match ready {
            Some(ready) => tokio::time::timeout(START_TIMEOUT, ready).await,
            None => Ok(Err(Closed)),
        };
        let failure = match printed {
            Ok(Ok(())) => match probe(port).await {
                Ok(()) => return Ok(process),
                Err(e) => format!("it printed that it listens, but {e}"),
            },
            Ok(Err(Closed)) => match process.child.as_mut().map(Child::wait) {
                Some(Ok(status)) => format!("it exited at start ({status})"),
                _ => "it closed its stdout at start".to_string(),
            },
            Err(_elapsed) => format!("it did not print that it listens within {START_TIMEOUT:?}"),
        };
        process.kill();
        let stderr = stderr.map(|lines| tail(&lines)).unwrap_or_default();
        Err(io::Error::other(format!(
            "{} ({}) on port {port}: {failure}{}",
            emulator.kind,
            program.display(),
            if stderr.is_empty() {
                String::new()
            } else {
                format!("; its stderr:\n{stderr}")
            }
        )))
    }

    /// The process id, while running.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the emulator (SIGSTOP): it keeps its sockets but answers
    /// nothing until [`resume`](Self::resume).
    pub(super) fn pause(&self) -> io::Result<()> {
        super::signal(self.running()?, "STOP")
    }

    /// Thaws a paused emulator (SIGCONT).
    pub(super) fn resume(&self) -> io::Result<()> {
        super::signal(self.running()?, "CONT")
    }

    fn running(&self) -> io::Result<u32> {
        self.pid()
            .ok_or_else(|| io::Error::other(format!("{} is not running", self.kind)))
    }

    /// Kills the emulator at once (SIGKILL), reaps it and removes its pid file.
    pub(super) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            tracing::debug!(kind = self.kind, pid = child.id(), "emulator stopped");
        }
        if let Some(file) = self.pid_file.take() {
            let _ = std::fs::remove_file(file);
        }
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the emulator's stdout on a thread of its own to the end: the
/// returned receiver completes when the ready line comes (or fails when
/// stdout closes first); every line is logged at DEBUG.
fn watch_stdout(
    emulator: &Emulator,
    stdout: impl Read + Send + 'static,
) -> impl std::future::Future<Output = Result<(), Closed>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (kind, ready_line) = (emulator.kind, emulator.ready_line);
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            tracing::debug!(kind, "{line}");
            if line.starts_with(ready_line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    async move { rx.await.map_err(|_| Closed) }
}

/// The emulator closed its stdout before it printed its ready line.
#[derive(Debug)]
struct Closed;

/// Reads the emulator's stderr on a thread of its own to the end, keeping
/// the last lines for an error message; every line is logged at DEBUG.
fn keep_stderr(
    kind: &'static str,
    stderr: impl Read + Send + 'static,
) -> Arc<Mutex<VecDeque<String>>> {
    let lines = Arc::new(Mutex::new(VecDeque::new()));
    let kept = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            tracing::debug!(kind, stderr = true, "{line}");
            if let Ok(mut kept) = kept.lock() {
                if kept.len() == STDERR_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        }
    });
    lines
}

fn tail(lines: &Mutex<VecDeque<String>>) -> String {
    // The reader thread may still be at the last lines: they are what the
    // emulator printed before it was killed, or nothing more.
    lines
        .lock()
        .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// One `GET /` on `127.0.0.1:port`: any HTTP answer will do.
async fn probe(port: u16) -> io::Result<()> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request =
            format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        if head.starts_with(b"HTTP/1.") {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "its answer to GET / is not HTTP: {:?}",
                String::from_utf8_lossy(&head)
            )))
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, request).await {
        Ok(result) => result.map_err(|e| io::Error::new(e.kind(), format!("GET / failed: {e}"))),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("GET / got no answer within {PROBE_TIMEOUT:?}"),
        )),
    }
}
