"""The one prepared GPU check: ``deploy/gpu-check/run.sh OUT [--dry-run]`` (``python -m orchestrator.bench.gpu``).

A GPU is lent now and then, for minutes, with no internet, no Ray, no FAISS and
no pydantic (pydantic travels as wheels; ``deploy/gpu-check/README.md``). So the
check is one script that needs nothing fetched and imports nothing that needs
Ray, FAISS or the service's config. It measures, and writes ``gpu-check.json``
and ``gpu-check.md`` to OUT:
1. the ragged decode kernel against padded SDPA, bf16, batch {1, 8, 32, 128} ×
   max peers {64, 256, 1024, 4096}, its numbers checked against the reference first;
2. an 8B Llama-shaped expert with random bf16 weights: written as safetensors,
   loaded through the transformers backend (against size / host-to-device
   bandwidth), decode tokens/s at batch 1, 16 and 64, and two such experts
   swapped in turn against both resident;
3. the latent mode on CUDA: two small random experts, the latent mixture against
   the primary alone at prompt lengths 64, 256 and 1024, with the ragged kernel;
4. the scheduler's cost model with the measured load time and step(b) line: the
   16 × 7-9B projection config, rewritten with those inputs, for
   ``concilium bench scheduler --config OUT/projection-measured.yaml`` back here.

``--dry-run`` runs the same code on a CPU at tiny shapes (the kernel in
Triton's interpreter) in about a minute: ``make test`` runs it so it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from orchestrator import env
from orchestrator.bench.costmodel import fit_steps
from orchestrator.bench.gpu_experts import (
    LLAMA3_8B,
    TINY,
    build,
    drop_page_cache,
    host_to_device_gbps,
    prompt_words,
)

PROJECTION = Path(__file__).resolve().parents[2] / "deploy" / "projection-16x8b.yaml"
KV_AND_ACTIVATIONS_GB = 2.0
"""What the projection adds to each expert's weights for its KV cache and activations (its own assumption)."""


@dataclass(frozen=True)
class Plan:
    """What one run measures: the real sizes on a GPU, tiny ones in the dry run."""

    device: torch.device
    dtype: torch.dtype
    batches: tuple[int, ...]
    peers: tuple[int, ...]
    expert: dict
    decode_batches: tuple[int, ...]
    new_tokens: int
    latent_shapes: tuple[dict, dict]
    prompt_lengths: tuple[int, ...]
    repeats: int

    @classmethod
    def of(cls, dry_run: bool) -> Plan:
        if dry_run:  # the latent mixture's three boundaries need more than three layers
            deeper, other = dict(TINY, num_hidden_layers=5), dict(TINY, num_hidden_layers=4, hidden_size=48)
            return cls(torch.device("cpu"), torch.float32, (1, 3), (5, 9), TINY, (1, 2), 4, (deeper, other),
                       (8, 16), 1)
        big = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000)
        small = dict(big, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12)
        return cls(torch.device("cuda"), torch.bfloat16, (1, 8, 32, 128), (64, 256, 1024, 4096), LLAMA3_8B,
                   (1, 16, 64), 32, (big, small), (64, 256, 1024), 5)


def kernel_phase(plan: Plan) -> list[dict]:
    from orchestrator.bench.kernels import run_kernel_bench

    rows = run_kernel_bench(list(plan.batches), list(plan.peers), 8, 64, plan.device, plan.dtype,
                            max(3, plan.repeats * 4), lambda _s: None)
    tolerance = 2e-2 if plan.dtype == torch.bfloat16 else 1e-4
    return [{**asdict(r), "speedup": r.speedup, "numbers_ok": r.max_abs_diff is not None
             and r.max_abs_diff <= tolerance} for r in rows]


def _backend(folder: Path, plan: Plan, name: str) -> object:
    from workers.backends.transformers_backend import TransformersBackend
    from workers.config import TransformersExpert

    dtype = "bfloat16" if plan.dtype == torch.bfloat16 else "float32"
    config = TransformersExpert(name=name, source=str(folder), dtype=dtype, device=plan.device.type,
                                chat_template="never", max_batch_size=max(plan.decode_batches), threads=2)
    return TransformersBackend(config, folder.parent)


def _timed(fn: object, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def expert_phase(plan: Plan, work: Path) -> dict:
    """Build, load, decode and swap the real-size expert."""
    from workers.types import Prompt, SamplingParams

    built = build(work / "expert", plan.expert, plan.dtype, plan.device)
    bandwidth = host_to_device_gbps(plan.device)
    cold = plan.device.type == "cuda" and drop_page_cache()  # a dry run leaves this machine's cache alone
    backend = _backend(built.folder, plan, "a")
    load_s = _timed(backend.load, plan.device)
    params = SamplingParams(max_new_tokens=plan.new_tokens)
    backend.generate([Prompt(text=prompt_words(16))], params)  # warm-up
    steps, tokens_per_s = {}, {}
    for b in plan.decode_batches:
        prompts = [Prompt(text=prompt_words(16, offset=3 + i)) for i in range(b)]
        t0 = time.perf_counter()
        out = backend.generate(prompts, params)
        took = time.perf_counter() - t0
        steps[b] = took / plan.new_tokens
        tokens_per_s[b] = sum(c.completion_tokens for c in out) / took
    memory = backend.memory_bytes()
    backend.unload()
    floor = None if bandwidth is None else built.size_bytes / 1e9 / bandwidth
    swap = swap_phase(plan, built.folder)
    step_s, per_row = fit_steps(steps)
    return {"parameters": built.parameters, "size_gb": built.size_bytes / 1e9, "build_s": built.build_s,
            "save_s": built.save_s, "page_cache_dropped": cold, "load_s": load_s,
            "host_to_device_gbps": bandwidth, "load_floor_s": floor,
            "load_over_floor": None if floor is None else load_s / floor, "memory_gb": memory / 2**30,
            "step_s_by_batch": steps, "tokens_per_s": tokens_per_s, "step_s": step_s, "step_s_per_row": per_row,
            **swap}


def swap_phase(plan: Plan, folder: Path, rounds: int = 2) -> dict:
    """Two experts in turn: swapped (load, decode, unload each time) against both resident (loaded once)."""
    from workers.types import Prompt, SamplingParams

    prompts = [Prompt(text=prompt_words(16, offset=5 + i)) for i in range(16)]
    params = SamplingParams(max_new_tokens=plan.new_tokens)
    a, b = _backend(folder, plan, "a"), _backend(folder, plan, "b")

    def swapped() -> None:
        for _ in range(rounds):
            for backend in (a, b):
                backend.load()
                backend.generate(prompts, params)
                backend.unload()

    swap_s = _timed(swapped, plan.device)
    a.load()
    b.load()
    resident_s = _timed(lambda: [x.generate(prompts, params) for _ in range(rounds) for x in (a, b)], plan.device)
    a.unload()
    b.unload()
    return {"swap_rounds": rounds, "swapped_s": swap_s, "resident_s": resident_s,
            "swap_cost_s": (swap_s - resident_s) / (2 * rounds)}


def latent_phase(plan: Plan, work: Path) -> list[dict]:
    """The latent mixture of two small random experts against the primary alone, on the plan's device."""
    from orchestrator.latent.checkpoint import LatentSettings
    from orchestrator.latent.experts import build_mixture
    from orchestrator.latent.latency import latency
    from orchestrator.latent.mixture import ExpertShape
    from routers.embedding import DIM

    experts, shapes = {}, []
    for i, shape in enumerate(plan.latent_shapes):
        name = f"expert-{i}"
        backend = _backend(build(work / name, shape, plan.dtype, plan.device, seed=i).folder, plan, name)
        backend.load()
        experts[name] = (backend.model, backend.tokenizer)
        shapes.append(ExpertShape(name, shape["num_hidden_layers"], shape["hidden_size"], "random"))
    mixture = build_mixture(experts, shapes, LatentSettings(), DIM).to(plan.device)
    rows = latency(mixture, "expert-0", list(plan.prompt_lengths), 16 if plan.device.type == "cuda" else 2,
                   plan.repeats)
    return [{**asdict(r), "ratio": r.ratio} for r in rows]


def projection(expert: dict, out: Path) -> Path:
    """The 16 × 7-9B projection with this run's load time and step line in place of its assumptions, each expert
    scaled from the measured 8B by its parameter count (weights to move, and to read per decode step)."""
    data = yaml.safe_load(PROJECTION.read_text())
    measured_params = expert["parameters"] / 1e9
    for e in data["experts"]:
        scale = (e["memory_gb"] - KV_AND_ACTIVATIONS_GB) / 2 / measured_params  # bf16: 2 bytes a parameter
        e.update(memory_gb=round(expert["memory_gb"] * scale + KV_AND_ACTIVATIONS_GB, 2),
                 load_s=round(expert["load_s"] * scale, 3), step_s=round(expert["step_s"] * scale, 6),
                 step_s_per_row=round(expert["step_s_per_row"] * scale, 7))
    path = out / "projection-measured.yaml"
    path.write_text("# Written by the GPU check: deploy/projection-16x8b.yaml with the measured load time and step "
                    "line (scaled per expert by parameters).\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def markdown(result: dict) -> str:
    lines = [f"# GPU check, {result['date']}, {result['device']}", "", "## Kernel (ms per call, median)", "",
             "| batch | max peers | padded SDPA | Triton ragged | SDPA / Triton | numbers ok |", "|---|---|---|---|---|---|"]
    for k in result["kernel"]:
        triton = "-" if k["triton_ms"] is None else f"{k['triton_ms']:.3f}"
        speed = "-" if k["speedup"] is None else f"{k['speedup']:.2f}x"
        lines.append(f"| {k['batch']} | {k['peer_len']} | {k['padded_sdpa_ms']:.3f} | {triton} | {speed} | "
                     f"{k['numbers_ok']} |")
    e = result["expert"]
    lines += ["", "## Real-size expert", "", f"- {e['parameters'] / 1e9:.2f} B parameters, {e['size_gb']:.1f} GB",
              f"- load {e['load_s']:.2f} s (page cache dropped: {e['page_cache_dropped']}); floor "
              f"{e['load_floor_s'] or 0:.2f} s at {e['host_to_device_gbps'] or 0:.1f} GB/s host to device; "
              f"ratio {e['load_over_floor'] or 0:.2f}",
              "- decode tokens/s: " + ", ".join(f"batch {b}: {t:.1f}" for b, t in e["tokens_per_s"].items()),
              f"- step(b) = {e['step_s'] * 1000:.2f} ms + {e['step_s_per_row'] * 1000:.3f} ms × (b − 1)",
              f"- two experts, {e['swap_rounds']} rounds: swapped {e['swapped_s']:.1f} s, resident "
              f"{e['resident_s']:.1f} s, {e['swap_cost_s']:.2f} s per swap", "",
              "## Latent mode (s, median)", "", "| prompt tokens | primary alone | latent | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['primary_alone_s']:.3f} | {r['latent_s']:.3f} | {r['ratio']:.2f}x |"
              for r in result["latent"]]
    lines += ["", f"Projection config: `{result['projection']}`; rerun it with `concilium bench scheduler --config "
              f"{result['projection']} --device cuda:0 --budget-gb 80 --new-tokens 256` on a machine with Ray.", ""]
    return "\n".join(lines)


def run(out: Path, dry_run: bool) -> dict:
    plan = Plan.of(dry_run)
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run, or on the GPU machine")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=env.get(env.GPU_CHECK_WORK)) as tmp:
        work = Path(tmp)
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry_run,
                  "device": torch.cuda.get_device_name(0) if plan.device.type == "cuda" else "CPU (dry run)",
                  "torch": torch.__version__, "kernel": kernel_phase(plan)}
        result["expert"] = expert_phase(plan, work)
        result["latent"] = latent_phase(plan, work)
    result["projection"] = str(projection(result["expert"], out))
    result["wall_s"] = time.perf_counter() - started
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu-check.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder for gpu-check.json, gpu-check.md and the projection")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, the kernel interpreted")
    args = parser.parse_args(argv)
    if args.dry_run:  # Triton reads this when the kernel module is first imported, which is after this line
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = run(args.out, args.dry_run)
    print(f"GPU check done in {result['wall_s']:.0f} s: {args.out / 'gpu-check.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
