//! `orderpush triggers`: per application table, which orderpush triggers are installed and
//! enabled, the wake-up mode and the `new_order` sources, as a table or JSON.

use std::fmt::Write as _;

use super::CliError;
use crate::config::TriggersArgs;
use crate::db::{
    self,
    triggers::{self, Report, TriggerState},
};

/// Prints the trigger report.
pub async fn run(args: TriggersArgs) -> Result<(), CliError> {
    let client = db::connect(args.db.database()?, "orderpush-cli").await?;
    let report = triggers::report(&client).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// The report as a text table for people.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    if !report.installed {
        s.push_str("orderpush is not installed in this database (run `orderpush migrate`).\n");
    }
    let _ = writeln!(s, "wake-up mode:      {}", report.wakeup);
    let _ = writeln!(
        s,
        "new_order sources: {}\n",
        if report.new_order_sources.is_empty() {
            "(none: no order emits new_order)".to_owned()
        } else {
            report.new_order_sources.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "{:<30} {:<32} {:<20} {:<9} STATE",
        "TABLE", "TRIGGER", "EVENT", "TIMING"
    );
    for t in &report.tables {
        if !t.exists {
            let _ = writeln!(s, "{:<30} (table does not exist)", t.table);
            continue;
        }
        if t.triggers.is_empty() {
            let _ = writeln!(s, "{:<30} (no orderpush trigger)", t.table);
        }
        for tr in &t.triggers {
            let _ = writeln!(
                s,
                "{:<30} {:<32} {:<20} {:<9} {}",
                t.table,
                tr.name,
                tr.event.as_deref().unwrap_or("-"),
                match tr.state {
                    TriggerState::Missing => "-",
                    _ if tr.deferred => "commit",
                    _ => "row",
                },
                tr.state.as_str()
            );
        }
    }
    s
}
