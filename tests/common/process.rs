//! Child processes: the real `orderpush` binary and any process that prints JSON documents.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{TestDb, WAIT};

/// Runs the real `orderpush` binary against a test database.
pub(crate) fn orderpush_cli(db: &TestDb, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(args)
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// Command output as text.
pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A port that was free a moment ago (for processes that must bind it themselves).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that prints JSON documents on stdout (one per line or pretty-printed): the
/// documents and the stderr lines arrive on channels; killed on drop.
pub(crate) struct JsonChild {
    child: std::process::Child,
    docs: std::sync::mpsc::Receiver<Value>,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line read so far.
    pub(crate) stderr: Vec<String>,
}

impl JsonChild {
    /// Spawns `cmd` with piped stdout and stderr.
    pub(crate) fn spawn(mut cmd: std::process::Command) -> Self {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (dtx, docs) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        // A stream of documents: works for one-per-line and for pretty JSON spanning lines.
        std::thread::spawn(move || {
            for v in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
                match v {
                    Ok(v) => {
                        let _ = dtx.send(v);
                    }
                    Err(_) => break,
                }
            }
        });
        let (ltx, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ltx.send(line);
            }
        });
        Self {
            child,
            docs,
            lines,
            stderr: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.stderr.push(l);
        }
    }

    /// The next document; panics (with the stderr so far) after twice [`WAIT`].
    pub(crate) async fn next_event(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            if let Ok(v) = self.docs.try_recv() {
                return v;
            }
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no event; stderr:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a stderr line contains `needle`.
    pub(crate) async fn expect_stderr(&mut self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        while !self.stderr.iter().any(|l| l.contains(needle)) {
            self.drain();
            assert!(
                tokio::time::Instant::now() < deadline,
                "no stderr line with {needle:?}:\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a stderr line contains `needle`, then hands the process back.
    pub(crate) async fn after_stderr(mut self, needle: &str) -> Self {
        self.expect_stderr(needle).await;
        self
    }

    /// Waits for the process to exit by itself; returns (exit code, stderr).
    pub(crate) async fn exit(&mut self) -> (Option<i32>, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the process kept running (a retry loop?):\n{}",
                self.stderr.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.drain();
        (status.code(), self.stderr.join("\n"))
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `orderpush serve` on a free loopback port (`--listen 127.0.0.1:0`: [`Serve::addr`] reads
/// the port from its logs), its stderr lines streamed to a channel; killed on drop.
pub(crate) struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Serve {
    pub(crate) fn start(db: &TestDb, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderpush"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Ends by itself when the child's stderr closes.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line satisfying `want`, within [`WAIT`].
    pub(crate) fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line for {what}; got:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Where it listens, once it says so (started with `--log-format json`), after its listener
    /// follows the log.
    pub(crate) fn json_listening_addr(&mut self) -> String {
        let listening = self.wait_for("listening", |l| {
            log_message(l).is_some_and(|m| m == "orderpush listening")
        });
        let v: Value = serde_json::from_str(&listening).unwrap();
        let addr = v["fields"]["addr"].as_str().unwrap().to_owned();
        self.wait_for("the listener", |l| {
            log_message(l).is_some_and(|m| m.contains("listener following"))
        });
        addr
    }

    /// Every line received so far (after draining what is buffered).
    pub(crate) fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The message of one line of `--log-format json` output.
pub(crate) fn log_message(line: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    Some(v["fields"]["message"].as_str()?.to_owned())
}
