"""Experts: Ray actors that host one model each, their backends, the pool and the model store."""
