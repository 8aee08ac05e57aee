//! Starting, probing, measuring (RSS) and stopping the servers under test: orderpush and Node.

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

use crate::http;

/// A server that is not answering /healthz after this long failed to start (orderpush applies
/// its migrations at start-up; on 2 loaded cores that can take a few seconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often /healthz is polled while waiting for a start.
const HEALTH_POLL: Duration = Duration::from_millis(20);
/// After SIGTERM a server gets this long to close its sockets (1001) and exit before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Which implementation a server or a result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Orderpush,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Orderpush => "orderpush",
            Kind::Node => "node",
        }
    }
}

/// How to start one server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    pub kind: Kind,
    /// orderpush: the binary; node: the directory holding server.js and node_modules.
    pub program: PathBuf,
    pub port: u16,
    /// orderpush: the database it serves; node: the database it LISTENs on (with `listen_pg`).
    pub database_url: String,
    pub listen_pg: bool,
    pub keys_file: Option<PathBuf>,
    pub log_file: PathBuf,
}

impl ServerSpec {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A running server process.
pub struct Server {
    pub spec: ServerSpec,
    child: Child,
    pub pid: u32,
}

impl Server {
    /// Spawns the server and waits until /healthz answers 200.
    pub async fn start(spec: &ServerSpec) -> Result<Server> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)
            .with_context(|| format!("open {}", spec.log_file.display()))?;
        let log2 = log.try_clone()?;
        let mut cmd = match spec.kind {
            Kind::Orderpush => {
                let mut c = Command::new(&spec.program);
                c.arg("serve")
                    .args(["--database-url", &spec.database_url])
                    .args(["--listen", &spec.addr().to_string()])
                    // The scenarios share one key per tenant among many simulated terminals, and
                    // put up to all of --clients (at most 15,000) on one tenant: lift the
                    // per-key and per-tenant caps above that, as an operator would for such a
                    // fleet.
                    .args(["--max-connections-per-key", "15000"])
                    .args(["--max-connections-per-tenant", "15000"])
                    .env(
                        "RUST_LOG",
                        std::env::var("BENCH_SERVER_LOG").unwrap_or("warn".into()),
                    );
                c
            }
            Kind::Node => {
                let mut c = Command::new("node");
                c.arg(spec.program.join("server.js")).args([
                    "--port",
                    &spec.port.to_string(),
                    "--host",
                    "127.0.0.1",
                    "--quiet",
                ]);
                if let Some(k) = &spec.keys_file {
                    c.arg("--keys-file").arg(k);
                }
                if spec.listen_pg {
                    c.args(["--listen-pg", "--pg-url", &spec.database_url]);
                }
                c
            }
        };
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the server if
        // this bench dies first (Ctrl-C, timeout), so no server outlives an interrupted run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {:?}", spec.kind))?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = child.try_wait()? {
                bail!(
                    "{} exited during start-up ({st}); see {}",
                    spec.kind.name(),
                    spec.log_file.display()
                );
            }
            if let Ok(200) = http::get_status(spec.addr(), "/healthz").await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                bail!("{} not healthy after {START_TIMEOUT:?}", spec.kind.name());
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
        Ok(Server {
            spec: spec.clone(),
            child,
            pid,
        })
    }

    /// Resident set size of the server process, in KiB (VmRSS of /proc/<pid>/status).
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid)
    }

    /// SIGTERM, then SIGKILL after `STOP_GRACE`; returns how the process ended.
    pub async fn stop(mut self) -> Result<String> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(format!("had already exited: {st}"));
        }
        signal(self.pid, libc::SIGTERM);
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(st) => Ok(format!("{}", st?)),
            Err(_) => {
                self.child.start_kill()?;
                let st = self.child.wait().await?;
                Ok(format!("killed after {STOP_GRACE:?}: {st}"))
            }
        }
    }
}

/// Sends a signal to a process this bench started.
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and still own (not yet reaped).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

/// CPU time (user + system) a process has used so far, in seconds (/proc/<pid>/stat).
pub fn cpu_secs(pid: u32) -> f64 {
    let (user, sys) = cpu_times(pid);
    user + sys
}

/// CPU time a process has used so far, split into user space (utime) and kernel (stime), in
/// seconds, from /proc/<pid>/stat (pid 0: this process). Both include exited threads. Clock
/// ticks (10 ms here) are the resolution; NaN when the process is gone.
pub fn cpu_times(pid: u32) -> (f64, f64) {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return (f64::NAN, f64::NAN);
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let hz = clock_ticks_per_sec();
    (tick(11) / hz, tick(12) / hz)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU used by a process between two readings of [`cpu_times`], split user / system.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuUse {
    pub user: f64,
    pub sys: f64,
}

impl CpuUse {
    /// Total seconds (user + system).
    pub fn total(&self) -> f64 {
        self.user + self.sys
    }
}

/// A running CPU measurement of one process (pid 0: this process).
pub struct CpuMeter {
    pid: u32,
    start: (f64, f64),
}

impl CpuMeter {
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            start: cpu_times(pid),
        }
    }
    /// CPU used since `start`.
    pub fn read(&self) -> CpuUse {
        let (u, s) = cpu_times(self.pid);
        CpuUse {
            user: u - self.start.0,
            sys: s - self.start.1,
        }
    }
}

/// Kernel counters of connections refused at a full listen queue (TcpExt ListenOverflows,
/// ListenDrops), machine-wide; a delta over a phase tells whether SYNs were dropped.
pub fn listen_overflows() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
        return (0, 0);
    };
    let mut lines = text.lines();
    while let (Some(h), Some(v)) = (lines.next(), lines.next()) {
        if !h.starts_with("TcpExt:") {
            continue;
        }
        let get = |name: &str| {
            h.split_whitespace()
                .position(|x| x == name)
                .and_then(|i| v.split_whitespace().nth(i))
                .and_then(|x| x.parse().ok())
                .unwrap_or(0)
        };
        return (get("ListenOverflows"), get("ListenDrops"));
    }
    (0, 0)
}

/// Makes a private copy of the Node baseline (so `npm ci` writes its `node_modules` under
/// `bench/out`, never into the sources) and runs `npm ci` there once.
pub async fn prepare_node(src: &Path, dst: &Path) -> Result<()> {
    if dst.join("node_modules/ws").exists() && dst.join("server.js").exists() {
        return Ok(());
    }
    tokio::fs::create_dir_all(dst).await?;
    for f in [
        "server.js",
        "package.json",
        "package-lock.json",
        "schema.sql",
        "naive-triggers.sql",
    ] {
        let to = dst.join(f);
        let _ = tokio::fs::remove_file(&to).await;
        tokio::fs::copy(src.join(f), &to)
            .await
            .with_context(|| format!("copy {f} from {}", src.display()))?;
    }
    crate::pg::run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dst),
    )
    .await
    .context("npm ci for the Node baseline")?;
    Ok(())
}

/// Writes the Node key file `{"pos_...": "tenant"}`.
pub fn write_node_keys(path: &Path, keys: &[String]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.clone(),
                serde_json::Value::String(crate::pg::tenant_slug(i)),
            )
        })
        .collect();
    std::fs::write(path, serde_json::to_vec(&map)?)?;
    Ok(())
}

/// Raises this process's open-file soft limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// Time a task (a process's main thread, or one thread under /proc/<pid>/task) has run on a
/// CPU, in seconds, from its `schedstat` (nanoseconds: far finer than the 10 ms clock ticks of
/// /proc/<pid>/stat); None when the task is gone.
pub fn schedstat_secs(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// CPU of a multi-threaded process over a window, to the nanosecond: the sum over its threads'
/// `schedstat`, read at every [`ThreadsCpu::sample`]. A thread that appears after the first
/// sample is counted from zero (it started within the window); one that ends between samples
/// loses what it ran since the last (sample often: tokio's blocking threads come and go).
pub struct ThreadsCpu {
    pid: u32,
    /// tid -> (seconds at its first sample, latest seconds).
    seen: std::collections::HashMap<u32, (f64, f64)>,
    samples: usize,
}

impl ThreadsCpu {
    pub fn new(pid: u32) -> ThreadsCpu {
        ThreadsCpu {
            pid,
            seen: Default::default(),
            samples: 0,
        }
    }

    /// Reads every thread's run time now.
    pub fn sample(&mut self) {
        let first = self.samples == 0;
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) {
            for e in dir.flatten() {
                let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                    continue;
                };
                let Some(secs) =
                    schedstat_secs(&format!("/proc/{}/task/{tid}/schedstat", self.pid))
                else {
                    continue;
                };
                let entry = self
                    .seen
                    .entry(tid)
                    .or_insert((if first { secs } else { 0.0 }, secs));
                entry.1 = secs;
            }
        }
        self.samples += 1;
    }

    /// CPU seconds between the first sample and the latest.
    pub fn used(&self) -> f64 {
        self.seen
            .values()
            .map(|&(first, last)| (last - first).max(0.0))
            .sum()
    }
}
