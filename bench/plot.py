#!/usr/bin/env python3
"""Draws docs/benchmarks.png from orderpush-bench's results.json (matplotlib, Agg backend).

usage: python3 bench/plot.py results.json out.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"orderpush": "#1f77b4", "node": "#d62728"}


def main(src, dst):
    with open(src) as f:
        res = json.load(f)
    fig, grid = plt.subplots(2, 3, figsize=(16, 10))
    axes = list(grid[0]) + list(grid[1])

    # 1. commit -> POS latency percentiles against order rate (and fan-out at its rate).
    ax = axes[0]
    for server, pts in sorted(res.get("commit_latency", {}).items()):
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        c = COLORS.get(server, None)
        ax.plot(xs, [p[1] for p in pts], "o-", color=c, label=f"{server} p50")
        ax.plot(xs, [p[2] for p in pts], "s--", color=c, label=f"{server} p99")
        ax.plot(xs, [p[3] for p in pts], "^:", color=c, alpha=0.6, label=f"{server} max")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("orders / s (100 tenants)")
    ax.set_ylabel("COMMIT → frame at POS (ms)")
    ax.set_title("3. commit → POS latency vs load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    # 2. server RSS against open connections.
    ax = axes[1]
    for server, pts in sorted(res.get("rss_curve", {}).items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(server), label=server)
    ax.set_xlabel("idle authenticated WebSocket connections")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("1. memory vs connections")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    # 3. write-path throughput against writers, per trigger configuration.
    ax = axes[2]
    for cfg, pts in sorted(res.get("write_tps", {}).items()):
        pts = sorted(pts)
        style = "k-" if cfg == "no-triggers" else None
        kw = {"color": COLORS["node"]} if cfg.startswith("node") else {}
        if style:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=cfg)
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg, **kw)
    ax.set_xscale("log", base=2)
    writers = sorted({p[0] for pts in res.get("write_tps", {}).values() for p in pts})
    if writers:
        ax.set_xticks(writers)
        ax.set_xticklabels([str(w) for w in writers])
    ax.set_xlabel("concurrent writers (pgbench)")
    ax.set_ylabel("order transactions / s")
    ax.set_title("4. write path: triggers vs none")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)

    # 4. fan-out: server CPU per delivery against clients on one tenant, at saturation; the
    # kernel's share (system time) dashed: the loopback send path both servers pay.
    ax = axes[3]
    for server, pts in sorted(res.get("fanout_cpu", {}).items()):
        pts = sorted(pts)
        c = COLORS.get(server, None)
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "o-", color=c, label=f"{server} total")
        ax.plot(xs, [p[3] for p in pts], "s--", color=c, alpha=0.6, label=f"{server} system")
    ax.set_xscale("log")
    clients = sorted({p[0] for pts in res.get("fanout_cpu", {}).values() for p in pts})
    if clients:
        ax.minorticks_off()
        ax.set_xticks(clients)
        ax.set_xticklabels([f"{c:,}" for c in clients])
    ax.set_xlabel("clients on one tenant")
    ax.set_ylabel("server CPU µs per delivery")
    ax.set_title("2. fan-out cost per delivery (saturated)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)

    # 5. following the log: service and Postgres CPU against tenants, at rest and under load.
    ax = axes[4]
    pts = sorted(res.get("tenants_cpu", []))
    if pts:
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1] for p in pts], "o-", color=COLORS["orderpush"], label="service, at rest")
        ax.plot(xs, [p[2] for p in pts], "o-", color="#2ca02c", label="Postgres, at rest")
        ax.plot(xs, [p[3] for p in pts], "s--", color=COLORS["orderpush"], label="service, under load")
        ax.plot(xs, [p[4] for p in pts], "s--", color="#2ca02c", label="Postgres, under load")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:,}" for x in xs])
        ax.legend(fontsize=8)
    ax.set_xlabel("tenants")
    ax.set_ylabel("CPU (cores)")
    ax.set_title("7. following the log vs tenants")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)

    axes[5].axis("off")

    fig.suptitle(f"orderpush vs Node baseline — {res.get('started', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
