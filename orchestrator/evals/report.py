"""The live table: one row per configuration, each expert alone first, as a rich table, JSON and a plot of
accuracy against latency and against cost."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

COLUMNS = ("configuration", "accuracy", "95% CI", "p50 s", "p95 s", "tokens/q", "USD/q", "calls/q")


def table(rows: list[dict[str, object]], title: str) -> Table:
    """The rows as printed: accuracy with its Wilson interval, latency percentiles, tokens, cost and calls."""
    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        low, high = r["ci95"]
        t.add_row(str(r["name"]), f"{r['accuracy']:.1%}", f"{low:.1%}-{high:.1%}", f"{r['latency_p50_s']:.2f}",
                  f"{r['latency_p95_s']:.2f}", f"{r['tokens_per_query']:.0f}", f"{r['cost_per_query_usd']:.2e}",
                  f"{r['calls_per_query']:.2f}")
    return t


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Accuracy (with its interval) against median latency, and against mean cost; experts alone as squares."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "latency_p50_s", "median latency (s)"),
                           (axes[1], "cost_per_query_usd", "mean cost per query (USD)")):
        for r in rows:
            low, high = r["ci95"]
            alone = str(r["name"]).endswith(" alone")
            ax.errorbar(r[key], r["accuracy"], yerr=[[r["accuracy"] - low], [high - r["accuracy"]]],
                        fmt="s" if alone else "o", capsize=3, alpha=0.8)
            ax.annotate(str(r["name"]), (r[key], r["accuracy"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("live: accuracy against latency and cost (squares: an expert alone)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
