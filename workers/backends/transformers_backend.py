"""Local models through Hugging Face transformers: batched, left-padded generation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteriaList

from workers.backends import OnDelta
from workers.backends.row_streamer import RowStops, RowStreamer
from workers.backends.templates import ChatFormat, load_tokenizer
from workers.config import TransformersExpert
from workers.model_store import ModelStore, weight_bytes
from workers.types import Completion, Prompt, SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersBackend:
    def __init__(self, config: TransformersExpert, model_store: Path) -> None:
        self.config = config
        self.store = ModelStore(model_store)
        self.model = None
        self.tokenizer = None
        self.format: ChatFormat | None = None
        self.device = self._pick_device()

    def _pick_device(self) -> str:
        # torch decides, not Ray's GPU ids: a logical GPU in a test cluster is no CUDA device.
        if self.config.device == "cuda" or (
            self.config.device == "auto" and torch.cuda.is_available()
        ):
            return "cuda"
        return "cpu"

    def _folder(self) -> Path | str:
        return self.store.resolve(self.config.source)

    def estimate_memory_bytes(self) -> int:
        if self.config.memory_gb is not None:
            return int(self.config.memory_gb * 2**30)
        folder = self._folder()
        return 0 if isinstance(folder, str) else weight_bytes(folder, self.config.dtype)

    def load(self) -> None:
        if self.device == "cpu":
            torch.set_num_threads(self.config.threads or max(1, int(self.config.num_cpus)))
        folder = self._folder()
        tokenizer = load_tokenizer(folder)
        dtype = "auto" if self.config.dtype == "auto" else _DTYPES[self.config.dtype]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        model.to(self.device).eval()
        self.tokenizer, self.model = tokenizer, model
        self.format = ChatFormat.of(tokenizer, self.config, self.config.name)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None
        self.format = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        if self.model is None:
            return 0
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        # Tied embeddings share storage; count each storage once.
        seen: dict[int, int] = {}
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def _encode(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """The prompts' ids by the shared rule (``ChatFormat``), left-padded into one batch."""
        ids = [self.format.token_ids(p) for p in prompts]
        enc = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def count_tokens(self, prompts: list[Prompt]) -> list[int]:
        self._require_loaded()
        return [len(self.format.token_ids(p)) for p in prompts]

    def _require_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        self._require_loaded()
        out: list[Completion] = []
        step = self.config.max_batch_size
        for start in range(0, len(prompts), step):
            shift = (lambda r, t, s=start: on_delta(s + r, t)) if on_delta else None
            ended = (lambda r, s=start: cancelled(s + r)) if cancelled else None
            out.extend(self._generate_batch(prompts[start : start + step], params, shift, ended))
        return out

    def _generate_batch(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None,
                        cancelled: Callable[[int], bool] | None) -> list[Completion]:
        enc = self._encode(prompts)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        eos = self._eos_ids()
        if not params.greedy:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        streamer = None
        if on_delta is not None or cancelled is not None or params.stop:
            streamer = RowStreamer(self.tokenizer, len(prompts), eos, params.stop, on_delta)
            sampling.update(streamer=streamer, stopping_criteria=StoppingCriteriaList(
                [RowStops(cancelled or (lambda _r: False), streamer)]))
        generated = self.model.generate(
            **enc,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            **sampling,
        )
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        if streamer is not None:
            return [self._streamed(streamer, row, int(n), cancelled) for row, n in enumerate(prompt_tokens)]
        prompt_len = enc["input_ids"].shape[1]
        completions = []
        for row, n_prompt in zip(generated[:, prompt_len:].tolist(), prompt_tokens):
            stop = next((i for i, tok in enumerate(row) if tok in eos), None)
            tokens = row if stop is None else row[:stop]
            completions.append(
                Completion(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    prompt_tokens=int(n_prompt),
                    completion_tokens=len(tokens) + (0 if stop is None else 1),
                    finish_reason="length" if stop is None else "stop",
                )
            )
        return completions

    @staticmethod
    def _streamed(streamer: RowStreamer, row: int, prompt_tokens: int, cancelled: Callable[[int], bool] | None
                  ) -> Completion:
        """A row's completion as the streamer saw it: its text up to EOS, a stop string, or the cancel."""
        if streamer.cancelled[row]:
            reason = "cancelled"
        elif streamer.done[row]:
            reason = "stop"  # EOS or a stop string
        else:
            reason = "length"
        eos = streamer.done[row] and not streamer.stopped[row] and not streamer.cancelled[row]
        return Completion(text=streamer.text(row).rstrip(), prompt_tokens=prompt_tokens,
                          completion_tokens=len(streamer.tokens[row]) + (1 if eos else 0), finish_reason=reason)

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {"dtype": self.config.dtype, "source": self.config.source}
        if self.model is not None:
            cfg = self.model.config
            info.update(
                architecture=cfg.model_type,
                layers=getattr(cfg, "num_hidden_layers", None),
                hidden_size=getattr(cfg, "hidden_size", None),
                chat_template=self.format.uses_template,
                threads=torch.get_num_threads() if self.device == "cpu" else None,
            )
        return info
