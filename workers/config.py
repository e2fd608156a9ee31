"""Expert and pool settings: the worker layer's part of ``concilium.yaml``.

They live here, not in the orchestrator, so that the worker layer never
imports the layer above it; the orchestrator's config composes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from workers.types import Price, SamplingParams


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationDefaults(Strict):
    """Per-expert generation settings; a request may override them."""

    max_new_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="strings that end this expert's answers, besides a "
                            "request's own (a base model's answer to 'Question: ...\\nAnswer:' ends at its line)")

    @field_validator("stop")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not all(v):
            raise ValueError("a stop string cannot be empty")
        return v

    def sampling(self, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: tuple[str, ...] = ()) -> SamplingParams:
        """The one way an expert's sampling parameters are made: these defaults, with a request's overrides (a
        request's stop strings join the expert's)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p,
            seed=self.seed if seed is None else seed,
            stop=tuple(dict.fromkeys([*self.stop, *stop])),
        )


class TokenPrices(Strict):
    """USD per 1M tokens, the unit of bench-data's prices.json and of providers' price sheets."""

    input: float = Field(ge=0.0, description="USD per 1M prompt tokens")
    output: float = Field(ge=0.0, description="USD per 1M generated tokens")


class ExpertBase(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    max_batch_size: int = Field(16, ge=1, le=1024)
    generation: GenerationDefaults = GenerationDefaults()
    cost_per_1k_tokens: float = Field(0.0, ge=0.0, description="USD per 1k tokens, prompt and output alike")
    prices: TokenPrices | None = Field(None, description="USD per 1M input and per 1M output tokens, as a "
                                       "bench-data prices.json writes them; instead of cost_per_1k_tokens")
    tags: list[str] = []
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources the actor needs, e.g. {'gpu_node': 1} to pin it to a node type",
    )
    memory_gb: float | None = Field(
        None, gt=0, description="resident size for the memory budget; estimated from the weights when unset"
    )
    max_restarts: int = Field(3, ge=-1)

    @model_validator(mode="after")
    def _one_price(self) -> ExpertBase:
        if self.prices is not None and self.cost_per_1k_tokens:
            raise ValueError("set prices (USD per 1M input and output tokens) or cost_per_1k_tokens, not both")
        return self

    @property
    def price(self) -> Price:
        """USD per input and per output token: the one price every cost of this expert is computed with."""
        if self.prices is not None:
            return Price(self.prices.input / 1e6, self.prices.output / 1e6)
        return Price(self.cost_per_1k_tokens / 1000, self.cost_per_1k_tokens / 1000)

    @field_validator("num_gpus")
    @classmethod
    def _gpu_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("above 1, num_gpus must be a whole number of GPUs")
        return v


class LocalPrompting(Strict):
    """How a local model (transformers or vLLM) sees a prompt: its chat template, or plain text."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    plain_prompt: str = Field("{prompt}", description="plain text for a model without a chat template: {prompt} is "
                              "the query (a base model answers 'Question: {prompt}\\nAnswer:' best); a conversation "
                              "is written as 'Role: content' lines whatever this says")

    @field_validator("plain_prompt")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain {prompt}, where the query goes")
        return v


class TransformersExpert(ExpertBase, LocalPrompting):
    backend: Literal["transformers"] = "transformers"
    source: str = Field(description="a model-store name, a local folder, or a model-hub id")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when torch sees a GPU in the actor, else CPU"
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; defaults to the actor's num_cpus (at least 1)"
    )

    @property
    def origin(self) -> str:
        return self.source


class VLLMEngine(Strict):
    """vLLM engine arguments, passed one to one to ``AsyncEngineArgs`` (validated here, before any start)."""

    max_model_len: int | None = Field(None, ge=16, description="context length; None: the model's own")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="share of the GPU for weights and KV cache")
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="GPUs per engine; the actor reserves as many")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = Field(False, description="no CUDA graphs: quicker start, slower decode")
    kv_cache_gb: int = Field(
        1, ge=1, description="CPU only: KV cache GiB (vLLM's VLLM_CPU_KVCACHE_SPACE), part of the memory estimate"
    )


class VLLMExpert(ExpertBase, LocalPrompting):
    """A model served by vLLM's async engine inside the expert's actor: continuous batching over every window's
    requests, token streaming from the engine, and on CUDA sleep mode for swaps."""

    backend: Literal["vllm"]
    source: str = Field(description="a model-store name or a local folder; nothing is fetched from a hub")
    engine: VLLMEngine = VLLMEngine()
    sleep_level: Literal[1, 2] = Field(
        1, description="CUDA: 1 keeps the weights in host RAM while asleep (fast wake), 2 drops them (reload on wake)"
    )
    max_batch_size: int = Field(256, ge=1, le=4096, description="rows the scheduler sends per call; vLLM batches")

    @model_validator(mode="after")
    def _gpus_for_tensor_parallel(self) -> VLLMExpert:
        tp = self.engine.tensor_parallel_size
        if tp > 1 and self.num_gpus != tp:
            raise ValueError(f"engine.tensor_parallel_size is {tp}: set num_gpus to {tp}, so that the actor "
                             "reserves the GPUs its engine shards the model over")
        return self

    @property
    def origin(self) -> str:
        return self.source


class OpenAIExpert(ExpertBase):
    """An OpenAI-compatible server elsewhere (``workers.backends.openai_backend``). The actor keeps one pool of
    HTTP connections to it: at most ``max_concurrency`` open, idle ones closed after ``keepalive_s``."""

    backend: Literal["openai"]
    base_url: str = Field(pattern=r"^https?://")
    model: str
    api_key_env: str | None = Field(None, description="environment variable that holds the API key")
    timeout_s: float = Field(60.0, gt=0, description="a row's deadline, its retries included")
    num_cpus: float = Field(0.0, ge=0.0)
    max_concurrency: int = Field(16, ge=1, description="requests in flight to the server at once; the rest wait")
    requests_per_minute: int | None = Field(None, ge=1, description="the server's request rate limit; None: none")
    tokens_per_minute: int | None = Field(None, ge=1, description="its token rate limit (prompt plus most output)")
    retries: int = Field(3, ge=0, description="tries again after a 429, a 5xx or a lost connection before the "
                         "first token, within timeout_s; never after it")
    backoff_s: float = Field(0.25, gt=0, description="the first retry's wait, doubled each time (full jitter)")
    backoff_max_s: float = Field(8.0, gt=0, description="the longest backoff; a longer Retry-After still counts")
    keepalive_s: float = Field(30.0, gt=0, description="how long an idle connection stays open")
    supports_tools: bool = Field(False, description="the served model calls functions: a request with tools may "
                                 "come here, and its tools, tool_choice and tool turns are passed on as they came")

    @property
    def origin(self) -> str:
        return f"{self.base_url} ({self.model})"


class ReplayExpert(ExpertBase):
    backend: Literal["replay"]
    path: Path = Field(description="a bench-data folder (models.json + data.jsonl)")
    model: str = Field(description="the recorded model whose answers this expert returns")
    num_cpus: float = Field(0.0, ge=0.0)

    @property
    def origin(self) -> str:
        return f"{self.path} ({self.model})"


class SimulatedExpert(ExpertBase):
    """Generation replaced by a cost model calibrated on a real run (``concilium bench calibrate``)."""

    backend: Literal["simulated"]
    memory_gb: float = Field(gt=0, description="resident size for the memory budget")
    device: str = Field("cpu", pattern=r"^(cpu|cuda:\d+)$", description="the budget this expert counts against")
    load_s: float = Field(ge=0.0, description="seconds to load")
    step_s: float = Field(gt=0.0, description="seconds per decode step at batch 1")
    step_s_per_row: float = Field(0.0, ge=0.0, description="extra seconds per decode step per extra row")
    prefill_s_per_token: float = Field(0.0, ge=0.0, description="seconds per prompt token")
    time_scale: float = Field(1.0, gt=0.0, le=1.0, description="every sleep is multiplied by this")
    num_cpus: float = Field(0.0, ge=0.0)
    sleep_mode: bool = Field(False, description="declare sleep support, as a vLLM expert on CUDA has: the pool "
                                                "puts it to sleep instead of unloading it")
    wake_s: float = Field(0.0, ge=0.0, description="seconds a wake-up takes, with sleep_mode")

    @property
    def origin(self) -> str:
        return f"simulated (load {self.load_s:g} s, step {self.step_s * 1000:.2f} ms)"


BACKENDS = ("transformers", "vllm", "openai", "replay", "simulated")


def _backend_of(value: object) -> str | None:
    # `backend` may be left out: local transformers models are the common case.
    if isinstance(value, dict):
        return value.get("backend", "transformers")
    return getattr(value, "backend", None)


ExpertConfig = Annotated[
    Annotated[TransformersExpert, Tag("transformers")]
    | Annotated[VLLMExpert, Tag("vllm")]
    | Annotated[OpenAIExpert, Tag("openai")]
    | Annotated[ReplayExpert, Tag("replay")]
    | Annotated[SimulatedExpert, Tag("simulated")],
    Discriminator(
        _backend_of,
        custom_error_type="invalid_backend",
        custom_error_message=f"an expert must be a mapping whose 'backend' is one of {', '.join(BACKENDS)}",
    ),
]


class PoolConfig(Strict):
    memory_budget_gb: dict[str, float] = Field(
        default_factory=dict,
        description="resident-model budget per device ('cpu', 'cuda:0', ...); a missing device is unlimited",
    )
    load_timeout_s: float = Field(600.0, gt=0)
    generate_timeout_s: float = Field(600.0, gt=0)
    restart_wait_s: float = Field(
        60.0, gt=0, description="how long a call waits for a crashed expert's actor to come back before it fails"
    )

    @field_validator("memory_budget_gb")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for device, gb in v.items():
            if gb <= 0:
                raise ValueError(f"budget for {device!r} must be positive, got {gb}")
        return v
