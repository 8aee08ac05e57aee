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

/// The application's database role, created for one test with exactly the GRANTs of
/// docs/dba.md's sections named by `markers` (the role name `webapp` in them stands for it).
/// Returns the role's name and a connection already switched to it (`SET ROLE`). Drop the role
/// with [`drop_app_role`] when done: roles belong to the cluster, not the test database.
pub(crate) async fn app_role(
    db: &super::TestDb,
    markers: &[&str],
) -> (String, tokio_postgres::Client) {
    let role = format!("app_{}", db.name);
    let c = db.client().await;
    c.batch_execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN;"
    ))
    .await
    .unwrap();
    for marker in markers {
        c.batch_execute(&documented_sql(marker, &[("webapp", &role)]))
            .await
            .unwrap();
    }
    let app = db.client().await;
    app.batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    (role, app)
}

/// Removes a role made by [`app_role`] (after its connections are closed).
pub(crate) async fn drop_app_role(db: &super::TestDb, role: &str) {
    db.client()
        .await
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"))
        .await
        .unwrap();
}
