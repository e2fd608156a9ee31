"""The CLI as a user runs it: a subprocess, real Ray, the real bundled models."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.long


def concilium(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **env},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--expert", "nope", "hi"), "unknown expert 'nope'; configured experts: smollm2, gemma3"),
        (("generate", "--expert", "smollm2", "   "), "the prompt is empty"),
        (("ask", ""), "the prompt is empty"),
        (("models", "pull", "nope"), "unknown model 'nope'"),
        (("models", "pull"), "name a model to pull"),
        (("generate", "--expert", "smollm2", "-n", "0", "hi"), "--max-new-tokens must be at least 1"),
        (("ask", "--config", "/no/such.yaml", "hi"), "config file /no/such.yaml does not exist"),
        (("bench", "kernels", "--device", "cuda"), "--device cuda: use cpu, or cuda on a machine where torch sees"),
        (("bench", "kernels", "--batches", "1,x"), "--batches"),
        (("ask", "--router", "latent", "hi"), "--router latent needs a checkpoint: train one with"),
        (("key-id", ""), "no key given: pass it as the argument or on stdin"),
        (("bench", "models", "--backend", "tgi"), "--backend 'tgi': choose from transformers, vllm"),
    ],
)
def test_bad_input_exits_2_with_a_message(args, message):
    proc = concilium(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr


def test_key_id_prints_what_the_config_and_usage_name_a_key_by():
    """The key id is the prefix of the digest that server.api_key_sha256 holds, and is read from stdin too."""
    by_arg = concilium("key-id", "team-a-secret")
    by_stdin = subprocess.run([sys.executable, "-m", "orchestrator", "key-id"], input="team-a-secret\n",
                              capture_output=True, text=True, timeout=60)
    assert by_arg.returncode == by_stdin.returncode == 0 and by_arg.stdout == by_stdin.stdout
    sha = "9a437339f86986f3de68d17a40511c2e61588bb30f4c5e01ab5c4991a2a4dc41"  # sha256sum of "team-a-secret"
    assert by_arg.stdout.split() == ["key", "id:", sha[:16], "sha256:", sha]


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and group of the CLI, read from the app itself so that a new one is covered."""
    import typer.main

    from orchestrator.cli import app

    def walk(cmd: object, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = [path]
        for name, sub in getattr(cmd, "commands", {}).items():  # a group (typer bundles its own click)
            found += walk(sub, (*path, name))
        return found

    return walk(typer.main.get_command(app), ())


@pytest.mark.parametrize("cmd", _command_paths(), ids=lambda c: " ".join(c) or "concilium")
def test_every_command_has_help(cmd):
    proc = concilium(*cmd, "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout
    assert proc.stdout.count("\n") > 3  # more than a bare usage line: the docstring and options


@pytest.mark.models
def test_ask_prints_both_experts_answers(store):
    proc = concilium("ask", "What is the capital of France?", "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2" in proc.stdout and "gemma3" in proc.stdout
    assert proc.stdout.count("Paris") >= 2  # both models know it


@pytest.mark.models
def test_generate_and_experts(store):
    proc = concilium("generate", "--expert", "smollm2", "What is the capital of France?", "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "finish=" in proc.stderr
    proc = concilium("experts")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2" in proc.stdout and "gemma3" in proc.stdout and "unloaded" in proc.stdout


@pytest.mark.ray
def test_ask_with_no_models_pulled_names_the_fix_without_traceback(tmp_path):
    proc = concilium("ask", "hi", "-n", "4", CONCILIUM_MODEL_STORE=str(tmp_path / "empty"))
    assert proc.returncode == 1  # no expert could answer
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "run `concilium models pull smollm2-135m-instruct`" in text
    assert "run `concilium models pull gemma3-270m`" in text
    assert 'File "' not in text and "Traceback" not in text


@pytest.mark.models
def test_bench_models_reports_loads_and_throughput(store, tmp_path):
    out = tmp_path / "b.json"
    proc = concilium("bench", "models", "--models", "smollm2-135m-instruct", "--batch-sizes", "1,2",
                     "--new-tokens", "3", "--repeats", "1", "--no-gguf", "--no-drop-caches", "--backend",
                     "transformers,vllm", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    import json

    hf, vllm = json.loads(out.read_text())
    assert (hf["backend"], vllm["backend"]) == ("transformers", "vllm")
    assert hf["gguf_load_s"] is None and hf["store_cold_load_s"] > 0 and not hf["caches_dropped"]
    assert vllm["store_cold_load_s"] > 0 and vllm["store_warm_load_s"] is None  # a vLLM load is an engine start
    for fig in (hf, vllm):
        assert set(fig["tokens"]) == {"1", "2"} and 1 <= fig["tokens"]["1"] <= 3
        assert fig["tokens_per_s"]["2"] > 0 and 0 < fig["ttft_s"] < fig["seconds"]["1"] * 3
    assert "vs first backend" in " ".join(proc.stdout.split())


@pytest.mark.models
def test_bench_router_runs_cold_and_warm(bench_data):
    proc = concilium("bench", "router", "--questions", str(bench_data / "mmlu-pro-28llm"), "--experts", "4",
                     "--skills", "300", "--windows", "1,4", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "│ 300" in line]
    assert len(rows) == 4 and all("flat" in r for r in rows)  # 2 windows × 2 encoders, the skill router's
    assert sum("│ cluster" in line for line in proc.stdout.splitlines()) == 4  # and the cluster router's
    assert {"minilm", "static"} <= {w for line in rows for w in line.replace("│", " ").split()}


@pytest.mark.models
def test_bench_scheduler_compares_the_three_variants(store, tmp_path):
    out = tmp_path / "s.json"
    proc = concilium("bench", "scheduler", "--n", "3", "--new-tokens", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    import json

    rows = {(r["budget"], r["variant"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("1.2 GB", "batched"), ("1.2 GB", "naive"), ("unlimited", "batched"),
                         ("unlimited", "resident")}
    assert all(r["n"] == 3 for r in rows.values())
    # Naive reloads per query; batched loads each expert at most once; with all resident nothing loads.
    assert rows[("1.2 GB", "naive")]["loads"] > rows[("1.2 GB", "batched")]["loads"]
    assert rows[("1.2 GB", "batched")]["loads"] <= 2
    assert rows[("unlimited", "batched")]["loads"] == rows[("unlimited", "resident")]["loads"] == 0
    assert all(r["device_s"] > 0 for r in rows.values())
    assert "throughput =" in proc.stdout
