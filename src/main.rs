//! The `orderpush` binary: parses the command line, starts tracing, runs one subcommand.

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use orderpush::config::{Cli, Command, KeysCommand, LogFormat, MigrateCommand, Tuning};
use orderpush::db::{self, events, keys, migrate, triggers, uninstall};
use orderpush::server::{self, ServerConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a terminal: piped or captured logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let listener = server::bind(args.listen)
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            let shutdown = CancellationToken::new();
            // Deliberately detached: it lives as long as the process and only cancels a token.
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let config = ServerConfig {
                database: args.db.database()?.clone(),
                broadcast_token: args.broadcast_token,
                admin_token: args.admin_token,
                retention: args.retention,
                migrate: !args.no_migrate,
                tuning: Tuning {
                    auth_failure_limit: args.auth_failure_limit,
                    max_connections: args.max_connections,
                    max_connections_per_key: args.max_connections_per_key,
                    max_connections_per_tenant: args.max_connections_per_tenant,
                    ..Tuning::default()
                },
            };
            server::run(listener, config, shutdown).await?;
        }
        Command::Migrate(args) => {
            let database = args.db.database()?;
            let options = migrate::Options {
                lock_timeout: args.lock_timeout,
                attempts: args.attempts,
                target: args.target,
            };
            match args.command {
                Some(MigrateCommand::Status { json }) => {
                    let statuses = migrate::status(database).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&statuses)?);
                    } else {
                        print!("{}", migrate::render_status(&statuses));
                    }
                }
                None if args.dry_run => {
                    let (sql, names) =
                        migrate::dry_run(database, &options, args.single_transaction).await?;
                    print!("{sql}");
                    eprintln!(
                        "dry run: {} migration(s) would be applied{}; nothing was changed",
                        names.len(),
                        if names.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", names.join(", "))
                        }
                    );
                }
                None => {
                    let applied = migrate::apply(database, &options).await?;
                    if applied.is_empty() {
                        eprintln!("database is up to date");
                    }
                    for name in applied {
                        eprintln!("applied {name}");
                    }
                }
            }
        }
        Command::Triggers(args) => {
            let client = db::connect(args.db.database()?, "orderpush-cli").await?;
            let report = triggers::report(&client).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", triggers::render(&report));
            }
        }
        Command::Uninstall(args) => {
            if !args.yes {
                print!("{}", uninstall::UNINSTALL_SQL);
                bail!(
                    "nothing was changed: the SQL above is what `orderpush uninstall --yes` runs"
                );
            }
            let client = db::connect(args.db.database()?, "orderpush-uninstall").await?;
            let removed = uninstall::uninstall(&client).await?;
            if removed.schema_existed {
                eprintln!(
                    "removed orderpush: {} event(s) and {} API key(s) deleted; application tables untouched",
                    removed.events, removed.keys
                );
            } else {
                eprintln!("orderpush was not installed; removed any leftovers");
            }
        }
        Command::Tail(args) => {
            let shutdown = CancellationToken::new();
            // Deliberately detached: it lives as long as the process and only cancels a token.
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let options = orderpush::tail::Options {
                url: args.url,
                tenant: args.tenant,
                key: args.key,
                since: args.since,
            };
            orderpush::tail::run(options, print_event, shutdown).await?;
        }
        Command::Keys(args) => {
            let client = db::connect(args.db.database()?, "orderpush-cli").await?;
            match args.command {
                KeysCommand::Create { tenant, label } => {
                    let key = keys::create(&client, &tenant, label.as_deref()).await?;
                    eprintln!("created key {} for tenant {tenant}", key.id);
                    println!("{}", key.secret);
                }
                KeysCommand::List { tenant, json } => {
                    let list = keys::list(&client, tenant.as_deref()).await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&list)?);
                    } else {
                        println!(
                            "{:<14} {:<24} {:<24} {:<26} REVOKED",
                            "ID", "TENANT", "LABEL", "CREATED"
                        );
                        for k in list {
                            println!(
                                "{:<14} {:<24} {:<24} {:<26} {}",
                                k.id,
                                k.tenant,
                                k.label.unwrap_or_default(),
                                k.created,
                                k.revoked.unwrap_or_else(|| "-".into())
                            );
                        }
                    }
                }
                KeysCommand::Revoke { id } => {
                    if keys::revoke(&client, &id).await? {
                        eprintln!("revoked key {id}; its connections close within seconds");
                    } else {
                        eprintln!("key {id} was already revoked");
                    }
                }
            }
        }
        Command::Prune(args) => {
            let client = db::connect(args.db.database()?, "orderpush-prune").await?;
            if !events::installed(&client).await? {
                bail!("the database has no orderpush schema: run `orderpush migrate` first");
            }
            let n = events::prune(&client, args.older_than).await?;
            eprintln!("deleted {n} events older than {:?}", args.older_than);
        }
    }
    Ok(())
}

/// `tail`'s output: one pretty-printed JSON document per event (keys in the order sent), flushed
/// at once so a pipe sees it.
fn print_event(event: &serde_json::Value, raw: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match event {
        serde_json::Value::String(s) if !raw.trim_start().starts_with('"') => writeln!(out, "{s}")?,
        _ => writeln!(out, "{}", orderpush::tail::pretty(raw))?,
    }
    out.flush()
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested; closing connections");
    shutdown.cancel();
}
