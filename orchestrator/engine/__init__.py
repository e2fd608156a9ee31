"""The engine: request types, planner, executor, scheduler, pipeline and the Ray runtime. No HTTP here."""
