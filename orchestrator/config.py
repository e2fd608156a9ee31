"""``concilium.yaml``: one file, validated by pydantic, with the embedded setup as default.

With no file at all the defaults give the embedded setup: the two bundled
experts on local Ray. Every validation error is reported with the dotted path
of the offending key, so a bad file says where it is bad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator import env
from routers.vocabulary import Aggregation, Encoder, Policy
from workers.config import BACKENDS, ExpertConfig, PoolConfig, Strict, TransformersExpert
from workers.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or does not validate."""


class RayConfig(Strict):
    address: str | None = Field(None, description=f"an existing cluster; None starts local Ray on {env.LOOPBACK}")
    namespace: str = "concilium"
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs for local Ray")
    num_gpus: int | None = Field(None, ge=0, description="logical GPUs for local Ray (placement tests)")
    resources: dict[str, float] = {}


class RoutingConfig(Strict):
    """How the pipeline routes and batches; a request may override k, policy and aggregation."""

    profiles: Path = Field(
        default_factory=env.profiles_root,
        description="profile artifacts from `concilium profile` (default: $CONCILIUM_PROFILES or "
        "./artifacts/profiles); without profiles for the configured experts, every expert answers",
    )
    k: int = Field(3, ge=1, le=64)
    policy: Policy = Policy.TOPK
    aggregation: Aggregation = Aggregation.SYNTHESIZE
    aggregator: str | None = Field(
        None,
        description="the expert that synthesises; None takes the first allowed expert of the profiles' "
        "aggregator ranking, or the router's top-scored expert without profiles",
    )
    moa_layers: int = Field(2, ge=1, le=8, description="proposer layers of the moa strategy, the first included")
    self_moa_temperature: float = Field(
        0.7, gt=0.0, le=5.0, description="sampling temperature of self-moa when the request sets none"
    )
    max_batch: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(
        0.0, ge=0.0, le=10_000, description="how long an idle scheduler holds a lone request for company; 0 starts "
        "at once (requests that arrive while a window runs join the next window anyway)",
    )
    expert_timeout_s: float = Field(300.0, gt=0)
    stall_timeout_s: float | None = Field(
        30.0, gt=0, description="a streaming expert call that writes no token for this long fails (and is "
        "re-routed; server.stream_fallback says what its client sees); None: only expert_timeout_s applies",
    )
    max_pending: int = Field(
        1024, ge=1, description="requests admitted and not yet answered (queued or in a window); past it, new "
        "ones are refused (HTTP 429 with Retry-After) instead of queueing without bound",
    )


KEY_ID_CHARS = 16
"""A key's id: the first 16 hex characters of its SHA-256 digest. Records name their owner by it; never the key."""


class KeyLimits(Strict):
    tokens_per_day: int | None = Field(None, ge=1, description="prompt plus completion tokens per UTC day")
    usd_per_day: float | None = Field(None, gt=0.0, description="estimated USD per UTC day (the experts' prices)")


class QuotaConfig(Strict):
    """Per-key daily budgets, counted in the store (``orchestrator.api.tenants``)."""

    default: KeyLimits = Field(default_factory=KeyLimits, description="every key without an entry of its own")
    keys: dict[str, KeyLimits] = Field(
        default_factory=dict, description="key id (first 16 hex characters of the key's SHA-256) -> its limits, "
        "which replace the default for that key; GET /v1/usage shows the limits in force",
    )
    over_budget: Literal["refuse", "fit"] = Field(
        "refuse", description="refuse: a request reserves all its plan can spend, and gets 429 budget_exceeded "
        "when that does not fit what is left; fit: its budget shrinks to the USD left (costly recruits dropped), it "
        "reserves its first round, and a later call (a synthesis, an escalation) runs only if the budget allows",
    )
    wait_s: float = Field(
        30.0, ge=0.0, description="how long a request that fits once the requests running now settle waits for "
        "them before its 429",
    )
    store_down: Literal["open", "closed"] = Field(
        "open", description="when the store cannot be read: open admits (and counts nothing), closed answers 503",
    )

    @field_validator("keys")
    @classmethod
    def _key_ids(cls, v: dict[str, KeyLimits]) -> dict[str, KeyLimits]:
        for key_id in v:
            if len(key_id) != KEY_ID_CHARS or any(c not in "0123456789abcdef" for c in key_id):
                raise ValueError(f"{key_id!r}: a key id is the first {KEY_ID_CHARS} lowercase hex characters of "
                                 "the key's SHA-256 digest (`concilium key-id KEY` prints it)")
        return v


class ServerConfig(Strict):
    """The API service: where it listens, its store, its limits and its keys."""

    host: str = Field(env.LOOPBACK, description="loopback by default; bind elsewhere only on purpose")
    port: int = Field(8000, ge=1, le=65535)
    redis_url: str | None = Field(
        None, pattern=r"^rediss?://", description="the shared store; $REDIS_URL overrides; None: in-process store"
    )
    api_key_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 hex digests of accepted API keys; with none here or in $CONCILIUM_API_KEYS, no auth",
    )
    cache_ttl_s: float = Field(300.0, ge=0.0, description="response cache lifetime; 0 turns the cache off")
    otel_endpoint: str | None = Field(None, pattern=r"^https?://", description="an OTLP/HTTP traces URL (e.g. "
                                      "http://127.0.0.1:4318/v1/traces): export every request's trace; off by "
                                      "default, or $OTEL_EXPORTER_OTLP_ENDPOINT")
    job_ttl_s: float = Field(7 * 24 * 3600.0, gt=0.0)
    max_query_chars: int = Field(8000, ge=1)
    max_tokens: int = Field(1024, ge=1, description="the most max_tokens a request may ask for")
    max_k: int = Field(16, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    rate_limit_per_minute: int | None = Field(None, ge=1, description="per API key (or client address)")
    admin_key_sha256: list[str] = Field(
        default_factory=list,
        description="SHA-256 digests of admin keys (also $CONCILIUM_ADMIN_KEYS); once any key is configured, "
        "reload and feedback need one of these",
    )
    request_timeout_s: float = Field(600.0, gt=0, description="a request still unanswered after this gets 504")
    stream_fallback: Literal["error", "restart"] = Field(
        "error", description="when the expert streaming an answer fails after its first token (cut, or stalled "
        "past routing.stall_timeout_s) and another one answers: error ends the stream with an error event holding "
        "the text sent so far; restart sends a restart event, then the new answer from its start",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown, how long in-flight requests may finish")
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty (the default) sends no CORS headers"
    )
    budgets: QuotaConfig = Field(default_factory=QuotaConfig)
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve /metrics on its own port (at metrics_host) and not on the API's; "
        "None: on the API's port, where it needs an admin key once keys are configured",
    )
    metrics_host: str = Field(env.LOOPBACK, description="where the separate /metrics port binds")

    @field_validator("api_key_sha256", "admin_key_sha256")
    @classmethod
    def _hex_digests(cls, v: list[str]) -> list[str]:
        for digest in v:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("each entry must be a lowercase SHA-256 hex digest (64 characters)")
        return v


class CacheConfig(Strict):
    """The semantic cache (``api.semantic_cache``): a greedy request close enough in meaning to one answered
    before gets that answer. Off by default: a paraphrase is judged by a threshold, and a threshold errs
    (docs/benchmarks.md, "Semantic cache"). Entries live ``server.cache_ttl_s``, as the exact cache's."""

    semantic: bool = Field(False, description="serve answers to paraphrases from the cache")
    encoder: Encoder = Field(Encoder.MINILM, description="what queries are embedded with: minilm (chosen on the "
                             "labelled pairs) or static (faster, but its near misses look like paraphrases)")
    threshold: float | None = Field(None, gt=0.0, le=1.0, description="least cosine similarity for a hit; "
                                    "default: the encoder's measured one (SEMANTIC_THRESHOLDS)")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per category (a request's `category`)")
    scope: Literal["tenant", "shared"] = Field("tenant", description="tenant: a hit never crosses API keys")
    max_entries: int = Field(100_000, ge=1, description="newest entries kept per scope and request shape")

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for category, t in v.items():
            if not 0.0 < t <= 1.0:
                raise ValueError(f"threshold for {category!r} must be in (0, 1], got {t}")
        return v

    @property
    def default_threshold(self) -> float:
        return self.threshold if self.threshold is not None else SEMANTIC_THRESHOLDS[self.encoder]

    def threshold_for(self, category: str | None) -> float:
        return self.thresholds.get(category or "", self.default_threshold)


SEMANTIC_THRESHOLDS = {Encoder.MINILM: 0.94, Encoder.STATIC: 0.97}
"""Per encoder, the least threshold whose false hits on the labelled pairs (``orchestrator/data/paraphrases.jsonl``)
are at most 1% (``concilium bench cache``; docs/benchmarks.md, "Semantic cache")."""


def _bundled_experts() -> list[ExpertConfig]:
    return [
        TransformersExpert(
            name="smollm2",
            source="smollm2-135m-instruct",
            tags=["chat", "instruct", "llama"],
            cost_per_1k_tokens=0.0001,
        ),
        TransformersExpert(
            name="gemma3",
            source="gemma3-270m",
            tags=["base", "gemma"],
            cost_per_1k_tokens=0.0002,
            # A base model: asked as a question to complete, it answers on one line (docs/benchmarks.md, issue 26).
            plain_prompt="Question: {prompt}\nAnswer:",
            generation={"stop": ["\n"]},
        ),
    ]


class AutoscalingSettings(Strict):
    """Ray Serve autoscaling of the ingress replicas; the experts do not scale with them."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(64.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeConfig(Strict):
    """The Ray Serve deployment (`concilium cluster deploy`, `serve run orchestrator.serving.serve:build`)."""

    app_name: str = Field("concilium", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    deployment_name: str = Field("concilium-ingress", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    route_prefix: str = Field("/", pattern=r"^/")
    num_replicas: int = Field(1, ge=1, description="ingress replicas, when autoscaling is not set")
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per ingress replica")
    max_ongoing_requests: int = Field(256, ge=1, description="per ingress replica, before Serve queues")
    http_host: str = Field(env.LOOPBACK, description="where Serve's HTTP proxy listens; 0.0.0.0 only on purpose")
    http_port: int = Field(8000, ge=1, le=65535)


class LatentConfig(Strict):
    """The latent mixture's execution mode (the ``latent`` router): one actor, the latent group, holds the
    checkpoint's experts on one device, and the primary cross-attends to its peers while it generates."""

    checkpoint: Path | None = Field(
        None, description="a `concilium train-latent` checkpoint; when set, the `latent` router is served"
    )
    k: int = Field(2, ge=1, le=64, description="experts active per query, the primary included, when a request "
                   "sets no k")
    num_cpus: float = Field(
        0.0, ge=0.0, description="CPUs the latent group reserves; 0 shares them with the experts' actors, which "
        "on a small machine hold every core already"
    )
    threads: int = Field(2, ge=1, description="torch CPU threads of the latent group")
    num_gpus: float = Field(0.0, ge=0.0, le=1.0, description="the group's share of one GPU: its experts share it")
    device_memory_gb: float | None = Field(
        None, gt=0, description="memory of the group's device: the experts' estimated sizes must fit it together "
        "(on CUDA, the free memory is checked as well when the group starts)",
    )


class ConciliumConfig(Strict):
    model_store: Path | None = Field(
        None, description="defaults to $CONCILIUM_MODEL_STORE or ~/.cache/concilium/models, resolved by each process "
        "that reads the config (see store_root)"
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    latent: LatentConfig = Field(default_factory=LatentConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    experts: list[ExpertConfig] = Field(default_factory=_bundled_experts, min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ConciliumConfig:
        seen: set[str] = set()
        for expert in self.experts:
            if expert.name in seen:
                raise ValueError(f"expert name {expert.name!r} is used twice")
            seen.add(expert.name)
        if self.routing.aggregator is not None and self.routing.aggregator not in seen:
            raise ValueError(
                f"routing.aggregator {self.routing.aggregator!r} is not a configured expert ({', '.join(seen)})"
            )
        return self

    @property
    def store_root(self) -> Path:
        """The model store: the configured folder, else this machine's default. The one place that falls back."""
        return self.model_store or env.model_store_root()

    def bound_to(self, host: str | None = None, port: int | None = None) -> ConciliumConfig:
        """This config with the address given on the command line (None: the file's). A reload keeps it."""
        server = self.server.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
        return self.model_copy(update={"server": server})

    @property
    def tool_experts(self) -> list[str]:
        """The experts a request with tools may go to: remote ones whose model calls functions."""
        return [e.name for e in self.experts if getattr(e, "supports_tools", False)]

    def expert(self, name: str) -> ExpertConfig:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise ConfigError(
            f"unknown expert {name!r}; configured experts: {', '.join(e.name for e in self.experts)}"
        )


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source} is not a valid Concilium config:"]
    for err in exc.errors():
        loc, prev = "", None
        for part in err["loc"]:
            if part in BACKENDS and isinstance(prev, int):
                continue  # the union's tag, not a key the user wrote
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
            prev = part
        lines.append(f"  {loc or '(top level)'}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "config") -> ConciliumConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ConciliumConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_config(path: str | Path | None = None) -> ConciliumConfig:
    """The given file, else ``$CONCILIUM_CONFIG``, else ``./concilium.yaml``, else the defaults."""
    if path is None:
        path = env.get(env.CONFIG) or (env.DEFAULT_CONFIG_FILE if env.DEFAULT_CONFIG_FILE.exists() else None)
        if path is None:
            return ConciliumConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data, str(path))
