"""``concilium cluster``: the API as a Ray Serve application on a running Ray cluster (``orchestrator.serving``)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.common import AddressOpt, ConfigOpt, configure, err, friendly, out

cluster_app = typer.Typer(help="Concilium as a Ray Serve application on a running Ray cluster.", no_args_is_help=True)


def cluster_deploy(address: AddressOpt, config: ConfigOpt = None) -> None:
    """Deploy (or update) the API as a Ray Serve application; the experts become shared, detached actors.

    Checks that every expert can be placed before anything starts. Experts whose config changed are restarted;
    the others keep their loaded models.
    """
    from orchestrator.serving.cluster import deploy

    cfg = configure(config)
    with err.status(f"deploying to {address}"):
        url, restarted = deploy(cfg, address)
    out.print(f"application {cfg.serve.app_name!r} is running at {url}", highlight=False)
    out.print(f"restarted experts: {', '.join(restarted) or 'none'}", highlight=False)


def cluster_status(
    address: AddressOpt,
    config: ConfigOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """The application's state and replicas, the nodes, and where each expert runs (node and GPU)."""
    from dataclasses import asdict

    from orchestrator.serving.cluster import status

    st = status(configure(config), address)
    if json_out:
        out.print_json(json.dumps(asdict(st)))
        return
    out.print(f"application {st.app}: {st.app_status} {st.message}".rstrip(), highlight=False)
    out.print("replicas: " + (", ".join(f"{n} {k}" for k, n in st.replicas.items()) or "none"), highlight=False)
    nodes = Table(title="nodes")
    for col in ("node", "ip", "alive", "resources"):
        nodes.add_column(col, overflow="fold")
    for n in st.nodes:
        shown = {k: v for k, v in n["resources"].items() if not k.startswith("node:") and k != "object_store_memory"}
        nodes.add_row(n["node_id"][:8], n["ip"], str(n["alive"]), json.dumps(shown))
    out.print(nodes)
    experts = Table(title="experts")
    for col in ("name", "state", "node", "ip", "GPUs", "device", "pid"):
        experts.add_column(col, overflow="fold")
    for e in st.experts:
        experts.add_row(e.name, e.state, e.node_id[:8], e.node_ip, ",".join(e.gpu_ids) or "-", e.device,
                        str(e.pid or "-"))
    out.print(experts)


def cluster_down(address: AddressOpt, config: ConfigOpt = None) -> None:
    """Delete the application and stop its shared experts; the Ray cluster itself keeps running."""
    from orchestrator.serving.cluster import down

    cfg = configure(config)
    stopped = down(cfg, address)
    out.print(f"deleted application {cfg.serve.app_name!r}; stopped experts: {', '.join(stopped) or 'none'}",
              highlight=False)


cluster_app.command("deploy")(friendly(cluster_deploy))
cluster_app.command("status")(friendly(cluster_status))
cluster_app.command("down")(friendly(cluster_down))
