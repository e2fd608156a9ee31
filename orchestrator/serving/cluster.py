"""``concilium cluster``: deploy the Serve application to a running Ray cluster, show it, tear it down.

The driver connects to the cluster, checks that the experts can be placed
(before anything starts), reconciles the detached expert actors with the
config, and hands the application to Ray Serve. The cluster keeps running it
after the driver exits. Experts whose config changed, or that left the config,
are stopped here. The new ingress replicas start them again from the new
config.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import ray
from ray import serve

from orchestrator.config import ConciliumConfig, RayConfig
from orchestrator.engine.runtime import init_ray
from orchestrator.serving.serve import application
from workers.errors import UserError
from workers.placement import ACTOR_PREFIX, check_placement
from workers.pool import live_nodes

CONNECT_TIMEOUT_S = 5.0
INFO_TIMEOUT_S = 10.0


class ClusterError(UserError, RuntimeError):
    """The cluster cannot be reached, or the deployment cannot be done as asked."""


@dataclass
class ExpertPlacement:
    name: str
    state: str
    node_ip: str
    node_id: str
    gpu_ids: list[str]
    device: str
    pid: int | None = None


@dataclass
class ClusterStatus:
    app: str
    app_status: str
    message: str
    replicas: dict[str, int]
    experts: list[ExpertPlacement]
    nodes: list[dict[str, object]]


def connect(address: str, namespace: str) -> None:
    """Join the cluster as a driver, after a quick reachability check: ``ray.init`` itself retries an
    unreachable address for a long time before it gives up."""
    if address != "auto":
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(f"--address {address!r} is not HOST:PORT (the head's GCS port, 6379 by default)")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise ClusterError(
                f"cannot reach a Ray cluster at {address}: {exc}. Is `ray start --head` running there, and is "
                "that its GCS port?"
            ) from None
    init_ray(RayConfig(address=address, namespace=namespace))


def _named_experts(namespace: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace and a["name"].startswith(ACTOR_PREFIX)]


def reconcile_experts(config: ConciliumConfig) -> list[str]:
    """Stop the detached experts that left the config or whose config changed; returns their names."""
    wanted = {e.name: e.model_dump_json() for e in config.experts}
    stopped = []
    for actor_name in _named_experts(config.ray.namespace):
        name = actor_name[len(ACTOR_PREFIX):]
        actor = ray.get_actor(actor_name, namespace=config.ray.namespace)
        try:
            current = ray.get(actor.config_json.remote(), timeout=INFO_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            current = None
        if wanted.get(name) != current:
            ray.kill(actor, no_restart=True)
            stopped.append(name)
    return stopped


def deploy(config: ConciliumConfig, address: str) -> tuple[str, list[str]]:
    """Deploy and wait until the application runs; returns its URL and the experts stopped for a change."""
    connect(address, config.ray.namespace)
    check_placement(config.experts, live_nodes())
    stopped = reconcile_experts(config)
    s = config.serve
    serve.start(http_options={"host": s.http_host, "port": s.http_port}, proxy_location="HeadOnly")
    try:
        serve.run(application(config), name=s.app_name, route_prefix=s.route_prefix)
    except RuntimeError as exc:
        raise ClusterError(f"the application did not start: {exc}") from None
    return f"http://{s.http_host}:{s.http_port}{s.route_prefix}", stopped


def _name(state: object) -> str:
    """A Serve status enum as its plain name (RUNNING), not its repr."""
    return str(getattr(state, "value", state))


def status(config: ConciliumConfig, address: str) -> ClusterStatus:
    connect(address, config.ray.namespace)
    nodes = {n["NodeID"]: n for n in ray.nodes()}
    apps = serve.status().applications
    app = apps.get(config.serve.app_name)
    replicas: dict[str, int] = {}
    if app is not None:
        for deployment in app.deployments.values():
            for state, count in deployment.replica_states.items():
                replicas[_name(state)] = replicas.get(_name(state), 0) + count
    experts = []
    for e in config.experts:
        try:
            actor = ray.get_actor(ACTOR_PREFIX + e.name, namespace=config.ray.namespace)
            info = ray.get(actor.info.remote(), timeout=INFO_TIMEOUT_S)
        except ValueError:
            experts.append(ExpertPlacement(e.name, "not started", "-", "-", [], "-"))
            continue
        except (ray.exceptions.RayError, TimeoutError) as exc:
            experts.append(ExpertPlacement(e.name, f"unreachable: {type(exc).__name__}", "-", "-", [], "-"))
            continue
        node = nodes.get(info.node_id, {})
        experts.append(ExpertPlacement(e.name, info.state, str(node.get("NodeManagerAddress", "?")),
                                       info.node_id, info.gpu_ids, info.device, info.pid))
    return ClusterStatus(
        app=config.serve.app_name, app_status=_name(app.status) if app else "NOT DEPLOYED",
        message=app.message if app else "", replicas=replicas, experts=experts,
        nodes=[{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "alive": n["Alive"],
                "resources": n["Resources"]} for n in nodes.values()],
    )


def down(config: ConciliumConfig, address: str) -> list[str]:
    """Delete the application and stop its detached experts; returns the experts stopped."""
    connect(address, config.ray.namespace)
    serve.delete(config.serve.app_name)
    stopped = []
    for actor_name in _named_experts(config.ray.namespace):
        ray.kill(ray.get_actor(actor_name, namespace=config.ray.namespace), no_restart=True)
        stopped.append(actor_name[len(ACTOR_PREFIX):])
    return stopped
