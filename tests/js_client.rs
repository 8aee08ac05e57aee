//! The `orderpush-client` package (clients/js) runs its own test suite (`npm test`, Node's test
//! runner) against the real server on a fresh database: typed events, resume with `since`, a
//! SIGKILL restart losing nothing, refusals, Retry-After, ack, resyncs and the package itself.
//! Needs `node`, `npm`, `psql`, `npm ci` and `npm run build` in clients/js (`.ci/run` does
//! both); without them the test is skipped locally and fails in CI.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

/// Longest the JavaScript suite may run (it takes well under a minute): a hung run is killed,
/// with every server it started, rather than holding `cargo test` forever.
const JS_SUITE_TIMEOUT: Duration = Duration::from_secs(240);

fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// Why the suite cannot run here, if it cannot.
fn missing_prerequisite(dir: &Path) -> Option<String> {
    for (tool, install) in [
        ("node", "apt-get install -y nodejs"),
        ("npm", "apt-get install -y npm"),
        ("psql", "apt-get install -y postgresql-client"),
    ] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("`{tool}` is not installed ({install})"));
        }
    }
    for module in ["ws", "typescript"] {
        if !dir.join("node_modules").join(module).is_dir() {
            return Some("clients/js/node_modules is missing: npm ci --prefix clients/js".into());
        }
    }
    for built in ["dist/esm/index.js", "dist/cjs/index.js"] {
        if !dir.join(built).is_file() {
            return Some(format!(
                "clients/js/{built} is missing: npm run build --prefix clients/js"
            ));
        }
    }
    // A build older than the sources would test yesterday's client.
    let built = modified(&dir.join("dist/esm/index.js"));
    let sources = std::fs::read_dir(dir.join("src")).expect("clients/js/src");
    if sources
        .flatten()
        .any(|entry| modified(&entry.path()) > built)
    {
        return Some("clients/js/dist is older than src: npm run build --prefix clients/js".into());
    }
    None
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("a file's modification time")
}

/// Reads a pipe to its end on a thread of its own (so neither pipe can fill up and stall the
/// child); joined once the child has exited.
fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// A count from the TAP summary (`# pass 12`).
fn summary(tap: &str, name: &str) -> Option<u64> {
    let prefix = format!("# {name} ");
    tap.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

#[tokio::test]
async fn the_javascript_client_package_passes_its_suite_against_the_real_server() {
    let dir = package_dir();
    if let Some(why) = missing_prerequisite(&dir) {
        // CI installs and builds everything (.ci/run): there, a missing piece is a failure.
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED JavaScript client suite: {why} (.ci/run installs it)");
        return;
    }
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;

    let mut child = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&dir)
        .env("ORDERPUSH_BIN", env!("CARGO_BIN_EXE_orderpush"))
        .env("DATABASE_URL", db.url())
        .env("ORDERPUSH_TENANT", "kitchen")
        .env("ORDERPUSH_KEY", &key)
        .env_remove("NODE_OPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own, so a hung run is killed with the servers it started.
        .process_group(0)
        .spawn()
        .expect("npm starts");
    let group = child.id();
    let stdout = read_all(child.stdout.take().expect("piped"));
    let stderr = read_all(child.stderr.take().expect("piped"));
    let deadline = tokio::time::Instant::now() + JS_SUITE_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("npm test runs") {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
            let _ = child.wait();
            panic!("the JavaScript suite did not finish within {JS_SUITE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = (
        status,
        stdout.join().expect("stdout read"),
        stderr.join().expect("stderr read"),
    );
    let tap = String::from_utf8_lossy(&out.1);
    let stderr = String::from_utf8_lossy(&out.2);
    let failed = || format!("npm test in clients/js:\n{tap}\n--- stderr ---\n{stderr}");

    assert!(out.0.success(), "{}", failed());
    assert_eq!(summary(&tap, "fail"), Some(0), "{}", failed());
    // Every server test must have run: a skip would mean the variables above did not arrive.
    assert_eq!(summary(&tap, "skipped"), Some(0), "{}", failed());
    let passed = summary(&tap, "pass").unwrap_or(0);
    assert_eq!(summary(&tap, "todo"), Some(0), "{}", failed());
    assert!(passed >= 35, "only {passed} tests passed: {}", failed());
    eprintln!("JavaScript client suite: {passed} passed");
}
