"""Offline work on recorded outcomes: evaluation glue, profiling, plots."""
