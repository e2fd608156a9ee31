"""The service: config, the HTTP API, the engine (scheduler, pipeline, Ray runtime), the latent mode, deployment,
offline tooling, benchmarks, the CLI and the client SDK. The README's "How the code is laid out" maps it."""
