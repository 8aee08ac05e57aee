//! The repository's docs as the tests hold them to: the SQL a DBA copies from docs/dba.md is
//! the SQL the tests run.

/// docs/dba.md, as built into the test binary.
pub(crate) const DBA_MD: &str = include_str!("../../docs/dba.md");

/// The first ```sql block after `marker` in docs/dba.md, with the documented role names replaced:
/// the GRANTs the test runs are the GRANTs the DBA copies.
pub(crate) fn documented_sql(marker: &str, roles: &[(&str, &str)]) -> String {
    let from = DBA_MD
        .find(marker)
        .unwrap_or_else(|| panic!("docs/dba.md lost {marker:?}"));
    let rest = &DBA_MD[from..];
    let start = rest.find("```sql\n").expect("an sql block") + 7;
    let len = rest[start..].find("```").expect("the block ends");
    let mut sql = rest[start..start + len].to_owned();
    for (documented, actual) in roles {
        sql = sql.replace(documented, actual);
    }
    sql
}
