"""The HTTP API: app factory, middleware, security, streaming, schemas, service controller, jobs, store, metrics.

This package imports nothing on its own, so that the client SDK can import ``api.schemas`` without FastAPI.
"""
