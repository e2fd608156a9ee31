"""The local model store: a real conversion from the bundled GGUF, idempotence, verification."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import SMOLLM
from workers.model_store import MANIFEST, ModelStore, ModelStoreError, embedder_path

pytestmark = pytest.mark.models


def test_pull_converts_once_then_is_a_verified_no_op(tmp_path):
    ms = ModelStore(tmp_path / "store")
    steps = []
    path, converted = ms.pull(SMOLLM, on_step=steps.append)
    assert converted and path == tmp_path / "store" / SMOLLM
    assert any("de-quantising" in s for s in steps) and steps[-1] == "verifying"
    manifest = json.loads((path / MANIFEST).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert not list((tmp_path / "store").glob(".*partial"))
    mtimes = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}

    steps.clear()
    again, converted_again = ms.pull(SMOLLM, on_step=steps.append)
    assert (again, converted_again) == (path, False)
    assert steps == ["verifying the stored copy"]
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == mtimes
    assert [r.name for r in ms.list() if r.pulled and r.kind == "llm"] == [SMOLLM]

    # A corrupted file is caught by verification, and a forced pull repairs it.
    with (path / "config.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(ModelStoreError, match="config.json does not match its recorded SHA-256"):
        ms.pull(SMOLLM)
    _, repaired = ms.pull(SMOLLM, force=True)
    assert repaired
    ms.verify(SMOLLM)


def test_resolve_and_unknown_names(tmp_path, store):
    empty = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="run `concilium models pull gemma3-270m`"):
        empty.resolve("gemma3-270m")
    with pytest.raises(ModelStoreError, match="unknown model 'llama-9000'"):
        empty.pull("llama-9000")
    with pytest.raises(ModelStoreError, match="neither a bundled model"):
        empty.resolve("./no/such/dir")
    assert empty.resolve("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert store.resolve(SMOLLM) == store.path(SMOLLM)
    copy = tmp_path / "copy"
    shutil.copytree(store.path(SMOLLM), copy, ignore=shutil.ignore_patterns("*.safetensors"))
    assert empty.resolve(str(copy)) == copy


def test_bundled_embedder_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedder_path()), device="cpu")
    emb = model.encode(["integral calculus", "differential equations", "medieval poetry"], normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])
