//! docs/dba.md's list of installed objects ("What the migrations install, and why") checked
//! against a freshly migrated database, both ways: nothing listed that the migrations do not
//! leave, nothing left that is not listed.
//!
//! The list is read from the table's first column: every backticked name is an object, of the
//! kind named by the word before it ("table `orderpush.heads`", "indexes `a`, `b`", "trigger
//! `x` on `public.orders`"); a name after "on" is the table a trigger belongs to, not an object.
//! The database side is read from the catalog, not from the migrations' text.

use std::collections::BTreeSet;
use std::fmt;

use crate::common::{DBA_MD, TestDb};

/// The heading of the section whose table lists the installed objects.
const SECTION: &str = "## What the migrations install, and why";

/// What kind of database object a listed or installed name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Schema,
    Table,
    View,
    Index,
    Sequence,
    Function,
    Trigger,
    Role,
}

impl Kind {
    /// The kind a word of the docs names ("tables" → table), if it names one.
    fn from_word(word: &str) -> Option<Kind> {
        Some(match word {
            "schema" | "schemas" => Kind::Schema,
            "table" | "tables" => Kind::Table,
            "view" | "views" => Kind::View,
            "index" | "indexes" => Kind::Index,
            "sequence" | "sequences" => Kind::Sequence,
            "function" | "functions" => Kind::Function,
            "trigger" | "triggers" => Kind::Trigger,
            "role" | "roles" => Kind::Role,
            _ => return None,
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Schema => "schema",
            Kind::Table => "table",
            Kind::View => "view",
            Kind::Index => "index",
            Kind::Sequence => "sequence",
            Kind::Function => "function",
            Kind::Trigger => "trigger",
            Kind::Role => "role",
        })
    }
}

/// A kind and a name: `(Table, "orderpush.heads")`, `(Trigger, "orderpush_new_order")`.
type Object = (Kind, String);

/// The objects the section's table lists in its first column.
fn documented_objects(dba_md: &str) -> BTreeSet<Object> {
    let start = dba_md
        .find(SECTION)
        .unwrap_or_else(|| panic!("docs/dba.md lost its section {SECTION:?}"));
    let section = &dba_md[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut objects = BTreeSet::new();
    let rows = section
        .lines()
        .filter(|l| l.starts_with('|'))
        .filter(|l| !l.starts_with("| object ") && !l.starts_with("|---"));
    for row in rows {
        let cell = row.split('|').nth(1).unwrap_or_default();
        objects.extend(cell_objects(cell, row));
    }
    assert!(
        objects.len() >= 10,
        "docs/dba.md's table under {SECTION:?} lists only {objects:?}: has its shape changed?"
    );
    objects
}

/// The objects one first-column cell names: backticked names, each of the kind the last word
/// before it names (or, after a comma or `;`, the kind of the name before it).
fn cell_objects(cell: &str, row: &str) -> Vec<Object> {
    let mut objects = Vec::new();
    let mut kind = None;
    let parts: Vec<&str> = cell.split('`').collect();
    for pair in parts.chunks(2) {
        let [prose, name] = pair else { break };
        let word = prose
            .split_whitespace()
            .next_back()
            .unwrap_or_default()
            .trim_matches(|c: char| !c.is_ascii_alphabetic())
            .to_ascii_lowercase();
        if word == "on" {
            // The table a trigger is on: listed in a row of its own.
            continue;
        }
        kind = Kind::from_word(&word).or(kind);
        let kind = kind.unwrap_or_else(|| {
            panic!("docs/dba.md: say what `{name}` is (table, view, index, …) in the row\n{row}")
        });
        objects.push((kind, name.trim_end_matches("()").to_owned()));
    }
    objects
}

/// Everything of orderpush's in the database `client` is connected to: the schemas besides
/// `public`; the tables, views, indexes and sequences of schemas `orderpush` and `public`
/// (without the indexes behind primary keys and unique constraints and the sequences behind
/// identity columns, which Postgres makes with their tables); their functions; the triggers on
/// their tables or calling their functions; and the roles, other than the migrating one, that
/// own something in schema `orderpush` or were granted something there.
async fn installed_objects(client: &tokio_postgres::Client) -> BTreeSet<Object> {
    let rows = client
        .query(
            r"SELECT 'schema', n.nspname
              FROM pg_namespace n
              WHERE n.nspname NOT LIKE 'pg\_%' AND n.nspname NOT IN ('information_schema', 'public')
              UNION ALL
              SELECT CASE WHEN c.relkind IN ('r', 'p') THEN 'table'
                          WHEN c.relkind IN ('v', 'm') THEN 'view'
                          WHEN c.relkind IN ('i', 'I') THEN 'index'
                          WHEN c.relkind = 'S' THEN 'sequence'
                          ELSE 'relkind ' || c.relkind::text END,
                     n.nspname || '.' || c.relname
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname IN ('orderpush', 'public')
                AND c.relkind <> 'c'
                AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                                WHERE k.conindid = c.oid AND k.contype IN ('p', 'u', 'x'))
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                  AND (d.deptype = 'e' OR (c.relkind = 'S' AND d.deptype IN ('i', 'a'))))
              UNION ALL
              SELECT 'function', n.nspname || '.' || p.proname
              FROM pg_proc p
              JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname IN ('orderpush', 'public')
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e')
              UNION ALL
              SELECT 'trigger', t.tgname
              FROM pg_trigger t
              JOIN pg_class c ON c.oid = t.tgrelid
              JOIN pg_namespace cn ON cn.oid = c.relnamespace
              JOIN pg_proc p ON p.oid = t.tgfoid
              JOIN pg_namespace pn ON pn.oid = p.pronamespace
              WHERE NOT t.tgisinternal
                AND (cn.nspname IN ('orderpush', 'public') OR pn.nspname = 'orderpush')
              UNION ALL
              SELECT 'role', r.rolname
              FROM pg_roles r
              WHERE r.rolname <> current_user
                AND (EXISTS (SELECT 1 FROM pg_namespace n
                             WHERE n.nspname = 'orderpush'
                               AND (n.nspowner = r.oid
                                    OR r.oid IN (SELECT grantee FROM aclexplode(n.nspacl))))
                  OR EXISTS (SELECT 1 FROM pg_class c
                             JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE n.nspname = 'orderpush'
                               AND (c.relowner = r.oid
                                    OR r.oid IN (SELECT grantee FROM aclexplode(c.relacl))))
                  OR EXISTS (SELECT 1 FROM pg_proc p
                             JOIN pg_namespace n ON n.oid = p.pronamespace
                             WHERE n.nspname = 'orderpush'
                               AND (p.proowner = r.oid
                                    OR r.oid IN (SELECT grantee FROM aclexplode(p.proacl)))))",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let kind: &str = r.get(0);
            let kind = Kind::from_word(kind).unwrap_or_else(|| {
                panic!(
                    "an object of an unexpected kind: {kind} {}",
                    r.get::<_, &str>(1)
                )
            });
            (kind, r.get(1))
        })
        .collect()
}

/// One message per difference between what docs/dba.md lists and what the database holds.
fn drift(documented: &BTreeSet<Object>, installed: &BTreeSet<Object>) -> Vec<String> {
    let missing = documented.difference(installed).map(|(kind, name)| {
        format!(
            "docs/dba.md lists {kind} `{name}`, which a freshly migrated database does not have: \
             remove it from the table under {SECTION:?} (or correct its name or kind)"
        )
    });
    let unlisted = installed.difference(documented).map(|(kind, name)| {
        format!(
            "a freshly migrated database has {kind} `{name}`, which docs/dba.md does not list: \
             add it to the table under {SECTION:?}"
        )
    });
    missing.chain(unlisted).collect()
}

/// docs/dba.md without the table row that contains `needle`.
fn without_row(dba_md: &str, needle: &str) -> String {
    let kept: Vec<&str> = dba_md
        .lines()
        .filter(|l| !(l.starts_with('|') && l.contains(needle)))
        .collect();
    assert_eq!(
        kept.len() + 1,
        dba_md.lines().count(),
        "one row holds {needle:?}"
    );
    kept.join("\n")
}

#[tokio::test]
async fn dba_md_lists_exactly_what_the_migrations_install() {
    let db = TestDb::create().await;
    let installed = installed_objects(&db.client().await).await;
    let report = drift(&documented_objects(DBA_MD), &installed);
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[tokio::test]
async fn the_object_list_check_notices_drift_both_ways() {
    let db = TestDb::create().await;
    let c = db.client().await;
    let documented = documented_objects(DBA_MD);

    // A row taken out of the docs: its objects are installed but no longer listed.
    let report = drift(
        &documented_objects(&without_row(DBA_MD, "table `orderpush.heads`")),
        &installed_objects(&c).await,
    );
    assert_eq!(
        report,
        [format!(
            "a freshly migrated database has table `orderpush.heads`, which docs/dba.md does not \
             list: add it to the table under {SECTION:?}"
        )]
    );

    // Objects a migration might add without a docs change, of every kind, then one listed
    // object dropped.
    c.batch_execute(
        "CREATE TABLE orderpush.unlisted (x int);
         CREATE INDEX unlisted_x_idx ON orderpush.unlisted (x);
         CREATE SEQUENCE orderpush.unlisted_seq;
         CREATE VIEW orderpush.unlisted_view AS SELECT 1 AS one;
         CREATE SCHEMA orderpush_extra;
         CREATE FUNCTION orderpush.unlisted_fn() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NULL; END $$;
         CREATE TRIGGER unlisted_trigger AFTER INSERT ON public.tenants
             FOR EACH ROW EXECUTE FUNCTION orderpush.unlisted_fn();
         GRANT USAGE ON SCHEMA orderpush TO pg_monitor;
         DROP VIEW orderpush.emit_errors;",
    )
    .await
    .unwrap();
    let report = drift(&documented, &installed_objects(&c).await);
    let unlisted = [
        "table `orderpush.unlisted`",
        "index `orderpush.unlisted_x_idx`",
        "sequence `orderpush.unlisted_seq`",
        "view `orderpush.unlisted_view`",
        "schema `orderpush_extra`",
        "function `orderpush.unlisted_fn`",
        "trigger `unlisted_trigger`",
        "role `pg_monitor`",
    ];
    for object in unlisted {
        assert!(
            report
                .iter()
                .any(|m| m.contains(&format!("has {object}, which docs/dba.md does not list"))),
            "{object} not reported:\n{}",
            report.join("\n")
        );
    }
    assert!(
        report.iter().any(|m| m.contains(
            "docs/dba.md lists view `orderpush.emit_errors`, which a freshly migrated database \
             does not have"
        )),
        "the dropped view not reported:\n{}",
        report.join("\n")
    );
    assert_eq!(report.len(), unlisted.len() + 1, "{}", report.join("\n"));
}

#[test]
fn a_cell_names_its_objects_with_their_kinds() {
    let cell = " table `orderpush.a`; indexes `orderpush.a_x_idx` (BRIN), `orderpush.a_y_idx` \
                (V6); view `orderpush.v`, function `orderpush.f()`, trigger `t1` on `public.orders`; \
                `t2` on `public.gift_cards` ";
    assert_eq!(
        cell_objects(cell, cell),
        [
            (Kind::Table, "orderpush.a".to_owned()),
            (Kind::Index, "orderpush.a_x_idx".to_owned()),
            (Kind::Index, "orderpush.a_y_idx".to_owned()),
            (Kind::View, "orderpush.v".to_owned()),
            (Kind::Function, "orderpush.f".to_owned()),
            (Kind::Trigger, "t1".to_owned()),
            (Kind::Trigger, "t2".to_owned()),
        ]
    );
}
