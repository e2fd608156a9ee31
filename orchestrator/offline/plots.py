"""PNG plots for ``concilium eval --plots``: accuracy against k, and the accuracy-cost frontier."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from routers.scoring.frontier import frontier  # noqa: E402


def plot_accuracy_vs_k(rows: list[dict[str, float]], router: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["router"] for r in rows], "o-", label=f"{router} router (vote)")
    ax.plot(ks, [r["per_category_vote"] for r in rows], "s--", label="per-category top-k (vote)")
    ax.axhline(rows[0]["best_single"], color="grey", linestyle=":", label="best single")
    ax.set_xlabel("k (experts per query)")
    ax.set_ylabel("accuracy")
    ax.set_xticks(ks)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(
    router_points: list[tuple[float, float]],
    singles: dict[str, tuple[float, float]],
    router: str,
    aiq: dict[str, float],
    path: Path,
) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    hull = frontier(router_points)
    ax.plot([p[0] for p in router_points], [p[1] for p in router_points], "o", alpha=0.5, color="C0")
    ax.plot([p[0] for p in hull], [p[1] for p in hull], "-", color="C0",
            label=f"{router} router, λ sweep (AIQ {aiq['router']:.3f})")
    single_hull = frontier(list(singles.values()))
    ax.plot([p[0] for p in single_hull], [p[1] for p in single_hull], "--", color="grey",
            label=f"single models' frontier (AIQ {aiq['single_models']:.3f})")
    for name, (c, a) in singles.items():
        ax.plot(c, a, "x", color="grey")
        ax.annotate(name.split("/")[-1][:18], (c, a), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD, log scale)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
