"""Measuring routing on labelled outcomes: cross-validation, selection, the cost frontier, grading and the
aggregator test. Nothing here runs while a query is served; the live routers are the rest of ``routers``."""
