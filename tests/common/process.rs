//! Child processes for tests: stdout lines on a channel with their arrival
//! times, stderr kept for the failure report, stopped and reaped on every path.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// How long a process may take to exit after SIGTERM before it is killed.
pub const STOP_LIMIT: Duration = Duration::from_secs(10);

/// A child process. Dropping it sends SIGTERM, then SIGKILL if it does not
/// exit within [`STOP_LIMIT`], and reaps it.
pub struct Proc {
    what: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(what: &str, command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("piped stderr");
        let kept = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line);
            }
        });
        Self {
            what: what.to_string(),
            child,
            lines,
            stderr,
        }
    }

    /// The next stdout line and when it arrived; `None` once stdout closed.
    /// Panics after `limit`.
    pub async fn next_line_at(&mut self, limit: Duration) -> Option<(Instant, String)> {
        tokio::time::timeout(limit, self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: no output within {limit:?}", self.what))
    }

    /// The next stdout line; `None` once stdout closed. Panics after `limit`.
    pub async fn next_line(&mut self, limit: Duration) -> Option<String> {
        self.next_line_at(limit).await.map(|(_, line)| line)
    }

    /// What the process is, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// `true` when a stdout line is waiting (without waiting for one).
    pub fn has_output(&mut self) -> bool {
        !self.lines.is_empty()
    }

    /// Sends a signal (`INT`, `TERM`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} did not exit within {limit:?}",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, and the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(STOP_LIMIT).await
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts `child_test`, an ignored test of this same test binary, in a
    /// child process with `envs` (the test does nothing without them).
    pub fn spawn_child_test(what: &str, child_test: &str, envs: &[(&str, &str)]) -> Self {
        let exe = std::env::current_exe().expect("the test binary");
        Self::spawn(
            what,
            Command::new(exe)
                .args([child_test, "--exact", "--nocapture", "--ignored"])
                .envs(envs.iter().copied()),
        )
    }

    /// Waits for the line [`say_held`] prints in the child and returns its
    /// token. Panics if the child exits first, or is silent for `limit`.
    pub async fn held_token(&mut self, limit: Duration) -> u64 {
        loop {
            let line = self
                .next_line(limit)
                .await
                .unwrap_or_else(|| panic!("{} exited before it held its lock", self.what));
            // libtest may print "test <name> ... " ahead of it on the line.
            if let Some((_, token)) = line.split_once(HELD) {
                return token.trim().parse().expect("a token after HELD");
            }
        }
    }
}

/// What a child prints once it holds its lock, before the token.
const HELD: &str = "HELD ";

/// In a child started by [`Proc::spawn_child_test`]: tells the parent the
/// lock is held, with its token (flushed at once: stdout is a pipe).
pub fn say_held(token: u64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{HELD}{token}").expect("write");
    out.flush().expect("flush");
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("TERM");
            let started = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && started.elapsed() < STOP_LIMIT {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.kill();
        }
        if std::thread::panicking() {
            let stderr = self.stderr.lock().unwrap();
            eprintln!("--- stderr of {} ---\n{}", self.what, stderr.join("\n"));
        }
    }
}
