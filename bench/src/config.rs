//! Command-line options of orderpush-bench (hand-parsed to keep the dependency tree small).

use anyhow::{Result, anyhow, bail};
use std::path::PathBuf;

use crate::servers::Kind;

pub const USAGE: &str = "\
orderpush-bench: the benchmark suite; every scenario against orderpush and the Node baseline,
side by side, in one run.

usage: orderpush-bench [SCENARIO...] [options]

scenarios (default: all):
  all          every scenario below, then the table, docs/benchmarks.md and the chart
  connections  1: idle authenticated connections across tenants: RSS per connection, connect rate;
                  then all clients on one tenant, one big frame to all: RSS back to idle?
  fanout       2: one tenant, many clients, /broadcast: last-client latency and server CPU per
                  delivery (user/system) at a steady rate; CPU per delivery at saturation for
                  each client count of --fanout-curve and --clients
  commit       3: order writers -> POS: commit-to-frame latency, lost/duplicate/out-of-order
  writepath    4: pgbench orders+items with and without triggers (per wake-up mode), the service
                  running; checks the sequencer numbered every row
  broadcast    5: /broadcast with concurrent callers: accepted req/s, p99, durability
  storm        6: reconnect storm: restart the server under clients and writers
  tenants      7: orderpush only: service and Postgres CPU following the log, at rest and under
                  load, for each of --tenant-counts tenants
  cleanup      drop leftover orderpush_bench_* databases and exit

options:
  --servers LIST        orderpush,node (default both)
  --orderpush-bin PATH  orderpush binary (default: $ORDERPUSH_BIN, else
                        $CARGO_TARGET_DIR/release/orderpush, else <repo>/target/release/orderpush)
  --node-src DIR        Node baseline sources (default <repo>/bench/baseline-node)
  --clients N           connections for scenarios 1, 2 and 6 (default 10000)
  --big-frame-bytes N   scenario 1: padding of the one big broadcast (default 40000; 0 = skip)
  --fanout-curve LIST   scenario 2: smaller client counts measured at saturation besides
                        --clients (default 200,1000)
  --tenants N           tenants (default 100)
  --clients-per-tenant N  clients per tenant in scenario 3 (default 10)
  --rates LIST          scenario 3 order rates per second (default 100,1000)
  --phase-secs N        length of each measured phase of scenarios 2, 3, 5 (default 5)
  --fanout-rate N       scenario 2 steady broadcasts per second (default 5: below either
                        server's saturation, so it measures one event's fan-out, not queueing)
  --payload-bytes N     padding in each broadcast's data (default 200)
  --writers LIST        scenario 4 pgbench client counts (default 1,8,32)
  --pgbench-secs N      scenario 4 seconds per pgbench run (default 5)
  --wakeup-modes LIST   scenario 4 orderpush.wakeup modes (default notify,gated,poll)
  --callers N           scenario 5 concurrent callers (default 32)
  --storm-rate N        scenario 6 orders per second while restarting (default 200)
  --storm-secs N        scenario 6 writer duration; the restart is 2 s in (default 8)
  --tenant-counts LIST  scenario 7 tenant counts (default 100,10000,100000)
  --tenants-secs N      scenario 7 seconds of each window, at rest and under load (default 15)
  --tenants-rate N      scenario 7 orders per second under load, spread over all tenants
                        (default 100)
  --tenants-clients N   scenario 7 connected clients, one per watched tenant (default 4)
  --pg-host H --pg-port P --pg-user U   local Postgres (default 127.0.0.1 5432 postgres)
  --port-base N         orderpush listens on N, Node on N+1 (default 19011)
  --out-dir DIR         logs and results.json (default <repo>/bench/out)
  --docs PATH           markdown to write (default <repo>/docs/benchmarks.md, only with `all`)
  --write-docs          also write docs and chart after a single scenario
  --no-docs             never write docs or chart
  --keep-db             keep the run's databases
  --idle-wait N         seconds a scenario waits at most for a quiet machine (under 30 % busy)
                        before it starts (default 180; 10 with --quick)
  --quick               small sizes for a smoke test (2000 clients, 2 s phases, 3 s windows
                        in scenario 7)
";

/// Parsed options.
#[derive(Clone, Debug)]
pub struct Args {
    pub scenarios: Vec<String>,
    pub servers: Vec<Kind>,
    pub orderpush_bin: Option<PathBuf>,
    pub node_src: PathBuf,
    pub clients: usize,
    pub big_frame_bytes: usize,
    pub fanout_curve: Vec<usize>,
    pub tenants: usize,
    pub clients_per_tenant: usize,
    pub rates: Vec<f64>,
    pub phase_secs: u64,
    pub fanout_rate: f64,
    pub payload_bytes: usize,
    pub writers: Vec<usize>,
    pub pgbench_secs: u64,
    pub wakeup_modes: Vec<String>,
    pub callers: usize,
    pub storm_rate: f64,
    pub storm_secs: u64,
    pub tenant_counts: Vec<usize>,
    pub tenants_secs: u64,
    pub tenants_rate: f64,
    pub tenants_clients: usize,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub port_base: u16,
    pub out_dir: PathBuf,
    pub docs: PathBuf,
    pub write_docs: bool,
    pub no_docs: bool,
    pub keep_db: bool,
    pub idle_wait_secs: u64,
    pub repo: PathBuf,
}

const ALL: [&str; 7] = [
    "connections",
    "fanout",
    "commit",
    "writepath",
    "broadcast",
    "storm",
    "tenants",
];

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| anyhow!("bad list item {x:?}"))
        })
        .collect()
}

impl Args {
    pub fn parse(argv: &[String]) -> Result<Args> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut a = Args {
            scenarios: vec![],
            servers: vec![Kind::Orderpush, Kind::Node],
            orderpush_bin: None,
            node_src: repo.join("bench/baseline-node"),
            clients: 10_000,
            big_frame_bytes: 40_000,
            fanout_curve: vec![200, 1000],
            tenants: 100,
            clients_per_tenant: 10,
            rates: vec![100.0, 1000.0],
            phase_secs: 5,
            fanout_rate: 5.0,
            payload_bytes: 200,
            writers: vec![1, 8, 32],
            pgbench_secs: 5,
            wakeup_modes: vec!["notify".into(), "gated".into(), "poll".into()],
            callers: 32,
            storm_rate: 200.0,
            storm_secs: 8,
            tenant_counts: vec![100, 10_000, 100_000],
            tenants_secs: 15,
            tenants_rate: 100.0,
            tenants_clients: 4,
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            pg_user: "postgres".into(),
            port_base: 19011,
            out_dir: repo.join("bench/out"),
            docs: repo.join("docs/benchmarks.md"),
            write_docs: false,
            no_docs: false,
            keep_db: false,
            idle_wait_secs: 180,
            repo: repo.clone(),
        };
        let mut quick = false;
        let mut i = 0;
        while i < argv.len() {
            let arg = argv[i].as_str();
            let mut val = || -> Result<String> {
                i += 1;
                argv.get(i)
                    .cloned()
                    .ok_or_else(|| anyhow!("{arg} needs a value"))
            };
            match arg {
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                "--servers" => {
                    a.servers = val()?
                        .split(',')
                        .map(|s| match s {
                            "orderpush" => Ok(Kind::Orderpush),
                            "node" => Ok(Kind::Node),
                            _ => Err(anyhow!("unknown server {s:?}")),
                        })
                        .collect::<Result<_>>()?
                }
                "--orderpush-bin" => a.orderpush_bin = Some(val()?.into()),
                "--node-src" => a.node_src = val()?.into(),
                "--clients" => a.clients = val()?.parse()?,
                "--big-frame-bytes" => a.big_frame_bytes = val()?.parse()?,
                "--fanout-curve" => a.fanout_curve = list(&val()?)?,
                "--tenants" => a.tenants = val()?.parse()?,
                "--clients-per-tenant" => a.clients_per_tenant = val()?.parse()?,
                "--rates" => a.rates = list(&val()?)?,
                "--phase-secs" => a.phase_secs = val()?.parse()?,
                "--fanout-rate" => a.fanout_rate = val()?.parse()?,
                "--payload-bytes" => a.payload_bytes = val()?.parse()?,
                "--writers" => a.writers = list(&val()?)?,
                "--pgbench-secs" => a.pgbench_secs = val()?.parse()?,
                "--wakeup-modes" => a.wakeup_modes = list(&val()?)?,
                "--callers" => a.callers = val()?.parse()?,
                "--storm-rate" => a.storm_rate = val()?.parse()?,
                "--storm-secs" => a.storm_secs = val()?.parse()?,
                "--tenant-counts" => a.tenant_counts = list(&val()?)?,
                "--tenants-secs" => a.tenants_secs = val()?.parse()?,
                "--tenants-rate" => a.tenants_rate = val()?.parse()?,
                "--tenants-clients" => a.tenants_clients = val()?.parse()?,
                "--pg-host" => a.pg_host = val()?,
                "--pg-port" => a.pg_port = val()?.parse()?,
                "--pg-user" => a.pg_user = val()?,
                "--port-base" => a.port_base = val()?.parse()?,
                "--out-dir" => a.out_dir = val()?.into(),
                "--docs" => a.docs = val()?.into(),
                "--write-docs" => a.write_docs = true,
                "--no-docs" => a.no_docs = true,
                "--keep-db" => a.keep_db = true,
                "--idle-wait" => a.idle_wait_secs = val()?.parse()?,
                "--quick" => quick = true,
                s if !s.starts_with('-') => {
                    if s != "all" && s != "cleanup" && !ALL.contains(&s) {
                        bail!("unknown scenario {s:?}\n\n{USAGE}");
                    }
                    a.scenarios.push(s.to_string());
                }
                s => bail!("unknown option {s:?}\n\n{USAGE}"),
            }
            i += 1;
        }
        if quick {
            a.clients = a.clients.min(2000);
            a.phase_secs = a.phase_secs.min(2);
            a.pgbench_secs = a.pgbench_secs.min(2);
            a.storm_secs = a.storm_secs.min(5);
            a.tenants_secs = a.tenants_secs.min(3);
            a.idle_wait_secs = a.idle_wait_secs.min(10);
        }
        // The curve's points are the smaller client counts; --clients is always its last.
        a.fanout_curve.retain(|&n| n < a.clients);
        a.fanout_curve.sort_unstable();
        a.fanout_curve.dedup();
        if a.scenarios.is_empty() || a.scenarios.iter().any(|s| s == "all") {
            if a.scenarios.iter().all(|s| s != "cleanup") {
                a.write_docs = true;
            }
            a.scenarios = ALL.iter().map(|s| s.to_string()).collect();
        }
        if a.tenants == 0 || a.tenants > 1000 {
            bail!("--tenants must be 1..1000");
        }
        if a.clients == 0 || a.clients > 15_000 {
            bail!("--clients must be 1..15000 (open-file limit and ephemeral ports on one host)");
        }
        if a.fanout_curve.contains(&0) {
            bail!("--fanout-curve counts must be at least 1");
        }
        if a.big_frame_bytes > 200_000 {
            bail!(
                "--big-frame-bytes must be at most 200000 (orderpush takes /broadcast bodies up to 256 KiB)"
            );
        }
        if a.tenant_counts.is_empty() || a.tenant_counts.iter().any(|&n| n == 0 || n > 1_000_000) {
            bail!("--tenant-counts must be 1..1000000 each");
        }
        if a.idle_wait_secs > 3600 {
            bail!("--idle-wait must be at most 3600 s");
        }
        if a.tenants_secs == 0 || a.tenants_secs > 300 {
            bail!("--tenants-secs must be 1..300");
        }
        if !(a.tenants_rate > 0.0 && a.tenants_rate <= 2000.0) {
            bail!("--tenants-rate must be in (0, 2000]");
        }
        if a.tenants_clients == 0 || a.tenants_clients > 100 {
            bail!("--tenants-clients must be 1..100");
        }
        if a.phase_secs == 0 || a.phase_secs > 120 {
            bail!("--phase-secs must be 1..120");
        }
        if a.rates.iter().any(|&r| !(r > 0.0 && r <= 5000.0)) {
            bail!("--rates must be in (0, 5000] orders/s");
        }
        if a.writers.iter().any(|&w| w == 0 || w > 64) {
            bail!("--writers must be 1..64 (Postgres max_connections is 100 here)");
        }
        if a.callers == 0 || a.callers > 256 {
            bail!("--callers must be 1..256");
        }
        if !(a.fanout_rate > 0.0 && a.fanout_rate <= 1000.0) {
            bail!("--fanout-rate must be in (0, 1000]");
        }
        if !(a.storm_rate > 0.0 && a.storm_rate <= 2000.0) {
            bail!("--storm-rate must be in (0, 2000]");
        }
        if !(4..=120).contains(&a.storm_secs) {
            bail!("--storm-secs must be in 4..120");
        }
        if a.pgbench_secs == 0 || a.pgbench_secs > 120 {
            bail!("--pgbench-secs must be 1..120");
        }
        Ok(a)
    }

    /// The orderpush binary to run.
    pub fn orderpush_bin(&self) -> PathBuf {
        if let Some(p) = &self.orderpush_bin {
            return p.clone();
        }
        if let Ok(p) = std::env::var("ORDERPUSH_BIN") {
            return p.into();
        }
        if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
            let p = PathBuf::from(t).join("release/orderpush");
            if p.exists() {
                return p;
            }
        }
        self.repo.join("target/release/orderpush")
    }
}
