"""The accuracy-cost frontier and RouterBench's AIQ.

The frontier of a set of (cost, accuracy) points is their upper, non-decreasing
convex hull. A mix of two operating points can reach anything on the segment
between them, by routing a share of the queries to each. AIQ is the area
under that frontier over a fixed cost range, divided by the range. It is the
frontier's mean accuracy across budgets. To the right of the last point the
frontier stays flat. To the left of the cheapest point it is undefined and
counts as 0, so routers with no cheap operating points are charged for it.
"""

from __future__ import annotations

import numpy as np


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper non-decreasing convex hull, sorted by cost."""
    pts = sorted(set(points))
    hull: list[tuple[float, float]] = []
    for p in pts:
        if hull and p[1] <= hull[-1][1]:
            continue  # costs more, no better: dominated
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or under the chord from hull[-2] to p.
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def aiq(points: list[tuple[float, float]], cost_range: tuple[float, float], samples: int = 2001) -> float:
    lo, hi = cost_range
    if hi <= lo:
        raise ValueError(f"empty cost range {cost_range}")
    hull = frontier(points)
    xs = np.linspace(lo, hi, samples)
    hx = np.array([p[0] for p in hull])
    hy = np.array([p[1] for p in hull])
    ys = np.interp(xs, hx, hy, left=0.0, right=hy[-1])
    ys[xs < hx[0]] = 0.0
    return float(np.trapezoid(ys, xs) / (hi - lo))
