"""The service: config, runtime, CLI, and (later) the pipeline, scheduler and API."""
