// orderpush status page: polls status/data every second and renders it with DOM calls only
// (textContent, never innerHTML), so no value from the server can inject markup.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "title") node.title = v;
    else node.dataset[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ago(iso) {
  if (!iso) return "–";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "–";
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v < 10) return `${v.toFixed(1)} ms`;
  return v < 1000 ? `${v.toFixed(0)} ms` : `${(v / 1000).toFixed(1)} s`;
}

function fill(tableId, emptyId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
  if (emptyId) $(emptyId).style.display = rows.length ? "none" : "block";
}

function terminal(t) {
  const label = t.key_label ? `${t.key_id} (${t.key_label})` : t.key_id;
  const delivered = t.last_delivered_id ?? "–";
  const acked = t.last_acked_id ?? "–";
  return el("div", { class: "terminal", key: t.key_id },
    el("code", {}, label), " · ", el("code", {}, t.instance), " · ", t.peer,
    " · ", ago(t.connected_at), " · ", `${delivered} / ${acked}`);
}

function tenantRow(t) {
  let state;
  const alerts = [];
  const u = t.undelivered;
  if (u && !t.terminals.length) {
    const what = u.orders ? `${u.orders} order(s)` : `${u.events} event(s)`;
    alerts.push(`NO TERMINAL — ${what} undelivered, last ${ago(u.last_at)}`);
  }
  const waiting = [];
  if (t.orders_undelivered) waiting.push(`${t.orders_undelivered} never delivered`);
  if (t.orders_unacknowledged) waiting.push(`${t.orders_unacknowledged} not acknowledged`);
  if (waiting.length) alerts.push(`ORDERS WAITING — ${waiting.join(", ")}`);
  if (t.alert && alerts.length) {
    state = alerts.join(" · ");
  } else if (t.terminals.length) {
    state = `${t.terminals.length} connected`;
  } else {
    state = "no terminal";
  }
  const last = t.last_event
    ? `${t.last_event.type} #${t.last_event.id} · ${ago(t.last_event.at)}`
    : "–";
  return el("tr", { class: t.alert ? "alert" : "", tenant: t.tenant },
    el("td", {}, el("strong", {}, t.tenant)),
    el("td", { class: "state" }, state),
    el("td", {}, ...(t.terminals.length ? t.terminals.map(terminal) : [el("span", { class: "muted" }, "none")])),
    el("td", {}, last));
}

function overdueRow(o) {
  const state = o.first_delivered_at
    ? `not acknowledged (delivered ${ago(o.first_delivered_at)})`
    : "never delivered";
  return el("tr", { class: "alert", tenant: o.tenant, order: o.order_number ?? "" },
    el("td", {}, el("strong", {}, o.order_number ?? "?")), el("td", {}, o.tenant),
    el("td", { class: "num" }, o.event_id), el("td", { class: "state" }, state),
    el("td", { class: "num" }, `${Math.round(o.waited_seconds)} s (limit ${o.timeout_seconds} s)`));
}

function eventRow(e) {
  const delivery = e.undelivered
    ? el("span", { class: "undelivered" }, "no terminal")
    : `${e.sent_here} here`;
  return el("tr", { tenant: e.tenant, type: e.type },
    el("td", { class: "num" }, time(e.at)), el("td", {}, e.tenant), el("td", {}, el("code", {}, e.type)),
    el("td", { class: "num" }, e.id), el("td", {}, e.origin), el("td", {}, delivery));
}

function instanceRow(i, self) {
  return el("tr", { instance: i.id },
    el("td", {}, el("code", {}, i.id), i.id === self ? " (this one)" : ""),
    el("td", {}, `${i.hostname} [${i.pid}]`), el("td", {}, i.listen), el("td", {}, i.version),
    el("td", {}, ago(i.started_at)),
    el("td", {}, el("span", { class: i.listener_up ? "up" : "down" }, i.listener_up ? "following" : "DOWN"),
      i.listener_mode ? ` (${i.listener_mode})` : ""),
    el("td", { class: "num", title: `last read ${ms(i.listener_read_age_ms)} ago` }, ms(i.listener_lag_ms)),
    el("td", { class: "num" }, i.events_per_second.toFixed(1)),
    el("td", { class: "num" }, i.connections),
    el("td", {}, ago(i.heartbeat_at)));
}

function render(d) {
  $("this-instance").textContent = d.this_instance;
  $("updated").textContent = `updated ${new Date(d.generated_at).toLocaleTimeString()}`;
  const banner = $("banner");
  banner.textContent = d.database_ok ? "" : `Database unreachable: ${d.database_error}. Showing this instance only.`;
  banner.classList.toggle("show", !d.database_ok);

  $("n-instances").textContent = d.database_ok ? d.instances.length : "?";
  const l = d.listener;
  $("listener").textContent = l.up ? `up · ${ms(l.lag_ms)}` : "DOWN";
  $("listener").title = `last read ${ms(l.read_age_ms)} ago; lag = commit-to-send time of the last event`;
  $("card-listener").classList.toggle("bad", !l.up);
  $("eps").textContent = d.events_per_second.toFixed(1);
  $("n-connections").textContent = d.connection_count ?? "?";
  const alerts = d.tenants.filter((t) => t.alert).length;
  $("n-alerts").textContent = alerts;
  $("card-alerts").classList.toggle("bad", alerts > 0);
  $("tenant-note").textContent = d.tenant_count === null ? "" :
    `(with terminals or recent events; ${d.tenant_count} tenants in total)`;

  const overdue = d.overdue_orders || [];
  $("n-overdue").textContent = d.database_ok ? overdue.length : "?";
  $("card-overdue").classList.toggle("bad", overdue.length > 0);

  fill("tenants", "tenants-empty", d.tenants.map(tenantRow));
  fill("overdue", "overdue-empty", overdue.map(overdueRow));
  fill("events", "events-empty", d.recent.map(eventRow));
  fill("instances", null, d.instances.map((i) => instanceRow(i, d.this_instance)));
}

async function poll() {
  const conn = $("conn");
  try {
    const r = await fetch("status/data", { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
    conn.textContent = "live";
    conn.className = "ok";
  } catch (e) {
    conn.textContent = `disconnected (${e.message})`;
    conn.className = "bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
