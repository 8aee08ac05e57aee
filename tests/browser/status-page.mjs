// Drives orderpush in Debian's headless Chromium, for tests/status_page.rs:
//   1. a browser-based POS connects to the WebSocket with its key in Sec-WebSocket-Protocol
//      (the browser way, docs/browser-auth.md) and acks what it receives;
//   2. the /status page is opened and must show that terminal, the order the test inserts for
//      its tenant, the other tenant (orders, no terminal) in red, and that tenant's order
//      (ALERT_ORDER) in the list of orders waiting past the acknowledgement timeout;
//   3. a screenshot is saved.
// Input (environment): BASE_URL, TENANT, POS_KEY, KEY_ID, ALERT_TENANT, ALERT_ORDER,
// ORDER_NUMBER, SCREENSHOT, optionally CHROMIUM and ADMIN_TOKEN (sent as HTTP Basic
// credentials).
// Output: one JSON line on stdout; exit code 0 only when every check passed.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// Generous: the machine running the tests may be loaded; each wait ends as soon as it is met.
const TIMEOUT_MS = 60_000;
const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`missing environment variable ${name}`);
  return v;
};

const base = env("BASE_URL");
const tenant = env("TENANT");
const key = env("POS_KEY");
const keyId = env("KEY_ID");
const alertTenant = env("ALERT_TENANT");
const alertOrder = env("ALERT_ORDER");
const orderNumber = env("ORDER_NUMBER");
const screenshot = env("SCREENSHOT");
const profile = mkdtempSync(join(tmpdir(), "orderpush-chromium-"));
const result = { ok: false };

let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 860 },
    httpCredentials: process.env.ADMIN_TOKEN
      ? { username: "ops", password: process.env.ADMIN_TOKEN }
      : undefined,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  context.setDefaultTimeout(TIMEOUT_MS);

  // 1. The browser POS: same origin as the service, key in the subprotocol list.
  const pos = await context.newPage();
  await pos.goto(`${base}/healthz`);
  result.protocol = await pos.evaluate(
    ({ url, key }) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url, ["orderpush.v1", `orderpush.key.${key}`]);
        window.received = [];
        ws.onmessage = (m) => {
          const event = JSON.parse(m.data);
          window.received.push(event);
          ws.send(JSON.stringify({ type: "ack", id: event.id }));
        };
        ws.onopen = () => resolve(ws.protocol);
        ws.onerror = () => reject(new Error("WebSocket failed to open"));
        window.pos = ws;
      }),
    { url: `${base.replace(/^http/, "ws")}/ws/pos/${tenant}`, key },
  );

  // 2. The status page, as an operator opens it.
  const page = await context.newPage();
  const response = await page.goto(`${base}/status`);
  result.status_code = response.status();
  await page.waitForFunction(
    ({ tenant, keyId }) => {
      const row = document.querySelector(`#tenants tr[data-tenant="${tenant}"]`);
      return row && row.querySelector(`[data-key="${keyId}"]`) !== null;
    },
    { tenant, keyId },
  );
  result.terminal_shown = true;
  await page.waitForFunction(
    (tenant) => document.querySelector(`#events tr[data-tenant="${tenant}"][data-type="new_order"]`) !== null,
    tenant,
  );
  result.order_shown = true;
  await page.waitForFunction(
    (t) => document.querySelector(`#tenants tr.alert[data-tenant="${t}"]`) !== null,
    alertTenant,
  );
  result.alert_shown = true;
  result.alert_color = await page.$eval(
    `#tenants tr.alert[data-tenant="${alertTenant}"] td`,
    (td) => getComputedStyle(td).color,
  );
  result.alert_text = await page.$eval(
    `#tenants tr.alert[data-tenant="${alertTenant}"]`,
    (tr) => tr.innerText,
  );
  result.healthy_row_is_alert = await page.$eval(
    `#tenants tr[data-tenant="${tenant}"]`,
    (tr) => tr.classList.contains("alert"),
  );
  await page.waitForFunction(
    (n) => document.querySelector(`#overdue tr[data-order="${n}"]`) !== null,
    alertOrder,
  );
  result.overdue_text = await page.$eval(`#overdue tr[data-order="${alertOrder}"]`, (tr) => tr.innerText);
  result.overdue_count = await page.$eval("#n-overdue", (n) => n.textContent);
  result.page_text = await page.innerText("main");

  // The POS really got the order (and acked it).
  await pos.waitForFunction(
    (n) => window.received.some((e) => e.type === "new_order" && e.data.orderNumber === n),
    orderNumber,
  );
  result.pos_received = await pos.evaluate(() => window.received.map((e) => ({ type: e.type, id: e.id })));

  // Its ack reached presence (the admin API), while the socket is still open.
  const lastId = result.pos_received[result.pos_received.length - 1].id;
  const headers = process.env.ADMIN_TOKEN ? { Authorization: `Bearer ${process.env.ADMIN_TOKEN}` } : {};
  const deadline = Date.now() + TIMEOUT_MS;
  while (result.acked_in_presence !== lastId) {
    if (Date.now() > deadline) throw new Error(`ack ${lastId} not recorded: ${result.acked_in_presence}`);
    const r = await fetch(`${base}/admin/tenants/${tenant}`, { headers });
    const body = await r.json();
    result.acked_in_presence = body.connections?.[0]?.last_acked_id ?? null;
    if (result.acked_in_presence !== lastId) await new Promise((ok) => setTimeout(ok, 100));
  }

  // Let one more poll render relative times, then take the picture.
  await page.waitForTimeout(1200);
  await page.screenshot({ path: screenshot, fullPage: true });
  result.screenshot = screenshot;
  result.ok = true;
} catch (e) {
  result.error = String(e && e.stack ? e.stack : e);
} finally {
  if (context) await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
