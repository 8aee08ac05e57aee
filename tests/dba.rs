//! The DBA's tools: `migrate status` / `--dry-run`, the migration lock timeout and its retries,
//! `triggers`, the copy-paste controls of docs/dba.md, and `uninstall`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn orderpush(db: &TestDb, args: &[&str]) -> Output {
    orderpush_cli(db, args)
}

/// Everything a migration could change: relations, functions, triggers, schemas, history rows.
async fn fingerprint(db: &TestDb) -> String {
    let c = db.client().await;
    let mut s: String = c
        .query_one(
            "SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
                 SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                 UNION ALL
                 SELECT 'fn ' || n.nspname || '.' || p.proname
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                 UNION ALL
                 SELECT 'trg ' || tgname || ' ' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal
                 UNION ALL
                 SELECT 'ns ' || nspname FROM pg_namespace) s(x)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let history: bool = c
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if history {
        for r in c
            .query(
                "SELECT version || ' ' || name || ' ' || checksum FROM refinery_schema_history ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
        {
            s.push_str(&r.get::<_, String>(0));
        }
    }
    s
}

fn status_json(db: &TestDb) -> Vec<Value> {
    let out = orderpush(db, &["migrate", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

async fn migrate_to(db: &TestDb, version: i32) {
    let options = orderpush::db::migrate::Options {
        target: Some(version),
        ..Default::default()
    };
    orderpush::db::migrate::apply(&db.config, &options)
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_status_lists_applied_and_pending() {
    let db = TestDb::create_empty().await;
    migrate_to(&db, 1).await;
    let list = status_json(&db);
    assert_eq!(list[0]["version"], 1);
    assert_eq!(list[0]["name"], "application_tables");
    assert_eq!(list[0]["state"], "applied");
    assert!(list[0]["applied_on"].as_str().unwrap().starts_with("20"));
    assert_eq!(list[0]["checksum"], list[0]["applied_checksum"]);
    assert_eq!(list[1]["version"], 2);
    assert_eq!(list[1]["state"], "pending");
    assert!(list[1]["applied_on"].is_null());

    let out = orderpush(&db, &["migrate", "status"]);
    let table = text(&out.stdout);
    let v2 = table
        .lines()
        .find(|l| l.contains("orderpush_event_log"))
        .unwrap();
    assert!(v2.contains("pending"), "{table}");
    // Every migration after V1 is pending (V2, and any added since, e.g. V3 presence).
    let pending = list.iter().filter(|m| m["state"] == "pending").count();
    assert!(pending >= 1);
    assert!(table.contains(&format!("{pending} pending")), "{table}");

    // A migration edited after it ran is flagged, not hidden.
    db.client()
        .await
        .execute(
            "UPDATE refinery_schema_history SET checksum = '42' WHERE version = 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(status_json(&db)[0]["state"], "divergent");
    let out = orderpush(&db, &["migrate", "--dry-run"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("another checksum"));
}

#[tokio::test]
async fn dry_run_prints_the_sql_in_order_and_changes_nothing() {
    let db = TestDb::create_empty().await;
    let before = fingerprint(&db).await;
    let out = orderpush(&db, &["migrate", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fingerprint(&db).await,
        before,
        "dry run changed the database"
    );
    let sql = text(&out.stdout);
    let v1 = sql
        .find("-- ==== V1__application_tables")
        .expect("V1 shown");
    let v2 = sql
        .find("-- ==== V2__orderpush_event_log")
        .expect("V2 shown");
    assert!(v1 < v2, "in order");
    assert!(sql.contains("CREATE CONSTRAINT TRIGGER orderpush_new_order"));
    assert!(sql.contains("SET lock_timeout"));
    assert!(text(&out.stderr).contains("nothing was changed"));

    // The script is faithful: run by hand, it leaves exactly what `migrate` would.
    db.client().await.batch_execute(&sql).await.unwrap();
    assert!(status_json(&db).iter().all(|m| m["state"] == "applied"));
    let out = orderpush(&db, &["migrate"]);
    assert!(
        text(&out.stderr).contains("up to date"),
        "{}",
        text(&out.stderr)
    );
    let out = orderpush(&db, &["migrate", "--dry-run"]);
    assert!(text(&out.stdout).contains("up to date"));
    assert!(!text(&out.stdout).contains("CREATE"));
}

/// A web-app transaction that wrote to `orders` and stays open: it holds ROW EXCLUSIVE on
/// `orders`, which conflicts with `CREATE TRIGGER`.
async fn busy_writer(db: &TestDb) -> tokio_postgres::Client {
    db.tenant("kitchen").await;
    let c = db.client().await;
    c.batch_execute(
        "SET application_name = 'busy-web-app';
         BEGIN;
         INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount)
         VALUES ('kitchen', 'K-1', 'delivery', 'pos', 'pending', 1.00);",
    )
    .await
    .unwrap();
    c
}

/// A running `orderpush migrate` whose stderr lines arrive on a channel; killed on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(db: &TestDb, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderpush"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing every one of `needles`.
    async fn expect_line(&mut self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l.clone());
                if needles.iter().all(|n| l.contains(n)) {
                    return l;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no line with {needles:?}; stderr so far:\n{}",
                self.seen.join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to exit; returns success and everything it wrote to stderr.
    async fn finish(&mut self) -> (bool, String) {
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(tokio::time::Instant::now() < deadline, "did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The reader thread ends at EOF; give it a moment to hand over the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        (status.success(), self.seen.join("\n"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn migrate_names_the_blocking_session_and_succeeds_once_it_ends() {
    let db = TestDb::create_empty().await;
    migrate_to(&db, 1).await;
    let app = busy_writer(&db).await;
    let mut run = Running::start(
        &db,
        &["migrate", "--lock-timeout", "1s", "--attempts", "10"],
    );
    let line = run
        .expect_line(&["V2__orderpush_event_log", "public.orders", "retrying"])
        .await;
    assert!(line.contains("busy-web-app"), "{line}");
    assert!(line.contains("idle in transaction"), "{line}");
    assert!(line.contains("INSERT INTO orders"), "{line}");
    // Meanwhile nothing of V2 is half-applied, and the app's writes were never blocked for good.
    assert_eq!(status_json(&db)[1]["state"], "pending");
    app.batch_execute("COMMIT").await.unwrap();
    let (ok, stderr) = run.finish().await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("applied V2__orderpush_event_log"),
        "{stderr}"
    );
    assert!(status_json(&db).iter().all(|m| m["state"] == "applied"));
}

#[tokio::test]
async fn migrate_gives_up_with_a_clear_message_when_the_lock_stays_held() {
    let db = TestDb::create_empty().await;
    migrate_to(&db, 1).await;
    let _app = busy_writer(&db).await;
    let before = fingerprint(&db).await;
    let mut run = Running::start(&db, &["migrate", "--lock-timeout", "1s", "--attempts", "2"]);
    let (ok, stderr) = run.finish().await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("attempt 1 of 2 failed"), "{stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: gave up after 2 attempt(s)"),
        "{last}"
    );
    assert!(last.contains("public.orders"), "{last}");
    assert!(last.contains("busy-web-app"), "{last}");
    assert_eq!(fingerprint(&db).await, before, "nothing of V2 stays behind");
}

fn trigger<'a>(report: &'a Value, table: &str, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .and_then(|t| {
            t["triggers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == name)
        })
        .unwrap_or_else(|| panic!("{table} {name} in {report}"))
}

fn triggers_json(db: &TestDb) -> Value {
    let out = orderpush(db, &["triggers", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn triggers_shows_what_is_installed_and_enabled() {
    let db = TestDb::create().await;
    let report = triggers_json(&db);
    assert_eq!(report["installed"], true);
    assert_eq!(report["wakeup"], "gated", "the default");
    assert_eq!(report["new_order_sources"], serde_json::json!(["online"]));
    for (table, name) in [
        ("public.orders", "orderpush_new_order"),
        ("public.orders", "orderpush_order_updated"),
        ("public.gift_cards", "orderpush_gift_card_purchased"),
        ("public.loyalty_transactions", "orderpush_loyalty_updated"),
    ] {
        let t = trigger(&report, table, name);
        assert_eq!(t["state"], "enabled", "{t}");
        // Plain AFTER ROW triggers: the row is staged at the end of its statement and numbered
        // after commit (docs/architecture.md).
        assert_eq!(t["deferred"], false);
    }

    let c = db.client().await;
    c.batch_execute(&format!(
        "ALTER TABLE public.orders DISABLE TRIGGER orderpush_order_updated;
         DROP TRIGGER orderpush_loyalty_updated ON public.loyalty_transactions;
         ALTER DATABASE {} SET orderpush.wakeup = 'gated';",
        db.name
    ))
    .await
    .unwrap();
    let report = triggers_json(&db);
    assert_eq!(
        trigger(&report, "public.orders", "orderpush_order_updated")["state"],
        "disabled"
    );
    assert_eq!(
        trigger(&report, "public.orders", "orderpush_order_updated")["enabled"],
        false
    );
    assert_eq!(
        trigger(&report, "public.orders", "orderpush_new_order")["state"],
        "enabled"
    );
    assert_eq!(
        trigger(
            &report,
            "public.loyalty_transactions",
            "orderpush_loyalty_updated"
        )["state"],
        "missing"
    );
    assert_eq!(report["wakeup"], "gated");

    let out = orderpush(&db, &["triggers"]);
    let table = text(&out.stdout);
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} in\n{table}"))
            .to_owned()
    };
    assert!(
        line("orderpush_order_updated").ends_with("DISABLED"),
        "{table}"
    );
    assert!(line("orderpush_new_order").ends_with("enabled"), "{table}");
    assert!(
        line("orderpush_loyalty_updated").ends_with("MISSING"),
        "{table}"
    );
    assert!(line("public.order_items").contains("no orderpush trigger"));
    assert!(table.contains("wake-up mode:      gated"), "{table}");
}

// docs/dba.md's copy-paste SQL, verbatim: the test fails if the docs drift from what works.
const ADD_SOURCE: &str = "INSERT INTO orderpush.new_order_sources (order_source) VALUES ('kiosk');";
const REMOVE_SOURCE: &str =
    "DELETE FROM orderpush.new_order_sources WHERE order_source = 'online';";
const DISABLE_GIFT_CARDS: &str =
    "ALTER TABLE public.gift_cards DISABLE TRIGGER orderpush_gift_card_purchased;";
const ENABLE_GIFT_CARDS: &str =
    "ALTER TABLE public.gift_cards ENABLE TRIGGER orderpush_gift_card_purchased;";
const BULK_JOB: &str = "BEGIN;
SET LOCAL orderpush.suppress = 'on';
UPDATE public.orders SET status = 'cancelled'
WHERE status = 'pending' AND created_at < now() - interval '1 day';
COMMIT;";

#[tokio::test]
async fn the_documented_dba_controls_work() {
    for snippet in [
        ADD_SOURCE,
        REMOVE_SOURCE,
        DISABLE_GIFT_CARDS,
        ENABLE_GIFT_CARDS,
        BULK_JOB,
    ] {
        assert!(
            DBA_MD.contains(snippet),
            "docs/dba.md lost this snippet:\n{snippet}"
        );
    }
    let OneTenant { db, key, server } = one_tenant("kitchen").await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    let c = db.client().await;
    let order = |source: &'static str, number: &'static str| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount, created_at)
                 VALUES ('kitchen', $1, 'collection', $2, 'pending', 5.00, now() - interval '2 days')",
                &[&number, &source],
            )
            .await
            .unwrap();
        }
    };

    // Sources: kiosk orders are silent until the DBA adds the source; online ones stop after.
    // The set applies when an order is numbered, milliseconds after its commit: wait for that.
    order("kiosk", "KIOSK-1").await;
    db.wait_numbered().await;
    c.batch_execute(ADD_SOURCE).await.unwrap();
    c.batch_execute(REMOVE_SOURCE).await.unwrap();
    order("online", "WEB-1").await;
    order("kiosk", "KIOSK-2").await;
    let ev = pos.next().await;
    assert_eq!(
        (ev["type"].as_str(), ev["data"]["orderNumber"].as_str()),
        (Some("new_order"), Some("KIOSK-2")),
        "{ev}"
    );
    assert_eq!(ev["id"], 1, "KIOSK-1 and WEB-1 emitted nothing");

    // Per table: gift cards off, then on again.
    let gift = |n: &'static str| {
        let c = &c;
        async move {
            c.execute(
                "INSERT INTO gift_cards (tenant_slug, card_number, initial_balance, current_balance)
                 VALUES ('kitchen', $1, 10, 10)",
                &[&n],
            )
            .await
            .unwrap();
        }
    };
    c.batch_execute(DISABLE_GIFT_CARDS).await.unwrap();
    gift("GC-OFF").await;
    c.batch_execute(ENABLE_GIFT_CARDS).await.unwrap();
    gift("GC-ON").await;
    let ev = pos.next().await;
    assert_eq!(ev["type"], "gift_card_purchased");
    assert_eq!(ev["data"]["cardNumber"], "GC-ON");
    assert_eq!(ev["id"], 2);

    // A quiet bulk job: no order_updated per row, one resync_required for the tenant.
    c.batch_execute(BULK_JOB).await.unwrap();
    let cancelled: i64 = c
        .query_one(
            "SELECT count(*) FROM orders WHERE status = 'cancelled'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cancelled, 3, "the job changed the rows");
    let ev = pos.next().await;
    assert_eq!(ev["type"], "resync_required", "{ev}");
    assert_eq!(ev["data"]["reason"], "suppressed");
    assert_eq!(ev["id"], 3);
    insert_loyalty(&c, "kitchen", 5).await;
    let ev = pos.next().await;
    assert_eq!(
        ev["type"], "loyalty_updated",
        "nothing else in between: {ev}"
    );
    assert_eq!(ev["id"], 4);
}

#[tokio::test]
async fn uninstall_removes_orderpush_and_leaves_the_app_alone() {
    assert!(
        DBA_MD.contains(orderpush::db::uninstall::UNINSTALL_SQL),
        "docs/dba.md must carry the uninstall SQL verbatim"
    );
    let db = TestDb::create().await;
    db.tenant("kitchen").await;
    let _key = db.key("kitchen").await;
    let mut c = db.client().await;
    insert_order(&mut c, "kitchen", "KIT-1", 2).await;
    insert_loyalty(&c, "kitchen", 3).await;
    c.batch_execute(&format!(
        "ALTER DATABASE {} SET orderpush.wakeup = 'poll'",
        db.name
    ))
    .await
    .unwrap();
    let app_rows = "SELECT (SELECT count(*) FROM tenants) || '/' || (SELECT count(*) FROM orders) || '/' ||
                           (SELECT count(*) FROM order_items) || '/' || (SELECT count(*) FROM loyalty_transactions)";
    let rows_before: String = c.query_one(app_rows, &[]).await.unwrap().get(0);

    // Without --yes: prints the SQL, refuses, changes nothing.
    let out = orderpush(&db, &["uninstall"]);
    assert!(!out.status.success());
    assert_eq!(text(&out.stdout), orderpush::db::uninstall::UNINSTALL_SQL);
    assert!(text(&out.stderr).contains("nothing was changed"));
    // With a server running: refuses, naming it.
    let server = TestServer::builder(&db).start().await;
    let out = orderpush(&db, &["uninstall", "--yes"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("stop every `orderpush serve` first"),
        "{}",
        text(&out.stderr)
    );
    db.wait_numbered().await;
    assert_eq!(db.event_count().await, 2);
    server.stop().await;
    // The server's sessions end a moment after its sockets close.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !orderpush::db::uninstall::other_sessions(&db.client().await)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server sessions linger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = orderpush(&db, &["uninstall", "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("2 event(s) and 1 API key(s) deleted"),
        "{}",
        text(&out.stderr)
    );
    let c = db.client().await;
    let rows_after: String = c.query_one(app_rows, &[]).await.unwrap().get(0);
    assert_eq!(rows_after, rows_before, "application data untouched");
    let leftovers: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'orderpush')
                  + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'orderpush%')
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'orderpush')
                  + (SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
                     WHERE d.datname = current_database())
                  + (SELECT count(*) FROM pg_class WHERE relname = 'refinery_schema_history')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leftovers, 0, "no orderpush object remains");
    // The app keeps working without orderpush.
    let mut c = db.client().await;
    insert_order(&mut c, "kitchen", "KIT-2", 1).await;
    c.execute("UPDATE orders SET status = 'ready'", &[])
        .await
        .unwrap();
    let report = triggers_json(&db);
    assert_eq!(report["installed"], false);
    // Idempotent.
    assert!(orderpush(&db, &["uninstall", "--yes"]).status.success());

    // And it can come back.
    let out = orderpush(&db, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(status_json(&db).iter().all(|m| m["state"] == "applied"));
    insert_order(&mut c, "kitchen", "KIT-3", 1).await;
    assert_eq!(
        db.staged_count().await,
        1,
        "triggers stage again after reinstall"
    );
    let rows: i64 = c
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3);
}

// docs/dba.md's adaptation example, verbatim.
const ADAPT: &str = "INSERT INTO orderpush.field_columns (kind, field, column_name) VALUES
    ('new_order', 'customerPhone', 'phone'),
    ('new_order', 'specialInstructions', 'notes'),
    ('new_order', 'items.selectedAddons', 'addons');";

#[tokio::test]
async fn other_column_names_are_mapped_without_touching_the_triggers() {
    assert!(
        DBA_MD.contains(ADAPT),
        "docs/dba.md lost the adaptation example"
    );
    // An existing schema whose column names differ from the reference tables.
    let db = TestDb::create_empty().await;
    migrate_to(&db, 1).await;
    let c = db.client().await;
    c.batch_execute(
        "ALTER TABLE orders RENAME COLUMN customer_phone TO phone;
         ALTER TABLE orders RENAME COLUMN special_instructions TO notes;
         ALTER TABLE order_items RENAME COLUMN selected_addons TO addons;
         INSERT INTO tenants (slug, name) VALUES ('kitchen', 'Kitchen');",
    )
    .await
    .unwrap();
    let out = orderpush(&db, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = db.key("kitchen").await;
    let server = TestServer::builder(&db).start().await;
    let mut pos = Pos::connect(&server, "kitchen", &key, None).await;
    let order = |number: &'static str| {
        let c = &c;
        async move {
            c.batch_execute(&format!(
                "BEGIN;
                 WITH o AS (
                   INSERT INTO orders (tenant_slug, order_number, order_type, order_source, status, total_amount, phone, notes)
                   VALUES ('kitchen', '{number}', 'delivery', 'online', 'confirmed', 12.50, '07700900999', 'Back door')
                   RETURNING id)
                 INSERT INTO order_items (order_id, name, quantity, price, addons)
                 SELECT id, 'Soup', 1, 12.50, '[{{\"name\": \"Bread\", \"price\": 0}}]' FROM o;
                 COMMIT;"
            ))
            .await
            .unwrap();
        }
    };
    // Before the mapping: the writes succeed, and the fields whose columns are gone are null.
    order("KIT-8").await;
    let ev = pos.next().await;
    assert_eq!(ev["data"]["orderNumber"], "KIT-8");
    assert_eq!(ev["data"]["customerPhone"], Value::Null);
    assert_eq!(ev["data"]["items"][0]["selectedAddons"], Value::Null);
    // After it: read from the DBA's columns, from the next order on.
    c.batch_execute(ADAPT).await.unwrap();
    order("KIT-9").await;
    let ev = pos.next().await;
    assert_eq!(ev["type"], "new_order");
    assert_eq!(ev["data"]["orderNumber"], "KIT-9");
    assert_eq!(ev["data"]["customerPhone"], "07700900999");
    assert_eq!(ev["data"]["specialInstructions"], "Back door");
    assert_eq!(ev["data"]["items"][0]["selectedAddons"][0]["name"], "Bread");
    server.stop().await;
}

#[tokio::test]
async fn bad_dba_input_fails_clearly_and_changes_nothing() {
    let db = TestDb::create_empty().await;
    migrate_to(&db, 1).await;
    let before = fingerprint(&db).await;
    let out = orderpush(&db, &["migrate", "--target", "99"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no migration has version 99"),
        "{}",
        text(&out.stderr)
    );
    let out = orderpush(&db, &["migrate", "--dry-run", "--target", "99"]);
    assert!(!out.status.success());
    for args in [
        &["migrate", "--single-transaction"][..],
        &["migrate", "--attempts", "0"],
        &["migrate", "--attempts", "1000"],
        &["migrate", "--lock-timeout", "0s"],
        &["migrate", "status", "--dry-run"],
        &["tail", "--tenant", "kitchen"],
    ] {
        let out = orderpush(&db, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(fingerprint(&db).await, before);
    let help = text(
        &Command::new(env!("CARGO_BIN_EXE_orderpush"))
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    );
    for sub in ["triggers", "uninstall", "tail"] {
        assert!(help.contains(sub), "{help}");
    }
}

/// The version before the staged write path: events numbered in the writers' transactions.
const BEFORE_STAGING: i32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_in_place_under_writers_loses_nothing_and_ids_continue() {
    let db = TestDb::create_empty().await;
    migrate_to(&db, BEFORE_STAGING).await;
    db.tenant("kitchen").await;
    let key = db.key("kitchen").await;
    let c = db.client().await;
    for i in 1..=5 {
        insert_loyalty(&c, "kitchen", i).await;
    }
    assert_eq!(db.event_count().await, 5, "numbered the old way, at commit");

    // An instance of the old version is connected: migrate refuses and names it.
    let mut old = db.config.clone();
    old.application_name("orderpush-listener");
    let old = connect(&old).await;
    let out = orderpush(&db, &["migrate"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("older orderpush are still connected") && err.contains("orderpush-listener"),
        "{err}"
    );
    assert!(
        status_json(&db).iter().any(|m| m["state"] == "pending"),
        "nothing applied"
    );
    drop(old);
    eventually("the old session is gone", WAIT, || async {
        session_pids(&c, &db.name, "orderpush-listener")
            .await
            .is_empty()
    })
    .await;

    // Writers keep writing through the upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let w = db.client().await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut i = 5;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                insert_loyalty(&w, "kitchen", i).await;
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = tokio::task::block_in_place(|| orderpush(&db, &["migrate"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();

    let server = TestServer::builder(&db).start().await;
    db.wait_numbered().await;
    let log = event_log(&c, "kitchen").await;
    let points: Vec<i64> = log
        .iter()
        .map(|e| e["data"]["pointsChange"].as_i64().unwrap())
        .collect();
    assert_eq!(
        points,
        (1..=written as i64).collect::<Vec<_>>(),
        "every write, once, in order"
    );
    let ids: Vec<i64> = log.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=written as i64).collect::<Vec<_>>(),
        "ids continue without a gap"
    );
    let mut pos = Pos::connect(&server, "kitchen", &key, Some(3)).await;
    assert_eq!(
        pos.next().await["id"],
        4,
        "a POS resumes across the upgrade"
    );
}
