"""The ``concilium`` command line: the typer root, with one module per command group.

| module | commands |
|---|---|
| ``experts`` | models list/pull, experts, generate, check-config, key-id |
| ``ask`` | ask, serve |
| ``routing`` | eval, profile |
| ``latent`` | train-latent, bench latent |
| ``bench_compute`` | bench models, bench router, bench kernels |
| ``bench_serving`` | bench scheduler, bench calibrate, bench api, bench load, bench budget, bench chaos, bench remote |
| ``bench_cache`` | bench cache, bench tracing |
| ``cluster`` | cluster deploy/status/down |

Every error a user can cause ends with a one-line message and exit code 2 (``common.friendly``).
"""

from __future__ import annotations

from orchestrator.engine.runtime import prepare_ray_env

prepare_ray_env()  # before anything imports ray

import sys  # noqa: E402

import typer  # noqa: E402

from orchestrator.cli import ask, bench_cache, bench_compute, bench_serving, experts, latent, routing  # noqa: E402
from orchestrator.cli.cluster import cluster_app  # noqa: E402
from orchestrator.cli.common import err  # noqa: E402

app = typer.Typer(
    help="Concilium: one endpoint over many expert LLMs, routed per query and batched by expert.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks; record their results in docs/benchmarks.md.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(cluster_app, name="cluster")
experts.register(app)
ask.register(app)
routing.register(app)
latent.register(app, bench_app)
bench_compute.register(bench_app)
bench_serving.register(bench_app)
bench_cache.register(bench_app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
