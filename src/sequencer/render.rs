//! Turns staged rows into event `data`, with the keys and formats of docs/protocol.md. Pure
//! functions: whatever the row holds (a renamed column, a changed type, `infinity`), rendering
//! never fails the batch; a field whose column is gone is `null`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::event;

/// A written row, parsed once: its columns' names and JSON values, exactly as Postgres printed
/// them, borrowed from the row's text.
///
/// A list, not a hash map: the sequencer parses two or three rows per order, each of a dozen
/// columns, and reads a few of them once. Hashing and allocating every name cost more than
/// scanning the list: the service's CPU per order went from 38 to 31 µs with the list (a
/// 20,000-order catch-up; docs/benchmarks.md, "Write path").
#[derive(Debug)]
pub struct Columns<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Columns<'a> {
    /// The value of `column`, if the row has it (the last one, should a name repeat).
    pub fn get(&self, column: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(name, _)| name == column)
            .map(|(_, value)| *value)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Columns<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Columns<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(Name(name)) = map.next_key()? {
                    columns.push((name, map.next_value()?));
                }
                Ok(Columns(columns))
            }
        }
        deserializer.deserialize_map(Object)
    }
}

/// A column name: borrowed from the text unless it holds escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// Parses `to_json(row)` or `to_jsonb(row)` text. `None` if it is not a JSON object (never, for
/// rows the trigger staged; possible for a row someone inserted by hand).
pub fn columns(text: &str) -> Option<Columns<'_>> {
    serde_json::from_str(text).ok()
}

/// Where each event field is read from: the reference column names, except where a DBA named
/// another column in `orderpush.field_columns` (docs/dba.md, "Adapting to your schema").
#[derive(Debug, Clone, Default)]
pub struct FieldMap {
    overrides: HashMap<(String, String), String>,
}

impl FieldMap {
    /// A map with these `(kind, field) → column` overrides.
    pub fn new(overrides: impl IntoIterator<Item = (String, String, String)>) -> Self {
        Self {
            overrides: overrides
                .into_iter()
                .map(|(kind, field, column)| ((kind, field), column))
                .collect(),
        }
    }

    fn column<'a>(&'a self, kind: &str, field: &str, default: &'a str) -> &'a str {
        // Allocation-free lookup for the common case of no overrides at all.
        if self.overrides.is_empty() {
            return default;
        }
        self.overrides
            .get(&(kind.to_owned(), field.to_owned()))
            .map_or(default, String::as_str)
    }
}

/// Reads one event's fields from a row through the [`FieldMap`].
struct Reader<'m, 'r, 'a> {
    map: &'m FieldMap,
    kind: &'static str,
    row: &'r Columns<'a>,
}

impl<'a> Reader<'_, '_, 'a> {
    fn raw(&self, field: &str, default: &str) -> &'a str {
        raw(self.row, self.map.column(self.kind, field, default))
    }

    fn time(&self, field: &str, default: &str) -> String {
        time(self.row, self.map.column(self.kind, field, default))
    }
}

/// The JSON `null`, for fields whose column is missing.
const NULL: &str = "null";

/// A column's value as JSON text, `null` when the column does not exist.
fn raw<'a>(row: &Columns<'a>, column: &str) -> &'a str {
    row.get(column).map_or(NULL, RawValue::get)
}

/// A column's value as a plain string (`None` unless it is a JSON string).
pub fn text(row: &Columns<'_>, column: &str) -> Option<String> {
    row.get(column)
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
}

/// A timestamptz column as the protocol's `YYYY-MM-DDTHH:MM:SS.mmmZ`, or `null` when the column
/// is missing, NULL, not a time (`infinity`, a changed type) or outside years 1..9999.
fn time(row: &Columns<'_>, column: &str) -> String {
    text(row, column)
        .and_then(|t| pg_timestamp_to_iso(&t))
        .map_or_else(|| NULL.to_owned(), |iso| json_string(&iso))
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Appends `"key":value` pairs as one JSON object.
struct Object(String);

impl Object {
    fn new() -> Self {
        Self(String::from("{"))
    }

    fn field(mut self, key: &str, value: &str) -> Self {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&json_string(key));
        self.0.push(':');
        self.0.push_str(value);
        self
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// `new_order` data from the order's row and its items (`json_agg` of the item rows, or `[]`).
pub fn new_order(map: &FieldMap, order: &Columns<'_>, items: &[Columns<'_>]) -> String {
    let mut list = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            list.push(',');
        }
        let r = Reader {
            map,
            kind: "new_order",
            row: item,
        };
        list.push_str(
            &Object::new()
                .field("menuItemId", r.raw("items.menuItemId", "menu_item_id"))
                .field("name", r.raw("items.name", "name"))
                .field("quantity", r.raw("items.quantity", "quantity"))
                .field("price", r.raw("items.price", "price"))
                .field(
                    "selectedAddons",
                    r.raw("items.selectedAddons", "selected_addons"),
                )
                .field(
                    "specialInstructions",
                    r.raw("items.specialInstructions", "special_instructions"),
                )
                .end(),
        );
    }
    list.push(']');
    let r = Reader {
        map,
        kind: "new_order",
        row: order,
    };
    Object::new()
        .field("orderId", r.raw("orderId", "id"))
        .field("orderNumber", r.raw("orderNumber", "order_number"))
        .field("customerName", r.raw("customerName", "customer_name"))
        .field("customerPhone", r.raw("customerPhone", "customer_phone"))
        .field("orderType", r.raw("orderType", "order_type"))
        .field("orderSource", r.raw("orderSource", "order_source"))
        .field("status", r.raw("status", "status"))
        .field("totalAmount", r.raw("totalAmount", "total_amount"))
        .field("items", &list)
        .field(
            "specialInstructions",
            r.raw("specialInstructions", "special_instructions"),
        )
        .field("scheduledFor", &r.time("scheduledFor", "scheduled_for"))
        .field("createdAt", &r.time("createdAt", "created_at"))
        .end()
}

/// An order's id, number and status as text, from its row in a `new_order` or `order_updated`
/// (`kind`, whose column names apply), for the acknowledgement chain (`orderpush.order_acks`).
pub(crate) fn order_ref(map: &FieldMap, kind: &str, order: &Columns<'_>) -> OrderRef {
    let text_of = |field, default| {
        order
            .get(map.column(kind, field, default))
            .filter(|v| v.get() != NULL)
            .map(|v| serde_json::from_str::<String>(v.get()).unwrap_or_else(|_| v.get().to_owned()))
    };
    OrderRef {
        id: text_of("orderId", "id"),
        number: text_of("orderNumber", "order_number"),
        status: text_of("status", "status"),
    }
}

/// Which order a row is, and its status: see [`order_ref`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct OrderRef {
    /// The order's id.
    pub id: Option<String>,
    /// Its number (what the kitchen calls it).
    pub number: Option<String>,
    /// Its status after the write.
    pub status: Option<String>,
}

/// `order_updated` data from the row after the change and the status/updated_at before it.
/// `updatedAt` is the row's `updated_at` when the write changed it, else the writer's
/// transaction time (`staged_at`): the app may not maintain `updated_at`.
pub fn order_updated(
    map: &FieldMap,
    row: &Columns<'_>,
    old: Option<&Columns<'_>>,
    staged_at: f64,
) -> String {
    let r = Reader {
        map,
        kind: "order_updated",
        row,
    };
    let previous = old.map_or(NULL, |o| raw(o, "status"));
    let updated_column = map.column("order_updated", "updatedAt", "updated_at");
    let changed_at = match (
        row.get(updated_column),
        old.and_then(|o| o.get("updated_at")),
    ) {
        (Some(new), Some(before)) if new.get() != before.get() => time(row, updated_column),
        _ => json_string(&event::iso_from_unix_f64(staged_at)),
    };
    Object::new()
        .field("orderId", r.raw("orderId", "id"))
        .field("orderNumber", r.raw("orderNumber", "order_number"))
        .field("status", r.raw("status", "status"))
        .field("previousStatus", previous)
        .field("updatedAt", &changed_at)
        .end()
}

/// `gift_card_purchased` data. `expiryDate` is a date, printed by Postgres as `YYYY-MM-DD`.
pub fn gift_card_purchased(map: &FieldMap, row: &Columns<'_>) -> String {
    let r = Reader {
        map,
        kind: "gift_card_purchased",
        row,
    };
    Object::new()
        .field("cardNumber", r.raw("cardNumber", "card_number"))
        .field("initialBalance", r.raw("initialBalance", "initial_balance"))
        .field("currentBalance", r.raw("currentBalance", "current_balance"))
        .field("purchasedBy", r.raw("purchasedBy", "purchased_by"))
        .field("recipientName", r.raw("recipientName", "recipient_name"))
        .field("recipientEmail", r.raw("recipientEmail", "recipient_email"))
        .field("expiryDate", r.raw("expiryDate", "expiry_date"))
        .field("purchasedAt", &r.time("purchasedAt", "purchased_at"))
        .end()
}

/// `loyalty_updated` data; `updatedAt` is the transaction row's `created_at`.
pub fn loyalty_updated(map: &FieldMap, row: &Columns<'_>) -> String {
    let r = Reader {
        map,
        kind: "loyalty_updated",
        row,
    };
    Object::new()
        .field("customerId", r.raw("customerId", "customer_id"))
        .field("customerPhone", r.raw("customerPhone", "customer_phone"))
        .field("pointsChange", r.raw("pointsChange", "points_change"))
        .field("newBalance", r.raw("newBalance", "new_balance"))
        .field(
            "transactionType",
            r.raw("transactionType", "transaction_type"),
        )
        .field("reason", r.raw("reason", "reason"))
        .field("updatedAt", &r.time("updatedAt", "created_at"))
        .end()
}

/// Converts a timestamp as `to_jsonb` prints it (`2025-10-11T16:00:00.123456+02:00`, in the
/// writer's time zone) to the protocol's UTC form with milliseconds. `None` for `infinity`,
/// years outside 1..9999 (`BC`, five digits) and anything else that is not such a timestamp.
pub(crate) fn pg_timestamp_to_iso(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = s.get(from..from + len)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let mut end = start;
        while end < b.len() && b[end].is_ascii_digit() {
            end += 1;
        }
        let digits = &s[start..end];
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        nanos = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
        i = end;
    }
    // The offset: +HH, +HH:MM or +HH:MM:SS (Postgres prints seconds for historical zones).
    let sign = match b.get(i) {
        Some(b'+') => 1,
        Some(b'-') => -1,
        Some(b'Z') if i + 1 == b.len() => 0,
        _ => return None,
    };
    let mut offset = 0i64;
    if sign != 0 {
        let rest = &s[i + 1..];
        let parts: Vec<&str> = rest.split(':').collect();
        if parts.is_empty() || parts.len() > 3 {
            return None;
        }
        for (k, p) in parts.iter().enumerate() {
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let v: i64 = p.parse().ok()?;
            offset += v * [3600, 60, 1][k];
        }
        offset *= sign;
    }
    let days = event::days_from_civil(year, month as u32, day as u32);
    let local = days * 86_400 + hour * 3600 + minute * 60 + second.min(59);
    let utc = local - offset;
    let iso = event::iso_from_unix(utc, (nanos / 1_000_000) as u32);
    // Only four-digit years have the protocol's shape.
    (iso.len() == 24).then_some(iso)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_timestamps_become_utc_with_milliseconds() {
        let cases = [
            (
                "2025-10-11T16:00:00.123456+02:00",
                "2025-10-11T14:00:00.123Z",
            ),
            ("2025-10-11T14:00:00+00:00", "2025-10-11T14:00:00.000Z"),
            ("2025-10-11T14:00:00.5-03:30", "2025-10-11T17:30:00.500Z"),
            ("2025-01-01T00:30:00+05:30", "2024-12-31T19:00:00.000Z"),
            ("1900-01-01T00:00:00+00:53:28", "1899-12-31T23:06:32.000Z"),
            ("2000-02-29 23:59:59.999+00", "2000-02-29T23:59:59.999Z"),
        ];
        for (pg, iso) in cases {
            assert_eq!(pg_timestamp_to_iso(pg).as_deref(), Some(iso), "{pg}");
        }
        for bad in [
            "infinity",
            "-infinity",
            "10000-01-01T00:00:00+00:00",
            "0001-01-01T00:00:00+00:00 BC",
            "2025-02-30T00:00:00+00:00",
            "2025-10-11",
            "2025-10-11T14:00:00",
            "not a time at all",
            "",
        ] {
            assert_eq!(pg_timestamp_to_iso(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_missing_column_is_null_and_others_pass_through_as_written() {
        let row = columns(
            r#"{"id": "84df", "order_number": "KIT-1", "total_amount": 45.00, "status": "new",
                "created_at": "2025-10-11T14:00:00+00:00", "scheduled_for": null,
                "special_instructions": "Ring", "order_type": "delivery", "order_source": "online"}"#,
        )
        .unwrap();
        let item = columns(
            r#"{"menu_item_id": "m1", "name": "Pizza", "quantity": 2, "price": 12.50,
                "selected_addons": [{"name": "Cheese", "price": 1.50}], "special_instructions": null}"#,
        )
        .unwrap();
        let data = new_order(&FieldMap::default(), &row, &[item]);
        assert!(data.contains(r#""totalAmount":45.00"#), "{data}");
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            v["customerPhone"],
            serde_json::Value::Null,
            "no such column"
        );
        assert_eq!(v["createdAt"], "2025-10-11T14:00:00.000Z");
        assert_eq!(v["items"][0]["selectedAddons"][0]["name"], "Cheese");
        let keys: Vec<&str> = [
            "orderId",
            "orderNumber",
            "customerName",
            "customerPhone",
            "orderType",
            "orderSource",
            "status",
            "totalAmount",
            "items",
            "specialInstructions",
            "scheduledFor",
            "createdAt",
        ]
        .to_vec();
        let positions: Vec<usize> = keys
            .iter()
            .map(|k| data.find(&format!("\"{k}\"")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{data}");
    }

    #[test]
    fn a_dba_can_name_other_columns() {
        let map = FieldMap::new([
            ("new_order".into(), "customerPhone".into(), "phone".into()),
            (
                "new_order".into(),
                "items.selectedAddons".into(),
                "addons".into(),
            ),
        ]);
        let row = columns(r#"{"phone": "0770", "customer_phone": "ignored"}"#).unwrap();
        let item = columns(r#"{"addons": [1]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(&new_order(&map, &row, &[item])).unwrap();
        assert_eq!(v["customerPhone"], "0770");
        assert_eq!(v["items"][0]["selectedAddons"][0], 1);
    }

    #[test]
    fn order_updated_takes_updated_at_only_when_the_write_changed_it() {
        let row =
            columns(r#"{"id": "a", "status": "ready", "updated_at": "2025-10-11T14:05:00+00:00"}"#)
                .unwrap();
        let same =
            columns(r#"{"status": "new", "updated_at": "2025-10-11T14:05:00+00:00"}"#).unwrap();
        let before =
            columns(r#"{"status": "new", "updated_at": "2025-10-11T14:00:00+00:00"}"#).unwrap();
        let staged_at = 1_760_191_800.25; // 2025-10-11T14:10:00.250Z
        let v: serde_json::Value = serde_json::from_str(&order_updated(
            &FieldMap::default(),
            &row,
            Some(&before),
            staged_at,
        ))
        .unwrap();
        assert_eq!(v["updatedAt"], "2025-10-11T14:05:00.000Z");
        assert_eq!(v["previousStatus"], "new");
        let v: serde_json::Value = serde_json::from_str(&order_updated(
            &FieldMap::default(),
            &row,
            Some(&same),
            staged_at,
        ))
        .unwrap();
        assert_eq!(v["updatedAt"], "2025-10-11T14:10:00.250Z");
    }
}
