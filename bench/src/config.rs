//! Command-line options of orderpush-bench (hand-parsed to keep the dependency tree small).

use anyhow::{Result, anyhow, bail};
use std::path::PathBuf;

use crate::servers::Kind;

pub const USAGE: &str = "\
orderpush-bench: the issue-4 benchmark suite; every scenario against orderpush and the Node
baseline, side by side, in one run.

usage: orderpush-bench [SCENARIO...] [options]

scenarios (default: all):
  all          every scenario below, then the table, docs/benchmarks.md and the chart
  connections  1: idle authenticated connections across tenants: RSS per connection, connect rate
  fanout       2: one tenant, many clients, /broadcast: last-client latency, deliveries/s
  commit       3: order writers -> POS: commit-to-frame latency, lost/duplicate/out-of-order
  writepath    4: pgbench orders+items with and without triggers (per wake-up mode)
  broadcast    5: /broadcast with concurrent callers: accepted req/s, p99, durability
  storm        6: reconnect storm: restart the server under clients and writers
  cleanup      drop leftover orderpush_bench_* databases and exit

options:
  --servers LIST        orderpush,node (default both)
  --orderpush-bin PATH  orderpush binary (default: $ORDERPUSH_BIN, else
                        $CARGO_TARGET_DIR/release/orderpush, else <repo>/target/release/orderpush)
  --node-src DIR        Node baseline sources (default <repo>/../shared/baselines/node-seed-server)
  --clients N           connections for scenarios 1, 2 and 6 (default 10000)
  --tenants N           tenants (default 100)
  --clients-per-tenant N  clients per tenant in scenario 3 (default 10)
  --rates LIST          scenario 3 order rates per second (default 100,1000)
  --phase-secs N        length of each measured phase of scenarios 2, 3, 5 (default 5)
  --fanout-rate N       scenario 2 steady broadcasts per second (default 2: below either
                        server's saturation, so it measures one event's fan-out, not queueing)
  --payload-bytes N     padding in each broadcast's data (default 200)
  --writers LIST        scenario 4 pgbench client counts (default 1,8,32)
  --pgbench-secs N      scenario 4 seconds per pgbench run (default 5)
  --wakeup-modes LIST   scenario 4 orderpush.wakeup modes (default notify,gated,poll)
  --callers N           scenario 5 concurrent callers (default 32)
  --storm-rate N        scenario 6 orders per second while restarting (default 200)
  --storm-secs N        scenario 6 writer duration; the restart is 2 s in (default 8)
  --pg-host H --pg-port P --pg-user U   local Postgres (default 127.0.0.1 5432 postgres)
  --port-base N         orderpush listens on N, Node on N+1 (default 19011)
  --out-dir DIR         logs and results.json (default <repo>/bench/out)
  --docs PATH           markdown to write (default <repo>/docs/benchmarks.md, only with `all`)
  --write-docs          also write docs and chart after a single scenario
  --no-docs             never write docs or chart
  --keep-db             keep the run's databases
  --quick               small sizes for a smoke test (2000 clients, 2 s phases)
";

/// Parsed options.
#[derive(Clone, Debug)]
pub struct Args {
    pub scenarios: Vec<String>,
    pub servers: Vec<Kind>,
    pub orderpush_bin: Option<PathBuf>,
    pub node_src: PathBuf,
    pub clients: usize,
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
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub port_base: u16,
    pub out_dir: PathBuf,
    pub docs: PathBuf,
    pub write_docs: bool,
    pub no_docs: bool,
    pub keep_db: bool,
    pub repo: PathBuf,
}

const ALL: [&str; 6] = [
    "connections",
    "fanout",
    "commit",
    "writepath",
    "broadcast",
    "storm",
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
            node_src: repo.join("../shared/baselines/node-seed-server"),
            clients: 10_000,
            tenants: 100,
            clients_per_tenant: 10,
            rates: vec![100.0, 1000.0],
            phase_secs: 5,
            fanout_rate: 2.0,
            payload_bytes: 200,
            writers: vec![1, 8, 32],
            pgbench_secs: 5,
            wakeup_modes: vec!["notify".into(), "gated".into(), "poll".into()],
            callers: 32,
            storm_rate: 200.0,
            storm_secs: 8,
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            pg_user: "postgres".into(),
            port_base: 19011,
            out_dir: repo.join("bench/out"),
            docs: repo.join("docs/benchmarks.md"),
            write_docs: false,
            no_docs: false,
            keep_db: false,
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
                "--pg-host" => a.pg_host = val()?,
                "--pg-port" => a.pg_port = val()?.parse()?,
                "--pg-user" => a.pg_user = val()?,
                "--port-base" => a.port_base = val()?.parse()?,
                "--out-dir" => a.out_dir = val()?.into(),
                "--docs" => a.docs = val()?.into(),
                "--write-docs" => a.write_docs = true,
                "--no-docs" => a.no_docs = true,
                "--keep-db" => a.keep_db = true,
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
        }
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
