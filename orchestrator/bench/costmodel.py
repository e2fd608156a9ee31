"""The simulated experts' cost model: a decode step's time as a line in the batch size.

step(b) = step_s + step_s_per_row × (b − 1), fitted to measured step times. ``bench calibrate`` fits it to the
experts here; the GPU check fits it on a GPU. Nothing here needs Ray or the config, so the GPU check can use it.
"""

from __future__ import annotations

import numpy as np


def fit_steps(step_s_by_batch: dict[int, float]) -> tuple[float, float]:
    """(step_s, step_s_per_row) of the line through the measured step times; the slope is kept non-negative."""
    rows = np.array(sorted(step_s_by_batch), dtype=float)
    times = np.array([step_s_by_batch[int(b)] for b in rows])
    if len(rows) == 1:
        return float(times[0]), 0.0
    slope, intercept = np.polyfit(rows - 1, times, 1)
    slope = max(float(slope), 0.0)
    return max(float(intercept), float(times.min()) * 0.5), slope
