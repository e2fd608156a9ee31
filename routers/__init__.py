"""Routing: the Router protocol and its implementations. Knows nothing of Ray or HTTP."""
