"""The Ray Serve application: the same FastAPI app as ``concilium serve``, as a Serve ingress deployment.

Each ingress replica runs ``create_app`` in full: its own scheduler, store
client and metrics. The experts are shared. They are named, detached actors
in the config's Ray namespace: the first replica creates them, and every other
replica, or a restarted one, attaches to them and finds them loaded. An
ingress restart never reloads a model, and several replicas share one set of
experts on the GPU nodes.

Three ways to run it, all through ``build``:
- ``concilium cluster deploy --address HOST:PORT --config FILE`` (``orchestrator.serving.cluster``);
- ``serve run orchestrator.serving.serve:build config=FILE``;
- a Serve config file or a KubeRay ``serveConfigV2`` naming ``import_path: orchestrator.serving.serve:build``
  with ``args: {config: FILE}`` (``deploy/kuberay/rayservice.yaml``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from orchestrator.api.app import create_app
from orchestrator.config import ConciliumConfig, load_config


class ConciliumIngress:
    """The deployment class. Each replica builds the FastAPI app when it starts (Serve calls
    ``__serve_build_asgi_app__``), so the app's lifespan starts that replica's service."""

    def __init__(self, config: ConciliumConfig, config_path: Path | None) -> None:
        self.config, self.config_path = config, config_path

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.config, config_path=self.config_path, detached=True)


def deployment_options(config: ConciliumConfig) -> dict[str, object]:
    s = config.serve
    options: dict[str, object] = {
        "name": s.deployment_name,
        "ray_actor_options": {"num_cpus": s.num_cpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "graceful_shutdown_timeout_s": config.server.drain_timeout_s,
    }
    if s.autoscaling is not None:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    return options


def application(config: ConciliumConfig, config_path: Path | None = None) -> Application:
    """The Serve application for a parsed config; ``config_path`` is the file it was read from, if any."""
    ingress = serve.deployment(**deployment_options(config))(serve.ingress()(ConciliumIngress))
    return ingress.bind(config, config_path)


def build(args: dict[str, str]) -> Application:
    """The application builder named by ``serve run`` and Serve config files: ``args`` may name ``config``, a
    config file readable on the node that builds the app; without it, the usual lookup applies."""
    path = Path(args["config"]) if args.get("config") else None
    return application(load_config(path), path)
