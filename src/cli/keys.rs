//! `orderpush keys create|list|revoke`: POS keys, the secret printed once, the list as a table
//! or JSON.

use std::fmt::Write as _;

use super::CliError;
use crate::config::{KeysArgs, KeysCommand};
use crate::db::{self, keys, keys::KeyInfo};

/// Runs one key operation.
pub async fn run(args: KeysArgs) -> Result<(), CliError> {
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
                print!("{}", render_list(&list));
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
    Ok(())
}

/// `keys list` as a text table for people.
pub(crate) fn render_list(keys: &[KeyInfo]) -> String {
    let mut s = format!(
        "{:<14} {:<24} {:<24} {:<26} REVOKED\n",
        "ID", "TENANT", "LABEL", "CREATED"
    );
    for k in keys {
        let _ = writeln!(
            s,
            "{:<14} {:<24} {:<24} {:<26} {}",
            k.id,
            k.tenant,
            k.label.as_deref().unwrap_or_default(),
            k.created,
            k.revoked.as_deref().unwrap_or("-")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_list_is_a_table_with_dashes_for_what_is_missing() {
        let keys = [
            KeyInfo {
                id: "k_1".into(),
                tenant: "kitchen".into(),
                label: Some("front till".into()),
                created: "2026-01-01T00:00:00.000Z".into(),
                revoked: None,
            },
            KeyInfo {
                id: "k_2".into(),
                tenant: "bistro".into(),
                label: None,
                created: "2026-01-02T00:00:00.000Z".into(),
                revoked: Some("2026-01-03T00:00:00.000Z".into()),
            },
        ];
        let table = render_list(&keys);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0], ["ID", "TENANT", "LABEL", "CREATED", "REVOKED"]);
        assert_eq!(
            lines[1],
            [
                "k_1",
                "kitchen",
                "front",
                "till",
                "2026-01-01T00:00:00.000Z",
                "-"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "k_2",
                "bistro",
                "2026-01-02T00:00:00.000Z",
                "2026-01-03T00:00:00.000Z"
            ]
        );
        assert_eq!(lines.len(), 3);
    }
}
