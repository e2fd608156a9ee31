"""The service controller: the API's behaviour as plain Python, below HTTP.

It turns validated request models into pipeline requests, applies the
configured limits, serves the response cache, keeps the answer records that
feedback refers to, and runs jobs. The FastAPI routes (``orchestrator.api.routes``)
are a thin layer over it, as RouteLLM's server is over its controller, so the
same behaviour is reachable from Ray Serve or a test without HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from orchestrator import env
from orchestrator.api.answers import Live, new_answer_id, to_response, to_routing
from orchestrator.api.errors import InvalidRequest, NotFound, ServiceError, Unavailable
from orchestrator.api.jobs import JobRunner
from orchestrator.api.metrics import Metrics
from orchestrator.api.schemas import (
    DEFAULT_MODEL,
    ChatBody,
    CompletionBody,
    ExpertOut,
    FeedbackBody,
    FeedbackOut,
    JobOut,
    ModelCard,
    ModelList,
    OpenAIBody,
    QueryBody,
    QueryResponse,
    ReloadOut,
    RouteBody,
    Routing,
    Sampling,
)
from orchestrator.api.store import Store, StoreUnavailable, open_store
from orchestrator.config import ConciliumConfig, ConfigError, load_config
from orchestrator.engine.pipeline import Pipeline, ReloadError
from orchestrator.engine.requests import AllExpertsFailed, QueryRequest, RequestError
from orchestrator.engine.streams import TokenStream
from routers.aggregation import is_consensus
from routers.base import Decision, OnlineRouter, RouteOptions, RoutingError
from routers.vocabulary import Aggregation, Policy
from workers.placement import PlacementError
from workers.types import Message

log = logging.getLogger(__name__)

T = TypeVar("T")


def _address(config: ConciliumConfig) -> dict[str, object]:
    return config.server.model_dump(include={"host", "port"})


class Service:
    def __init__(self, config: ConciliumConfig, pipeline: Pipeline, store: Store, config_path: Path | None = None,
                 file_address: dict[str, object] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.file_address = file_address or _address(config)
        """The host and port the config file said at start: a reload compares the file with this, not with the
        bound address, which command-line options may have overridden."""
        self.pipeline = pipeline
        self.store = store
        self.profiles_version = 0
        self.store_up = True
        self.config_version = self._version(config)
        self.metrics = Metrics(self._live_figures)
        self.jobs = JobRunner(store, self.query, config.server.job_ttl_s)

    @staticmethod
    def _version(config: ConciliumConfig) -> str:
        """Part of every cache key: a reload that changes routing or the experts invalidates cached answers."""
        data = config.routing.model_dump_json() + json.dumps([e.model_dump(mode="json") for e in config.experts])
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    @classmethod
    async def start(cls, config: ConciliumConfig, config_path: Path | None = None, detached: bool = False) -> Service:
        store = open_store(env.get(env.REDIS_URL) or config.server.redis_url)
        try:
            file_address = _address(load_config(config_path))
        except ConfigError:
            file_address = None
        pipeline = await Pipeline.start(config, detached)
        service = cls(config, pipeline, store, config_path, file_address)
        # Serve even without the store: the cache is off and jobs answer 503 until it is back.
        await service._store_call("start", store.ping())
        service.jobs.start()
        return service

    async def close(self) -> None:
        await self.jobs.stop()
        await self.pipeline.close()
        await self.store.close()

    def _live_figures(self) -> dict[str, float]:
        pool = self.pipeline.pool
        scheduler = self.pipeline.scheduler
        return {"loads": pool.stats.loads, "queue_depth": scheduler.queue_depth, "resident": len(pool.resident()),
                "scheduled": scheduler.stats.requests, "pending": scheduler.pending, "store_up": float(self.store_up),
                "generated_tokens": scheduler.stats.generated_tokens, "windows": scheduler.stats.windows,
                "rejected": scheduler.stats.rejected}

    # -- requests -------------------------------------------------------------------------------------

    def to_request(self, body: RouteBody, messages: tuple[Message, ...] = ()) -> QueryRequest:
        """A pipeline request within the configured limits; InvalidRequest says what is wrong."""
        limits, defaults = self.config.server, self.config.routing
        if not body.query.strip():
            raise InvalidRequest("query: the query is empty or only whitespace")
        if len(body.query) > limits.max_query_chars:
            raise InvalidRequest(
                f"query: {len(body.query)} characters, above the limit of {limits.max_query_chars}"
            )
        k = body.k or self.config.default_k(body.router)
        if k > limits.max_k:
            raise InvalidRequest(f"k: {k} is above the limit of {limits.max_k}")
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens: {body.max_tokens} is above the limit of {limits.max_tokens}")
        policy = body.policy or (Policy.COST if body.cost_lambda else defaults.policy)
        sampling = body if isinstance(body, Sampling) else Sampling()
        try:
            request = QueryRequest(
                query=body.query, options=RouteOptions(k=k, policy=policy, cost_lambda=body.cost_lambda or 0.0),
                aggregation=body.aggregation or defaults.aggregation, experts=body.experts,
                max_new_tokens=body.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                seed=sampling.seed, stop=sampling.stop, router=body.router, messages=messages,
                budget_usd=body.budget,
            )
            self.pipeline.scheduler.validate(request)
        except (RequestError, RoutingError) as exc:
            raise InvalidRequest(str(exc)) from None
        return request

    def _cacheable(self, request: QueryRequest) -> bool:
        """Only deterministic answers are cached: greedy decoding, and no self-moa sampling."""
        if self.config.server.cache_ttl_s <= 0 or request.aggregation == Aggregation.SELF_MOA:
            return False
        if request.temperature is not None:
            return request.temperature == 0
        return all(e.generation.temperature == 0 for e in self.config.experts)

    def _cache_key(self, body: RouteBody, messages: tuple[Message, ...]) -> str:
        data = body.model_dump(mode="json", by_alias=True, exclude={"stream"})
        data["query"] = " ".join(body.query.split())
        data["messages"] = [[m.role, m.content] for m in messages]
        data["versions"] = [self.config_version, self.profiles_version]
        return "cache:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def _store_seen(self, up: bool, exc: Exception | None = None) -> None:
        """Log the store going down or coming back once per change, not once per request."""
        if up == self.store_up:
            return
        self.store_up = up
        if up:
            log.warning("the store is back: the cache and jobs are on again")
        else:
            log.warning("the store is unavailable (%s): the cache is off and jobs answer 503 until it is back", exc)

    async def _store(self, use: str, coro: Awaitable[T]) -> T:
        """A store call that records the store's state; StoreUnavailable still reaches the caller."""
        try:
            result = await coro
        except StoreUnavailable as exc:
            self.metrics.store_errors.labels(use).inc()
            self._store_seen(False, exc)
            raise
        self._store_seen(True)
        return result

    async def _store_call(self, use: str, coro: Awaitable[T]) -> T | None:
        """A store call whose failure degrades a feature (cache, answer records) instead of failing the request."""
        try:
            return await self._store(use, coro)
        except StoreUnavailable:
            return None

    async def _lookup(self, body: QueryBody, messages: tuple[Message, ...],
                      request: QueryRequest) -> tuple[str | None, QueryResponse | None]:
        """The cache key for a deterministic request, and its cached response if there is one."""
        key = self._cache_key(body, messages) if self._cacheable(request) else None
        if key is None:
            return None, None
        raw = await self._store_call("cache", self.store.get(key))
        self.metrics.cache.labels("hit" if raw else "miss").inc()
        if not raw:
            return key, None
        return key, QueryResponse.model_validate_json(raw).model_copy(update={"cached": True})

    async def query(self, body: QueryBody, messages: tuple[Message, ...] = ()) -> QueryResponse:
        request = self.to_request(body, messages)
        key, hit = await self._lookup(body, messages, request)
        return hit or await self._answer(request, key, new_answer_id())

    async def open_stream(self, body: QueryBody, messages: tuple[Message, ...] = ()) -> Live:
        """Start a request whose tokens go out as they are written. Bad input raises here, before any byte is
        sent; a failure later ends the task with the error, and the stream with it."""
        request = self.to_request(body, messages)
        key, hit = await self._lookup(body, messages, request)
        if hit is not None:
            done: asyncio.Future[QueryResponse] = asyncio.get_running_loop().create_future()
            done.set_result(hit)
            return Live(hit.id, done, None)
        stream, answer_id = TokenStream(), new_answer_id()
        task = asyncio.ensure_future(self._within_limit(self._answer(dataclasses.replace(request, stream=stream),
                                                                     key, answer_id)))
        task.add_done_callback(lambda _: stream.close())
        return Live(answer_id, task, stream)

    async def _within_limit(self, work: Awaitable[QueryResponse]) -> QueryResponse:
        limit = self.config.server.request_timeout_s
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            self.metrics.timeouts.inc()
            raise ServiceError(f"no answer within {limit:g} s (server.request_timeout_s)", 504, "timeout") from None

    async def _answer(self, request: QueryRequest, key: str | None, answer_id: str) -> QueryResponse:
        """Ask the pipeline, then record the answer for feedback and cache it when its key allows."""
        try:
            answer = await self.pipeline.ask(request)
        except AllExpertsFailed as exc:
            raise Unavailable(str(exc)) from None
        response = to_response(answer, answer_id)
        for expert in answer.decision.experts:
            self.metrics.routed.labels(expert).inc()
        if is_consensus(answer.aggregation_skipped):
            self.metrics.consensus.inc()
        record = {"router": response.routing.router, "experts": [a.expert for a in answer.answers],
                  "trace": answer.decision.trace}
        ttl = self.config.server.job_ttl_s
        await self._store_call("answers", self.store.set(f"answer:{response.id}", json.dumps(record, default=str), ttl))
        if key is not None:
            await self._store_call("cache", self.store.set(key, response.model_dump_json(), self.config.server.cache_ttl_s))
        return response

    async def route(self, body: RouteBody) -> Routing:
        try:
            return to_routing(await self.pipeline.scheduler.explain(self.to_request(body)))
        except RequestError as exc:
            raise InvalidRequest(str(exc)) from None

    def chat_query(self, body: ChatBody) -> tuple[QueryBody, tuple[Message, ...]]:
        """The routed part of a chat (its last user turn) and the whole conversation for the experts."""
        user_turns = [m.content for m in body.messages if m.role == "user"]
        if not user_turns or not user_turns[-1].strip():
            raise InvalidRequest("messages: the last user message is missing or empty")
        query = self.openai_query(body, user_turns[-1], body.max_completion_tokens or body.max_tokens)
        return query, tuple(Message(m.role, m.content) for m in body.messages)

    def completion_query(self, body: CompletionBody) -> QueryBody:
        """A completions request routes its prompt, and the experts see the prompt alone."""
        if not body.text.strip():
            raise InvalidRequest("prompt: the prompt is empty or only whitespace")
        return self.openai_query(body, body.text, body.max_tokens)

    def openai_query(self, body: OpenAIBody, text: str, max_tokens: int | None) -> QueryBody:
        """The query for an OpenAI request whose routed text is ``text``.

        ``model`` is ``concilium`` (the default router), ``concilium/<router>``, or one expert's name, which
        sends the request to that expert alone.
        """
        routers, experts = self.pipeline.scheduler.routers, self.pipeline.pool.names
        router, allow, k, aggregation = None, None, body.k, body.aggregation
        if body.model in experts:
            allow, k, aggregation = [body.model], 1, aggregation or Aggregation.BEST
        elif body.model.startswith(f"{DEFAULT_MODEL}/") and body.model.split("/", 1)[1] in routers:
            router = body.model.split("/", 1)[1]
        elif body.model != DEFAULT_MODEL:
            raise NotFound(
                f"model {body.model!r} does not exist; available: "
                + ", ".join(m.id for m in self.models().data)
            )
        return QueryBody(query=text, router=router, k=k, aggregation=aggregation, experts=allow, max_tokens=max_tokens,
                         **body.model_dump(include=set(Sampling.model_fields)))

    def models(self) -> ModelList:
        routers = self.pipeline.scheduler.routers
        ids = [DEFAULT_MODEL, *(f"{DEFAULT_MODEL}/{r}" for r in routers), *self.pipeline.pool.names]
        return ModelList(data=[ModelCard(id=i) for i in ids])

    async def experts(self) -> list[ExpertOut]:
        pool = self.pipeline.pool
        return [
            ExpertOut(name=i.name, backend=i.backend, source=i.source, state=i.state, device=i.device,
                      memory_bytes=i.memory_bytes, in_flight=pool.in_flight(i.name), node_id=i.node_id or None,
                      load_s=i.load_s, error=i.error)
            for i in await pool.info()
        ]

    # -- jobs and feedback ----------------------------------------------------------------------------

    async def submit_job(self, body: QueryBody) -> JobOut:
        if body.stream:
            raise InvalidRequest("stream: a job has no stream; poll GET /v1/jobs/{id}")
        self.to_request(body)  # reject bad input now, not when the job runs
        try:
            return await self._store("jobs", self.jobs.submit(body))
        except StoreUnavailable as exc:
            raise Unavailable(f"jobs are unavailable: {exc}") from None

    async def job(self, job_id: str) -> JobOut:
        try:
            job = await self._store("jobs", self.jobs.get(job_id))
        except StoreUnavailable as exc:
            raise Unavailable(f"jobs are unavailable: {exc}") from None
        if job is None:
            raise NotFound(f"no job {job_id!r} (unknown, or older than {self.config.server.job_ttl_s:g} s)")
        return job

    async def feedback(self, body: FeedbackBody) -> FeedbackOut:
        if (body.correct is None) == (body.rating is None):
            raise InvalidRequest("give exactly one of correct (true/false) or rating (0..1)")
        try:
            raw = await self._store("feedback", self.store.get(f"answer:{body.answer_id}"))
        except StoreUnavailable as exc:
            raise Unavailable(f"feedback is unavailable: {exc}") from None
        if raw is None:
            raise NotFound(f"no answer {body.answer_id!r} (unknown, or older than {self.config.server.job_ttl_s:g} s)")
        record = json.loads(raw)
        if body.expert is not None and body.expert not in record["experts"]:
            raise InvalidRequest(f"expert {body.expert!r} did not answer {body.answer_id}; "
                                 f"these did: {', '.join(sorted(set(record['experts'])))}")
        experts = [body.expert] if body.expert else sorted(set(record["experts"]))
        value = float(body.correct) if body.correct is not None else float(body.rating)
        router = self.pipeline.scheduler.routers.get(record["router"])
        updated = False
        if isinstance(router, OnlineRouter):
            decision = Decision(experts=experts, scores={}, trace=record["trace"])
            for expert in experts:
                updated = router.learn(decision, expert, value) or updated
        if updated:
            self.profiles_version += 1  # cached answers were routed by the old profiles
        for expert in experts:
            await self._store_call("feedback", self.store.hincr(f"feedback:{expert}", {"n": 1.0, "correct": value}))
            self.metrics.feedback.labels(expert).inc()
        return FeedbackOut(answer_id=body.answer_id, experts=experts, profile_updated=updated,
                           profiles_version=self.profiles_version)

    async def reload(self) -> ReloadOut:
        """Re-read the config file the service started from and apply its experts, routing and limits."""
        if self.pipeline.pool.detached:
            raise InvalidRequest("this is one replica of a Ray Serve deployment whose experts are shared: change "
                                 "the config with `concilium cluster deploy`, which rolls every replica")
        try:
            config = load_config(self.config_path)
            if _address(config) != self.file_address:
                raise ReloadError("server.host or server.port changed in the config file: that needs a restart, "
                                  "not a reload")
            config = config.bound_to(self.config.server.host, self.config.server.port)
            changes = await self.pipeline.reload(config)
        except (ConfigError, ReloadError, PlacementError) as exc:
            raise InvalidRequest(str(exc)) from None
        self.config, self.config_version = config, self._version(config)
        return ReloadOut(**changes)

    async def ready(self) -> dict[str, object]:
        healthy = self.pipeline.pool.healthy()
        await self._store_call("ready", self.store.ping())  # records whether the store answers
        return {"ready": any(healthy.values()), "experts": healthy, "store": self.store.kind, "store_ok": self.store_up,
                "time": time.time()}
