"""Benchmarks: each runs its competing variants side by side in one run and reports ratios."""
