//! The command line and configuration: one clap struct per subcommand, every flag with an
//! environment-variable fallback (docs/configuration.md), plus the server's tunables and every default
//! value (this module imports nothing from the crate: every other module may read it).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Shortest `--broadcast-token` and `--admin-token` accepted: a shorter shared secret is
/// guessable by brute force.
pub(crate) const MIN_TOKEN_LEN: usize = 16;
/// Where `serve` listens: every interface, on the port of the WebSocket server it replaces, so
/// the web app's /broadcast calls need no change.
pub const LISTEN: &str = "0.0.0.0:9011";
/// How long events stay replayable (`serve --retention`, `prune --older-than`): a POS that was
/// off for a night still resumes without a refetch.
pub(crate) const RETENTION: &str = "24h";
/// Where `tail` connects: a service on this machine.
pub(crate) const TAIL_URL: &str = "ws://127.0.0.1:9011";

/// `orderpush`: pushes Postgres changes to POS terminals over WebSocket.
#[derive(Debug, Parser)]
#[command(name = "orderpush", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "ORDERPUSH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP + WebSocket on one port, plus the Postgres listener.
    Serve(ServeArgs),
    /// Apply the embedded database migrations (`migrate status`, `migrate --dry-run`).
    Migrate(MigrateArgs),
    /// Manage POS API keys.
    Keys(KeysArgs),
    /// Delete retained events older than the retention.
    Prune(PruneArgs),
    /// Show, per application table, which orderpush triggers are installed and enabled.
    Triggers(TriggersArgs),
    /// Remove every orderpush object (triggers, schema, history); the app's tables stay.
    Uninstall(UninstallArgs),
    /// Print a tenant's events as they arrive, reconnecting with `since` by itself.
    Tail(TailArgs),
}

/// The database connection, shared by every subcommand that touches it.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Postgres connection URL (libpq format), e.g. postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url, hide_env_values = true, global = true)]
    pub database_url: Option<tokio_postgres::Config>,
}

impl DbArgs {
    /// The configured database, or a clear error naming both ways to set it.
    pub fn database(&self) -> Result<&tokio_postgres::Config, MissingDatabaseUrl> {
        self.database_url.as_ref().ok_or(MissingDatabaseUrl)
    }
}

/// Neither `--database-url` nor `DATABASE_URL` was given.
#[derive(Debug, thiserror::Error)]
#[error(
    "no database configured: pass --database-url postgres://USER@HOST:PORT/DB or set DATABASE_URL"
)]
pub struct MissingDatabaseUrl;

/// `orderpush serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Address for HTTP and WebSocket.
    #[arg(long, env = "ORDERPUSH_LISTEN", default_value = LISTEN)]
    pub listen: SocketAddr,
    /// Bearer token required by POST /broadcast; without it only local callers may broadcast
    /// (loopback, not through a proxy, with a local Host).
    #[arg(long, env = "ORDERPUSH_BROADCAST_TOKEN", value_parser = parse_token, hide_env_values = true)]
    pub broadcast_token: Option<String>,
    /// How long events stay replayable (e.g. 90s, 30m, 24h, 7d).
    #[arg(long, env = "ORDERPUSH_RETENTION", default_value = RETENTION, value_parser = parse_duration)]
    pub retention: Duration,
    /// Bearer token for /admin/* and /status; without it only local callers may use them.
    #[arg(long, env = "ORDERPUSH_ADMIN_TOKEN", value_parser = parse_token, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Do not apply migrations at start-up (run `orderpush migrate` separately).
    #[arg(long, env = "ORDERPUSH_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Failed authentications one client address may make per minute before its bad credentials
    /// are answered 429 for a minute (valid ones still pass); 0 turns the limit off (e.g. behind
    /// a proxy that hides client addresses).
    #[arg(long, env = "ORDERPUSH_AUTH_FAILURE_LIMIT", default_value_t = AUTH_FAILURE_LIMIT)]
    pub auth_failure_limit: u32,
    /// WebSocket connections this instance holds at most; past it an upgrade is answered 503
    /// with Retry-After (at least 1).
    #[arg(long, env = "ORDERPUSH_MAX_CONNECTIONS", value_parser = parse_cap,
          default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// WebSocket connections one API key may hold at once on this instance (at least 1).
    #[arg(long, env = "ORDERPUSH_MAX_CONNECTIONS_PER_KEY", value_parser = parse_cap,
          default_value_t = MAX_CONNECTIONS_PER_KEY)]
    pub max_connections_per_key: usize,
    /// WebSocket connections one tenant may hold at once on this instance (at least 1).
    #[arg(long, env = "ORDERPUSH_MAX_CONNECTIONS_PER_TENANT", value_parser = parse_cap,
          default_value_t = MAX_CONNECTIONS_PER_TENANT)]
    pub max_connections_per_tenant: usize,
    /// Open orders sent at most for `?snapshot=open`; past it `snapshot_end` says
    /// `"complete": false` (at least 1).
    #[arg(long, env = "ORDERPUSH_SNAPSHOT_MAX_ORDERS", value_parser = parse_cap,
          default_value_t = SNAPSHOT_MAX_ORDERS)]
    pub snapshot_max_orders: usize,
    /// Bytes of `order_snapshot` frames sent at most for one snapshot (e.g. 4194304); past it
    /// `"complete": false`. At least one maximal frame (1 MiB), at most 64 MiB.
    #[arg(long, env = "ORDERPUSH_SNAPSHOT_MAX_BYTES", value_parser = parse_snapshot_bytes,
          default_value_t = SNAPSHOT_MAX_BYTES)]
    pub snapshot_max_bytes: usize,
    /// An order no terminal acknowledged after this long is warned about, counted and shown red
    /// on /status (e.g. 60s, 5m; at most 24h); `off` turns the alert off for every tenant
    /// without its own `orderpush.tenant_settings.ack_timeout_seconds`.
    #[arg(long, env = "ORDERPUSH_ACK_TIMEOUT", default_value = ACK_TIMEOUT,
          value_parser = parse_ack_timeout)]
    pub ack_timeout: AckTimeout,
}

/// How long a kitchen has to acknowledge an order (`serve --ack-timeout`): delivery platforms
/// escalate an order a restaurant has not accepted within minutes; a minute leaves time to act.
pub(crate) const ACK_TIMEOUT: &str = "60s";
/// Longest `--ack-timeout` (and per-tenant `ack_timeout_seconds`, the table's CHECK): an order
/// unacknowledged for a day is no longer news.
pub(crate) const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(86_400);
/// How often each instance claims overdue orders to warn about: the alert fires at most this
/// long after the timeout; acknowledgements reach the database every presence interval anyway.
pub(crate) const ACK_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// `--ack-timeout`: a duration, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckTimeout(pub Option<Duration>);

impl AckTimeout {
    /// Whole seconds, as the database compares them (0 = off).
    pub fn as_secs(self) -> i32 {
        self.0.map_or(0, |d| d.as_secs() as i32)
    }
}

fn parse_ack_timeout(s: &str) -> Result<AckTimeout, String> {
    if s.trim() == "off" {
        return Ok(AckTimeout(None));
    }
    let d = parse_duration(s).map_err(|e| format!("{e} (or 'off')"))?;
    if d > MAX_ACK_TIMEOUT {
        return Err(format!("'{s}' is longer than 24h"));
    }
    Ok(AckTimeout(Some(d)))
}

/// Open orders a snapshot sends at most: a restaurant has tens open at once, a busy one a few
/// hundred; a thousand bounds what a confused query (a status never closed) can send.
pub(crate) const SNAPSHOT_MAX_ORDERS: usize = 1_000;
/// Bytes a snapshot sends at most: a thousand typical orders (~1-4 KB each) fit; the bound
/// keeps a snapshot of huge orders from being a replay of its own.
pub(crate) const SNAPSHOT_MAX_BYTES: usize = 4 << 20;
/// Bounds of `--snapshot-max-bytes`: at least one maximal frame, so a snapshot can always send
/// an order; at most 64 MiB, far beyond any real restaurant's open orders.
const SNAPSHOT_BYTES_RANGE: std::ops::RangeInclusive<usize> = (1 << 20)..=(64 << 20);

/// `orderpush migrate`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// `migrate status`; without a subcommand, apply the pending migrations.
    #[command(subcommand)]
    pub command: Option<MigrateCommand>,
    /// Print the SQL that would run, in order, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: leave out the per-migration BEGIN/COMMIT, for `psql --single-transaction`.
    #[arg(long, requires = "dry_run")]
    pub single_transaction: bool,
    /// How long one DDL statement may wait for a table lock before the attempt fails.
    #[arg(long, env = "ORDERPUSH_MIGRATE_LOCK_TIMEOUT", value_parser = parse_duration,
          default_value = MIGRATE_LOCK_TIMEOUT_TEXT)]
    pub lock_timeout: Duration,
    /// Attempts when a lock cannot be had in time (1 = no retry), with a growing pause between.
    #[arg(long, env = "ORDERPUSH_MIGRATE_ATTEMPTS", default_value_t = MIGRATE_LOCK_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_MIGRATE_ATTEMPTS as i64))]
    pub attempts: u32,
    /// Apply migrations up to and including this version only.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub target: Option<i32>,
}

/// Upper bound for `migrate --attempts`: beyond this a deploy would hang for minutes on a lock a
/// human must release anyway.
pub(crate) const MAX_MIGRATE_ATTEMPTS: u32 = 20;

/// `orderpush migrate ...` subcommands.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// List applied migrations (date, checksum) and pending ones; changes nothing.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `orderpush triggers`.
#[derive(Debug, Args)]
pub struct TriggersArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `orderpush uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Really remove everything (without it, the SQL is printed and nothing changes).
    #[arg(long)]
    pub yes: bool,
}

/// `orderpush tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// The service's WebSocket address, e.g. ws://127.0.0.1:9011.
    #[arg(long, env = "ORDERPUSH_URL", default_value = TAIL_URL)]
    pub url: String,
    /// The tenant whose events to print.
    #[arg(long)]
    pub tenant: String,
    /// A POS API key of that tenant (prefer the env variable: a flag shows in `ps`).
    #[arg(long, env = "ORDERPUSH_KEY", hide_env_values = true)]
    pub key: String,
    /// First replay every retained event after this id, then continue live.
    #[arg(long)]
    pub since: Option<i64>,
    /// Ask for the open orders (`?snapshot=open`) instead of `resync_required`, and when
    /// starting without --since.
    #[arg(long)]
    pub snapshot: bool,
    /// Only these event types, comma-separated (e.g. new_order,order_updated).
    #[arg(long, value_delimiter = ',')]
    pub types: Option<Vec<String>>,
    /// Acknowledge each event once printed ({"type":"ack","id":N}).
    #[arg(long)]
    pub ack: bool,
}

/// `orderpush keys ...`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Which key operation.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The key operations.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a POS API key; prints the key alone on stdout (its id goes to stderr).
    Create {
        /// The tenant the key belongs to.
        #[arg(long)]
        tenant: String,
        /// A note for humans, e.g. the till it is installed on.
        #[arg(long)]
        label: Option<String>,
    },
    /// List keys: id, tenant, label, created, revoked.
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id; every instance refuses it and closes its sockets within a second.
    Revoke {
        /// The key's public id (see `keys list`).
        id: String,
    },
}

/// `orderpush prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub db: DbArgs,
    /// Delete events older than this (e.g. 24h).
    #[arg(long, env = "ORDERPUSH_RETENTION", default_value = RETENTION, value_parser = parse_duration)]
    pub older_than: Duration,
}

fn parse_database_url(s: &str) -> Result<tokio_postgres::Config, String> {
    if s.trim().is_empty() {
        return Err("the database URL is empty".into());
    }
    s.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("not a valid Postgres URL: {e}"))
}

fn parse_token(s: &str) -> Result<String, String> {
    if s.chars().count() < MIN_TOKEN_LEN {
        return Err(format!("must be at least {MIN_TOKEN_LEN} characters"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters".into());
    }
    Ok(s.to_owned())
}

/// A connection cap: a whole number of at least 1 (0 would refuse every connection, which is
/// never what an operator means; there is no "unlimited").
fn parse_snapshot_bytes(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if SNAPSHOT_BYTES_RANGE.contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' must be a number of bytes from {} to {}",
            SNAPSHOT_BYTES_RANGE.start(),
            SNAPSHOT_BYTES_RANGE.end()
        )),
    }
}

fn parse_cap(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would refuse every connection)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number of at least 1")),
    }
}

/// Parses a duration such as `90s`, `30m`, `24h` or `7d` (a whole number and one unit).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 90s, 30m, 24h or 7d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => return Err(format!("'{s}' has no unit: use s, m, h or d (e.g. 24h)")),
    };
    match secs {
        Some(0) => Err("the duration must be greater than zero".into()),
        // Ten years: anything longer is a typo, and interval arithmetic in SQL stays exact.
        Some(secs) if secs <= 10 * 365 * 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("'{s}' is too long (at most 3650d)")),
    }
}

/// Intervals, timeouts and queue sizes of a running server. `Default` gives the production
/// values (the named constants); tests shorten some of them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often each socket is pinged (docs/protocol.md: at least every 30 s).
    pub ping_interval: Duration,
    /// A socket silent for this long is dropped (docs/protocol.md: 60 s).
    pub pong_timeout: Duration,
    /// Bytes of frames a client may have queued before it is disconnected with 1013.
    pub client_queue_bytes: usize,
    /// Frames a client may have queued before it is disconnected with 1013.
    pub client_queue_frames: usize,
    /// How often every cached and connected key is re-checked for revocation: the safety net
    /// behind the key-change notifications (docs/operations.md: closed within 5 s). Must stay well under
    /// the key cache's `REVOCATION_FRESHNESS` (10 s), since these checks keep the cache trusted.
    pub revocation_check_interval: Duration,
    /// How often retention runs in `serve`.
    pub prune_interval: Duration,
    /// How often this instance writes its presence (heartbeat and connections) to the database.
    pub presence_interval: Duration,
    /// Failed authentications one address may make per minute before it is answered 429
    /// (0 = no limit); see [`AUTH_FAILURE_LIMIT`].
    pub auth_failure_limit: u32,
    /// How long an address over that limit is answered 429.
    pub auth_cooldown: Duration,
    /// A socket with frames to send that completes no write for this long is closed with 1013.
    pub drain_timeout: Duration,
    /// Longest replay from the event log, in events; a longer one is answered with
    /// `resync_required` (`replay_too_long`) instead.
    pub max_replay_rows: i64,
    /// Open orders a snapshot sends at most.
    pub snapshot_max_orders: usize,
    /// Bytes of order frames a snapshot sends at most.
    pub snapshot_max_bytes: usize,
    /// The default time to acknowledge an order (per tenant in `orderpush.tenant_settings`).
    pub ack_timeout: AckTimeout,
    /// How often overdue orders are looked for ([`ACK_CHECK_INTERVAL`]).
    pub ack_check_interval: Duration,
    /// How long a client may take to send a request's headers, from its first byte (from the
    /// accept for a new connection); see [`HEADER_READ_TIMEOUT`].
    pub http_header_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests; see [`IDLE_TIMEOUT`].
    pub http_idle_timeout: Duration,
    /// WebSocket connections this instance holds at most (enforced by `http::limits`).
    pub max_connections: usize,
    /// WebSocket connections one API key may hold at once.
    pub max_connections_per_key: usize,
    /// WebSocket connections one tenant may hold at once.
    pub max_connections_per_tenant: usize,
}

/// Pinging every 20 s keeps inside docs/protocol.md's "at least every 30 s" even when a tick is late.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(20);
/// docs/protocol.md: drop a connection that has not answered for 60 s.
pub(crate) const PONG_TIMEOUT: Duration = Duration::from_secs(60);
/// 1 MiB of unsent frames per client, as Centrifugo does: hours of a busy kitchen's normal
/// traffic, yet 10k stalled clients cannot hold more than 10 GiB (and in practice far less).
pub(crate) const CLIENT_QUEUE_BYTES: usize = 1 << 20;
/// Frame-count bound alongside the byte bound, so tiny frames cannot pile up without limit.
pub(crate) const CLIENT_QUEUE_FRAMES: usize = 4096;
/// Key changes arrive by notification within milliseconds; this periodic check catches the ones
/// that did not (the watcher reconnecting, a skipped notify) within the promised 5 s, with slack
/// for a slow query and the close handshake, and five of them fit in the 10 s freshness window.
pub(crate) const REVOCATION_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Retention is coarse (hours); deleting every 5 minutes keeps each batch small.
pub(crate) const PRUNE_INTERVAL: Duration = Duration::from_secs(300);
/// A socket that has something to send (a queued frame or a write in progress) and completes no
/// write for 30 s is closed with 1013, even if its queue never overflows: a peer that stopped
/// reading with a large frame pending would otherwise hold its task, its write buffer and its
/// queue until TCP gives up (hours). 30 s is far longer than any live link needs to take a
/// maximal frame (1 MiB) at 35 KB/s, and shorter than the 60 s ping timeout, which a stuck
/// writer cannot act on.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an instance writes its heartbeat and its connections' changes: one transaction per
/// instance per interval, however many frames flow. 2 s keeps the admin view and the
/// undelivered alert at most a few seconds behind.
pub(crate) const PRESENCE_INTERVAL: Duration = Duration::from_secs(2);
/// Failed authentications (401 or 403 for bad credentials on `/ws/pos/...`, `/broadcast`,
/// `/admin/...` and `/status...`) one address may make within a minute (`http::auth::AUTH_FAILURE_WINDOW`) before
/// its further failures are answered 429 for the cooling-off period. Keys are 256-bit random,
/// so the limit is not what makes guessing hopeless; it bounds the database lookups and log
/// lines a scanner costs. 50 a minute is far above what a misconfigured POS reconnecting with
/// any sane backoff (≥ 2 s) produces. Override with `--auth-failure-limit` (0 turns the limiter
/// off, e.g. behind a proxy that makes every client one address).
pub const AUTH_FAILURE_LIMIT: u32 = 50;
/// How long an address that hit the limit has its bad credentials answered 429 (with
/// `Retry-After`): long enough to make scanning pointless, short enough that a till fixed by a
/// human is not refused for long. Valid credentials are never refused by it.
pub(crate) const AUTH_COOLDOWN: Duration = Duration::from_secs(60);
/// Longest replay a socket performs from the event log. A POS that is further behind gets
/// `resync_required` (`replay_too_long`) and refetches over REST, which is cheaper for both
/// sides than 100,000 frames (about 100 MB of typical orders) through one socket; days of a
/// busy restaurant's events still replay.
pub const MAX_REPLAY_ROWS: i64 = 100_000;
/// How long a client may take to send a request's headers, counted from the request's first
/// byte (from the accept, for a new connection's first request). Real clients send a head in
/// one packet, within milliseconds; 10 s still covers retransmissions on a bad mobile link,
/// while a client that holds connections open by trickling headers (slowloris) loses each one
/// after 10 s instead of never. (hyper's default would be 30 s, nginx's 60 s: both let one
/// client hold many more connections for the same effort.)
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a keep-alive connection may sit idle between requests before it is closed. Reusing
/// a connection saves the web app's /broadcast client and a metrics scraper a handshake per
/// request, and 60 s covers the usual scrape intervals (15-60 s); past that an idle connection
/// only holds a socket and a task. It matches the idle timeouts that proxies and load balancers
/// default to (nginx, cloud load balancers: 60 s): set a proxy's upstream idle timeout below
/// it, so the proxy closes first and never sends a request on a connection being closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// WebSocket connections one instance holds at most. The service is sized and benchmarked for
/// 10,000 terminals at about 4 KiB each while idle (docs/benchmarks.md); 50,000 leaves room for
/// a fleet failing over from other instances, yet bounds what a flood of connections with valid
/// keys can take (≈ 200 MiB and 50,000 file descriptors) before the process itself suffers.
pub(crate) const MAX_CONNECTIONS: usize = 50_000;

/// WebSocket connections one API key may hold at once. A key belongs to one terminal
/// (docs/protocol.md), which needs one socket; but a till that loses its network reconnects
/// while the server still holds its old socket until the dead-peer deadline (60 s) drops it,
/// and a flaky link can do that twice within that minute. 4 covers those reconnects (and an
/// operator's `orderpush tail` with the same key), while a leaked key or a client stuck in a
/// reconnect loop cannot open thousands.
pub(crate) const MAX_CONNECTIONS_PER_KEY: usize = 4;

/// WebSocket connections one tenant may hold at once. The largest restaurant groups run a few
/// hundred terminals; 2,000 is several times that, reconnect overlap included, while no single
/// tenant (a misconfigured fleet, a set of leaked keys) can take more than 4 % of an instance's
/// [`MAX_CONNECTIONS`] away from everyone else.
pub(crate) const MAX_CONNECTIONS_PER_TENANT: usize = 2_000;

/// How long one DDL statement may wait for a table lock. While `CREATE TRIGGER` waits for a
/// lock on `orders`, every application write to `orders` queues behind it; 5 s is longer than
/// any healthy web-app transaction yet short enough that a stalled till sees a blip, not an
/// outage.
pub(crate) const MIGRATE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// [`MIGRATE_LOCK_TIMEOUT`] as `--lock-timeout` shows and parses it.
pub(crate) const MIGRATE_LOCK_TIMEOUT_TEXT: &str = "5s";
/// Attempts before `migrate` gives up on a lock: five tries spread over about half a minute
/// outlast an ordinary burst, and still fail a deploy quickly when a session holds a lock for
/// good (an idle-in-transaction connection) and a human must step in.
pub(crate) const MIGRATE_LOCK_ATTEMPTS: u32 = 5;

impl Default for Tuning {
    fn default() -> Self {
        Self {
            ping_interval: PING_INTERVAL,
            pong_timeout: PONG_TIMEOUT,
            client_queue_bytes: CLIENT_QUEUE_BYTES,
            client_queue_frames: CLIENT_QUEUE_FRAMES,
            revocation_check_interval: REVOCATION_CHECK_INTERVAL,
            prune_interval: PRUNE_INTERVAL,
            presence_interval: PRESENCE_INTERVAL,
            auth_failure_limit: AUTH_FAILURE_LIMIT,
            auth_cooldown: AUTH_COOLDOWN,
            drain_timeout: DRAIN_TIMEOUT,
            max_replay_rows: MAX_REPLAY_ROWS,
            http_header_timeout: HEADER_READ_TIMEOUT,
            http_idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_key: MAX_CONNECTIONS_PER_KEY,
            max_connections_per_tenant: MAX_CONNECTIONS_PER_TENANT,
            snapshot_max_orders: SNAPSHOT_MAX_ORDERS,
            snapshot_max_bytes: SNAPSHOT_MAX_BYTES,
            ack_timeout: parse_ack_timeout(ACK_TIMEOUT).expect("the default parses"),
            ack_check_interval: ACK_CHECK_INTERVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in [
            "",
            "24",
            "h",
            "0h",
            "-1h",
            "1.5h",
            "24 hours",
            "99999999999999999999d",
            "4000d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn connection_caps_must_be_whole_numbers_of_at_least_one() {
        assert_eq!(parse_cap("1"), Ok(1));
        assert_eq!(parse_cap("50000"), Ok(50_000));
        for bad in ["0", "", "-1", "4.5", "many"] {
            let e = parse_cap(bad).unwrap_err();
            assert!(e.contains("at least 1"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_text_defaults_parse() {
        assert!(LISTEN.parse::<SocketAddr>().is_ok());
        assert_eq!(parse_duration(RETENTION), Ok(Duration::from_secs(86_400)));
        assert!(TAIL_URL.starts_with("ws://"));
        assert_eq!(
            parse_ack_timeout(ACK_TIMEOUT),
            Ok(AckTimeout(Some(Duration::from_secs(60))))
        );
    }

    #[test]
    fn the_ack_timeout_is_a_duration_up_to_a_day_or_off() {
        assert_eq!(parse_ack_timeout("off"), Ok(AckTimeout(None)));
        assert_eq!(parse_ack_timeout("off").unwrap().as_secs(), 0);
        assert_eq!(parse_ack_timeout("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_ack_timeout("24h").unwrap().as_secs(), 86_400);
        for bad in ["25h", "0s", "60", "soon", ""] {
            assert!(parse_ack_timeout(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_lock_timeout_flag_defaults_to_the_named_constant() {
        assert_eq!(
            parse_duration(MIGRATE_LOCK_TIMEOUT_TEXT),
            Ok(MIGRATE_LOCK_TIMEOUT)
        );
    }

    #[test]
    fn short_or_blank_tokens_are_rejected() {
        assert!(parse_token("short").is_err());
        assert!(parse_token("has a space in it, long").is_err());
        assert!(parse_token("0123456789abcdef").is_ok());
    }
}
