//! The set-ups many tests share: one tenant with a key and a server on a fresh database, or
//! two tenants each with a live POS.

use super::{Pos, TestDb, TestServer, TestServerBuilder};

/// A fresh database with one tenant and a key for it, and the real server running on it.
/// Destructure it into named bindings (`let OneTenant { db: _db, key, server } = …`): a field
/// left to `..` or `_` is dropped at once, and dropping the database drops it on the server.
pub(crate) struct OneTenant {
    /// The server (dropped first: it stops before its database goes).
    pub(crate) server: TestServer,
    /// A POS key of the tenant.
    pub(crate) key: String,
    /// The database.
    pub(crate) db: TestDb,
}

/// `one_tenant("kitchen")`: a fresh database with the tenant and a key, and a server on it with
/// the production defaults.
pub(crate) async fn one_tenant(tenant: &str) -> OneTenant {
    one_tenant_with(tenant, |server| server).await
}

/// The same with the server configured first, e.g.
/// `one_tenant_with("kitchen", |s| s.tuning(|t| t.max_replay_rows = 100))`.
pub(crate) async fn one_tenant_with(
    tenant: &str,
    server: impl FnOnce(TestServerBuilder) -> TestServerBuilder,
) -> OneTenant {
    let db = TestDb::create().await;
    db.tenant(tenant).await;
    let key = db.key(tenant).await;
    let server = server(TestServer::builder(&db)).start().await;
    OneTenant { server, key, db }
}

/// Tenants `kitchen` and `bistro`, a server, and one live POS on each tenant.
pub(crate) async fn kitchen_and_bistro(db: &TestDb) -> (TestServer, Pos, Pos) {
    db.tenant("kitchen").await;
    db.tenant("bistro").await;
    let server = TestServer::builder(db).start().await;
    let kitchen = Pos::connect(&server, "kitchen", &db.key("kitchen").await, None).await;
    let bistro = Pos::connect(&server, "bistro", &db.key("bistro").await, None).await;
    (server, kitchen, bistro)
}
