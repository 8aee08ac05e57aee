//! The `orderpush` binary's subcommands (README.md, "Commands"), run as a user would.

use std::process::{Command, Output};

use crate::common::*;

fn orderpush(db: &TestDb, args: &[&str]) -> Output {
    orderpush_cli(db, args)
}

#[tokio::test]
async fn keys_create_list_and_revoke() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;

    let out = orderpush(
        &db,
        &["keys", "create", "--tenant", "kitchen", "--label", "till 1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout);
    let key = key.strip_suffix('\n').expect("one line");
    assert!(
        orderpush::db::keys::is_well_formed(key),
        "stdout is the key alone: {key:?}"
    );
    let stored: Vec<u8> = db
        .client()
        .await
        .query_one("SELECT key_hash FROM orderpush.api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored,
        orderpush::db::keys::hash(key).to_vec(),
        "only the hash is stored"
    );

    let out = orderpush(&db, &["keys", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["tenant"], "kitchen");
    assert_eq!(list[0]["label"], "till 1");
    assert!(list[0]["revoked"].is_null());
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert!(
        text(&orderpush(&db, &["keys", "create", "--tenant", "kitchen"]).stderr)
            .contains("created key")
    );

    let out = orderpush(&db, &["keys", "revoke", &id]);
    assert!(out.status.success());
    let out = orderpush(&db, &["keys", "list", "--tenant", "kitchen"]);
    let table = text(&out.stdout);
    let line = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(
        !line.trim_end().ends_with('-'),
        "revoked time shown: {line}"
    );
}

#[tokio::test]
async fn bad_input_fails_clearly_and_changes_nothing() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let out = orderpush(&db, &["keys", "create", "--tenant", "nowhere"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown tenant 'nowhere'"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    let out = orderpush(&db, &["keys", "revoke", "doesnotexist"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no key with id"));
    for args in [
        &["serve", "--retention", "0h"][..],
        &["serve", "--retention", "banana"],
        &["serve", "--listen", "not-an-address"],
        &["serve", "--broadcast-token", "short"],
        &["prune", "--older-than=-5m"],
    ] {
        let out = orderpush(&db, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("invalid value"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .args(["migrate"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("DATABASE_URL"));
    assert_eq!(
        db.client()
            .await
            .query_one("SELECT count(*) FROM orderpush.api_keys", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

#[tokio::test]
async fn prune_deletes_old_events() {
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let client = db.client().await;
    insert_loyalty(&client, "kitchen", 1).await;
    insert_loyalty(&client, "kitchen", 2).await;
    number_staged(&db).await;
    client
        .execute(
            "UPDATE orderpush.events SET emitted_at = now() - interval '3 hours' WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    let out = orderpush(&db, &["prune", "--older-than", "2h"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("deleted 1 events"));
    assert_eq!(db.event_count().await, 1);
}

#[test]
fn help_lists_the_subcommands() {
    let out = Command::new(env!("CARGO_BIN_EXE_orderpush"))
        .arg("--help")
        .output()
        .unwrap();
    let help = text(&out.stdout);
    for sub in ["serve", "migrate", "keys", "prune"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn zero_connection_caps_are_refused_at_start() {
    let run = |args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderpush"));
        cmd.args(args).env_remove("DATABASE_URL");
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        cmd.output().unwrap()
    };
    for (args, env, flag) in [
        (
            &["serve", "--max-connections", "0"][..],
            None,
            "--max-connections",
        ),
        (
            &["serve", "--max-connections-per-key", "0"],
            None,
            "--max-connections-per-key",
        ),
        (
            &["serve", "--max-connections-per-tenant", "0"],
            None,
            "--max-connections-per-tenant",
        ),
        (
            &["serve"],
            Some(("ORDERPUSH_MAX_CONNECTIONS_PER_KEY", "0")),
            "--max-connections-per-key",
        ),
        (
            &["serve", "--max-connections=-3"],
            None,
            "--max-connections",
        ),
    ] {
        let out = run(args, env);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("at least 1"),
            "{args:?} {env:?}: {stderr}"
        );
    }
}

#[test]
fn a_bad_ack_timeout_is_refused_with_the_rule() {
    for (args, env) in [
        (&["serve", "--ack-timeout", "25h"][..], None),
        (&["serve", "--ack-timeout", "60"], None),
        (&["serve", "--ack-timeout", "0s"], None),
        (&["serve"], Some(("ORDERPUSH_ACK_TIMEOUT", "soon"))),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderpush"));
        cmd.args(args).env_remove("DATABASE_URL");
        if let Some((name, value)) = env {
            cmd.env(name, value);
        }
        let out = cmd.output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains("--ack-timeout"),
            "{args:?} {env:?}: {stderr}"
        );
    }
}
