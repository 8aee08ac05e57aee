//! What orderpush has installed on the application's tables, as a DBA sees it
//! (`orderpush triggers`): each trigger's state, the wake-up mode and the `new_order` sources.

use serde::Serialize;

use super::DbError;

/// The application tables (docs/protocol.md lists their events), shown even when they carry no orderpush trigger.
pub(crate) const APPLICATION_TABLES: [&str; 5] = [
    "public.tenants",
    "public.orders",
    "public.order_items",
    "public.gift_cards",
    "public.loyalty_transactions",
];

/// The triggers the migrations install: (table, trigger, event it emits).
pub(crate) const EXPECTED_TRIGGERS: [(&str, &str, &str); 4] = [
    ("public.orders", "orderpush_new_order", "new_order"),
    ("public.orders", "orderpush_order_updated", "order_updated"),
    (
        "public.gift_cards",
        "orderpush_gift_card_purchased",
        "gift_card_purchased",
    ),
    (
        "public.loyalty_transactions",
        "orderpush_loyalty_updated",
        "loyalty_updated",
    ),
];

/// A trigger's firing state (`pg_trigger.tgenabled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerState {
    /// Fires (the default; not under `session_replication_role = replica`).
    Enabled,
    /// `ALTER TABLE ... DISABLE TRIGGER`: never fires; writes emit no event.
    Disabled,
    /// `ENABLE REPLICA TRIGGER`: fires only under `session_replication_role = replica`.
    Replica,
    /// `ENABLE ALWAYS TRIGGER`: fires in every replication role.
    Always,
    /// Expected but not installed (dropped by hand, or migrations not applied).
    Missing,
}

impl TriggerState {
    fn from_tgenabled(c: &str) -> Self {
        match c {
            "D" => Self::Disabled,
            "R" => Self::Replica,
            "A" => Self::Always,
            _ => Self::Enabled,
        }
    }

    /// The word shown in the text table.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "DISABLED",
            Self::Replica => "replica only",
            Self::Always => "always",
            Self::Missing => "MISSING",
        }
    }

    /// True when ordinary application writes fire the trigger.
    pub(crate) fn fires(self) -> bool {
        matches!(self, Self::Enabled | Self::Always)
    }
}

/// One orderpush trigger on one table.
#[derive(Debug, Clone, Serialize)]
pub struct Trigger {
    /// Trigger name.
    pub name: String,
    /// The event type it emits, when it is one orderpush ships.
    pub event: Option<String>,
    /// The function it calls (schema-qualified); None when missing.
    pub function: Option<String>,
    /// Firing state.
    pub state: TriggerState,
    /// Shorthand: does an ordinary write fire it.
    pub enabled: bool,
    /// Runs at commit (`DEFERRABLE INITIALLY DEFERRED`).
    pub deferred: bool,
}

/// The orderpush triggers of one table.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    /// Schema-qualified table name.
    pub table: String,
    /// Whether the table exists.
    pub exists: bool,
    /// Its orderpush triggers (empty: writes to it emit nothing by themselves).
    pub triggers: Vec<Trigger>,
}

/// Everything `orderpush triggers` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether schema `orderpush` exists (migrations applied).
    pub installed: bool,
    /// The wake-up mode a new session of this database gets (`gated` when unset).
    pub wakeup: String,
    /// `orders.order_source` values that emit `new_order`.
    pub new_order_sources: Vec<String>,
    /// Per table.
    pub tables: Vec<Table>,
}

/// Reads the catalog; changes nothing.
pub async fn report(client: &tokio_postgres::Client) -> Result<Report, DbError> {
    let installed: bool = client
        .query_one("SELECT to_regnamespace('orderpush') IS NOT NULL", &[])
        .await?
        .get(0);
    let wakeup: Option<String> = client
        .query_one(
            "SELECT nullif(current_setting('orderpush.wakeup', true), '')",
            &[],
        )
        .await?
        .get(0);
    let new_order_sources: Vec<String> = if installed
        && client
            .query_one(
                "SELECT to_regclass('orderpush.new_order_sources') IS NOT NULL",
                &[],
            )
            .await?
            .get::<_, bool>(0)
    {
        client
            .query(
                "SELECT order_source FROM orderpush.new_order_sources ORDER BY 1",
                &[],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        Vec::new()
    };
    // Any trigger named orderpush_* or calling a function of schema orderpush, on any table.
    let rows = client
        .query(
            "SELECT c.oid::regclass::text, t.tgname::text, pn.nspname || '.' || p.proname,
                    t.tgenabled::text, t.tginitdeferred
             FROM pg_trigger t
             JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_proc p ON p.oid = t.tgfoid
             JOIN pg_namespace pn ON pn.oid = p.pronamespace
             WHERE NOT t.tgisinternal AND (pn.nspname = 'orderpush' OR t.tgname LIKE 'orderpush%')
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    let mut tables: Vec<Table> = Vec::new();
    for name in APPLICATION_TABLES {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .get(0);
        tables.push(Table {
            table: name.to_owned(),
            exists,
            triggers: Vec::new(),
        });
    }
    for r in rows {
        let table: String = r.get(0);
        // regclass prints without `public.` when public is on the search path.
        let table = if table.contains('.') {
            table
        } else {
            format!("public.{table}")
        };
        let name: String = r.get(1);
        let state = TriggerState::from_tgenabled(&r.get::<_, String>(3));
        let trigger = Trigger {
            event: EXPECTED_TRIGGERS
                .iter()
                .find(|(_, n, _)| *n == name)
                .map(|(_, _, e)| (*e).to_owned()),
            name,
            function: Some(r.get(2)),
            state,
            enabled: state.fires(),
            deferred: r.get(4),
        };
        match tables.iter_mut().find(|t| t.table == table) {
            Some(t) => t.triggers.push(trigger),
            None => tables.push(Table {
                table,
                exists: true,
                triggers: vec![trigger],
            }),
        }
    }
    for (table, name, event) in EXPECTED_TRIGGERS {
        if let Some(t) = tables.iter_mut().find(|t| t.table == table) {
            if !t.triggers.iter().any(|x| x.name == name) {
                t.triggers.push(Trigger {
                    name: name.to_owned(),
                    event: Some(event.to_owned()),
                    function: None,
                    state: TriggerState::Missing,
                    enabled: false,
                    deferred: false,
                });
            }
        }
    }
    Ok(Report {
        installed,
        wakeup: wakeup.unwrap_or_else(|| "gated".into()),
        new_order_sources,
        tables,
    })
}
