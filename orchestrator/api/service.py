"""The service controller: the API's behaviour as plain Python, below HTTP.

It turns validated request models into pipeline requests, applies the
configured limits and the caller's budget, serves the response cache, keeps
the answer records that feedback refers to, and runs jobs. Every record
names the key that created it, and only that key (or an admin) can read it. The FastAPI routes (``orchestrator.api.routes``)
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

from orchestrator import env, tracing
from orchestrator.api.answers import Live, describe_in_trace, new_answer_id, to_response, to_routing
from orchestrator.api.cache import Lookup, ResponseCache
from orchestrator.api.errors import InvalidRequest, NotFound, ServiceError, Unavailable
from orchestrator.api.jobs import JobRunner
from orchestrator.api.metrics import Metrics
from orchestrator.api.openai_compat import Catalog
from orchestrator.api.schemas import (
    CacheCleared,
    ExpertOut,
    FeedbackBody,
    FeedbackOut,
    JobOut,
    QueryBody,
    QueryResponse,
    ReloadOut,
    RouteBody,
    Routing,
    Sampling,
)
from orchestrator.api.security import ANONYMOUS, Caller
from orchestrator.api.store import Store, StoreUnavailable, open_store
from orchestrator.api.tenants import Ledger, Reservation
from orchestrator.api.tools import ToolUse
from orchestrator.config import ConciliumConfig, ConfigError, load_config
from orchestrator.engine.pipeline import Pipeline, ReloadError
from orchestrator.engine.requests import AllExpertsFailed, QueryRequest, RequestError
from orchestrator.engine.token_stream import TokenStream
from routers.aggregation import is_consensus
from routers.base import Decision, RouteOptions, RoutingError
from routers.vocabulary import Aggregation, Policy
from workers.placement import PlacementError
from workers.types import Message

log = logging.getLogger(__name__)

WRONG_BELOW = 0.5
"""Feedback below this (``correct: false``, or a rating under it) marks an answer wrong: it leaves the caches."""

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
        self.ledger = Ledger(store, config.server.budgets, config.server.request_timeout_s)
        self.cache = ResponseCache(store, config, self.metrics, self._store_call)
        self.jobs = JobRunner(store, lambda body, owner: self.query(body, caller=Caller(owner, admin=False)),
                              config.server.job_ttl_s)

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
        tracing.configure(config.server.otel_endpoint)
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
        await asyncio.to_thread(tracing.flush)  # the spans an OTLP exporter still holds

    def _live_figures(self) -> dict[str, float]:
        return {**self.pipeline.figures(), "store_up": float(self.store_up)}

    # -- requests -------------------------------------------------------------------------------------

    def to_request(self, body: RouteBody, messages: tuple[Message, ...] = ()) -> QueryRequest:
        """A pipeline request within the configured limits; InvalidRequest says what is wrong."""
        limits, defaults = self.config.server, self.pipeline.defaults(body.router)
        if not body.query.strip():
            raise InvalidRequest("query: the query is empty or only whitespace")
        if len(body.query) > limits.max_query_chars:
            raise InvalidRequest(
                f"query: {len(body.query)} characters, above the limit of {limits.max_query_chars}"
            )
        experts, k, aggregation = body.experts, body.k or defaults.k, body.aggregation or defaults.aggregation
        tools, tool_choice = body.tool_payload() if isinstance(body, ToolUse) else ((), None)
        if tools or any(m.is_tool_turn for m in messages):
            experts, k, aggregation = self._tool_experts(body), 1, Aggregation.BEST
        if k > limits.max_k:
            raise InvalidRequest(f"k: {k} is above the limit of {limits.max_k}")
        if body.max_tokens is not None and body.max_tokens > limits.max_tokens:
            raise InvalidRequest(f"max_tokens: {body.max_tokens} is above the limit of {limits.max_tokens}")
        policy = body.policy or (Policy.COST if body.cost_lambda else defaults.policy)
        cost_lambda = body.cost_lambda if body.cost_lambda is not None else (
            defaults.cost_lambda if policy == defaults.policy else 0.0)
        sampling = body if isinstance(body, Sampling) else Sampling()
        try:
            request = QueryRequest(
                query=body.query, options=RouteOptions(k=k, policy=policy, cost_lambda=cost_lambda),
                aggregation=aggregation, experts=experts, tools=tools, tool_choice=tool_choice,
                max_new_tokens=body.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                seed=sampling.seed, stop=sampling.stop, router=body.router, messages=messages,
                max_cost_usd=body.budget, category=body.category, answer_kind=body.answer_kind,
                trace=tracing.current(),
            )
            self.pipeline.validate(request)
        except (RequestError, RoutingError) as exc:
            raise InvalidRequest(str(exc)) from None
        return request

    def _tool_experts(self, body: RouteBody) -> list[str]:
        """A request with tools (or tool turns) goes to one expert that supports tools, with no aggregation."""
        capable = self.config.tool_experts
        if not capable:
            raise InvalidRequest("tools: no expert of this service supports tools (an openai expert declares "
                                 "`supports_tools: true` when its model calls functions)")
        if body.k not in (None, 1) or body.aggregation not in (None, Aggregation.BEST):
            raise InvalidRequest("tools: a request with tools is answered by one expert; leave k and aggregation "
                                 "unset (or 1 and best)")
        allowed = [e for e in body.experts or capable if e in capable]
        if not allowed:
            raise InvalidRequest(f"tools: none of the experts asked for supports tools; these do: "
                                 f"{', '.join(capable)}")
        return allowed

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

    async def _admit(self, body: QueryBody, messages: tuple[Message, ...],
                     caller: Caller) -> tuple[QueryRequest, Reservation | None, Lookup]:
        """Validate, reserve the request's most on the caller's budget (429, or fitted), then look in the cache:
        a hit is counted, and its reservation settled, here; a semantic hit is an answer of its own."""
        request, reservation = await self.ledger.admit(caller, self.to_request(body, messages), self.pipeline.most)
        try:
            with tracing.TRACER.start_as_current_span("cache.lookup") as span:
                found = await self.cache.lookup(body, messages, request, caller,
                                                [self.config_version, self.profiles_version])
                span.set_attribute("concilium.cache", found.hit.cache.hit if found.hit and found.hit.cache else
                                   "miss" if found.exact_key else "off")
        except BaseException:
            await self._store_call("usage", self.ledger.release(reservation))
            raise
        if found.hit is not None:
            describe_in_trace(found.hit)
            await self._store_call("usage", self.ledger.record(caller, found.hit, reservation))
            if found.hit.cache is not None and found.hit.cache.hit == "semantic":
                await self._record(found.hit, caller, None)
        return request, reservation, found

    async def query(self, body: QueryBody, messages: tuple[Message, ...] = (),
                    caller: Caller = ANONYMOUS) -> QueryResponse:
        request, reservation, found = await self._admit(body, messages, caller)
        return found.hit or await self._within_limit(self._answer(request, found, new_answer_id(), caller,
                                                                  reservation))

    async def open_stream(self, body: QueryBody, messages: tuple[Message, ...] = (),
                          caller: Caller = ANONYMOUS) -> Live:
        """Start a request whose tokens go out as they are written. Bad input and a spent budget raise here,
        before any byte is sent; a failure later ends the task with the error, and the stream with it."""
        request, reservation, found = await self._admit(body, messages, caller)
        if found.hit is not None:
            done: asyncio.Future[QueryResponse] = asyncio.get_running_loop().create_future()
            done.set_result(found.hit)
            return Live(found.hit.id, done, None)
        stream, answer_id = TokenStream(), new_answer_id()
        task = asyncio.ensure_future(self._within_limit(self._answer(dataclasses.replace(request, stream=stream),
                                                                     found, answer_id, caller, reservation)))
        task.add_done_callback(lambda _: stream.close())
        return Live(answer_id, task, stream)

    async def _within_limit(self, work: Awaitable[QueryResponse]) -> QueryResponse:
        limit = self.config.server.request_timeout_s
        try:
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            self.metrics.timeouts.inc()
            raise ServiceError(f"no answer within {limit:g} s (server.request_timeout_s)", 504, "timeout") from None

    async def _answer(self, request: QueryRequest, found: Lookup, answer_id: str, caller: Caller,
                      reservation: Reservation | None = None) -> QueryResponse:
        """Ask the pipeline, then count its usage (settling its reservation), record the answer for its owner,
        and cache it. A request that ends without an answer (failed, timed out, cancelled) releases its hold."""
        try:
            answer = await self.pipeline.ask(request)
        except BaseException as exc:
            await asyncio.shield(self._store_call("usage", self.ledger.release(reservation)))
            if isinstance(exc, AllExpertsFailed):
                raise Unavailable(str(exc)) from None
            raise
        response = to_response(answer, answer_id)
        for expert in answer.decision.experts:
            self.metrics.routed.labels(expert).inc()
        for a in answer.answers:
            if a.retries:
                self.metrics.retries.labels(a.expert).inc(a.retries)
        if is_consensus(answer.aggregation_skipped):
            self.metrics.consensus.inc()
        describe_in_trace(response)
        with tracing.TRACER.start_as_current_span("store.write"):
            await asyncio.shield(self._store_call("usage", self.ledger.record(caller, response, reservation)))
            await self._record(response, caller, found.exact_key)
            await self.cache.remember(found, response)
        return response

    async def _record(self, response: QueryResponse, caller: Caller, exact_key: str | None) -> None:
        """The answer record feedback and ``GET /v1/answers/{id}`` read, owned by its caller; ``exact_key``: where
        the exact cache keeps it, for an eviction."""
        record = {"owner": caller.key_id, "response": response.model_dump(mode="json"), "exact_key": exact_key}
        ttl = self.config.server.job_ttl_s
        await self._store_call("answers", self.store.set(f"answer:{response.id}", json.dumps(record, default=str), ttl))

    async def route(self, body: RouteBody) -> Routing:
        try:
            return to_routing(await self.pipeline.explain(self.to_request(body)))
        except RequestError as exc:
            raise InvalidRequest(str(exc)) from None

    def catalog(self) -> Catalog:
        """The names an OpenAI request's ``model`` may take, as the service offers them now."""
        names = self.pipeline.catalog()
        return Catalog(names.routers, names.experts)

    async def experts(self) -> list[ExpertOut]:
        return [
            ExpertOut(name=e.info.name, backend=e.info.backend, source=e.info.source, state=e.info.state,
                      device=e.info.device, memory_bytes=e.info.memory_bytes, in_flight=e.in_flight,
                      node_id=e.info.node_id or None, pid=e.info.pid or None, load_s=e.info.load_s,
                      error=e.info.error)
            for e in await self.pipeline.experts()
        ]

    # -- jobs and feedback ----------------------------------------------------------------------------

    async def submit_job(self, body: QueryBody, caller: Caller = ANONYMOUS) -> JobOut:
        if body.stream:
            raise InvalidRequest("stream: a job has no stream; poll GET /v1/jobs/{id}")
        await self.ledger.check(caller, self.to_request(body), self.pipeline.most)  # refuse now what cannot run
        try:
            return await self._store("jobs", self.jobs.submit(body, caller.key_id))
        except StoreUnavailable as exc:
            raise Unavailable(f"jobs are unavailable: {exc}") from None

    async def job(self, job_id: str, caller: Caller = ANONYMOUS) -> JobOut:
        try:
            found = await self._store("jobs", self.jobs.get(job_id))
        except StoreUnavailable as exc:
            raise Unavailable(f"jobs are unavailable: {exc}") from None
        if found is None or not caller.owns(found[1]):  # another key's job reads as an unknown one
            raise NotFound(f"no job {job_id!r} (unknown, or older than {self.config.server.job_ttl_s:g} s)")
        return found[0]

    async def answer(self, answer_id: str, caller: Caller = ANONYMOUS) -> QueryResponse:
        """An answer, for its owner or an admin; any other key gets the 404 an unknown id gets."""
        return QueryResponse.model_validate((await self._answer_record(answer_id, caller, "answers"))["response"])

    async def _answer_record(self, answer_id: str, caller: Caller, use: str) -> dict:
        try:
            raw = await self._store(use, self.store.get(f"answer:{answer_id}"))
        except StoreUnavailable as exc:
            raise Unavailable(f"answer records are unavailable: {exc}") from None
        record = json.loads(raw) if raw is not None else None
        if record is None or not caller.owns(record["owner"]):
            raise NotFound(f"no answer {answer_id!r} (unknown, or older than {self.config.server.job_ttl_s:g} s)")
        return record

    async def _evict(self, response: QueryResponse, record: dict) -> str:
        """Take an answer feedback marked wrong out of both caches: the one it was cached from, if it is a hit."""
        origin, exact = (response.cache.of if response.cache else response.id), record.get("exact_key")
        if origin != response.id:
            raw = await self._store_call("feedback", self.store.get(f"answer:{origin}"))
            exact = json.loads(raw).get("exact_key") if raw else None
        await self.cache.forget(origin, exact)
        return origin

    async def feedback(self, body: FeedbackBody, caller: Caller = ANONYMOUS) -> FeedbackOut:
        if (body.correct is None) == (body.rating is None):
            raise InvalidRequest("give exactly one of correct (true/false) or rating (0..1)")
        record = await self._answer_record(body.answer_id, caller, "feedback")
        response = QueryResponse.model_validate(record["response"])
        answered = sorted({a.expert for a in response.answers})
        if body.expert is not None and body.expert not in answered:
            raise InvalidRequest(f"expert {body.expert!r} did not answer {body.answer_id}; "
                                 f"these did: {', '.join(answered)}")
        experts = [body.expert] if body.expert else answered
        value = float(body.correct) if body.correct is not None else float(body.rating)
        decision = Decision(experts=experts, scores={}, trace=response.routing.trace)
        updated = self.pipeline.learn(response.routing.router, decision, experts, value)
        if updated:
            self.profiles_version += 1  # cached answers were routed by the old profiles
        for expert in experts:
            await self._store_call("feedback", self.store.hincr(f"feedback:{expert}", {"n": 1.0, "correct": value}))
            self.metrics.feedback.labels(expert).inc()
        evicted = await self._evict(response, record) if value < WRONG_BELOW else None
        return FeedbackOut(answer_id=body.answer_id, experts=experts, profile_updated=updated,
                           profiles_version=self.profiles_version, evicted=evicted)

    async def reload(self) -> ReloadOut:
        """Re-read the config file the service started from and apply its experts, routing and limits."""
        if self.pipeline.shared:
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
        self.cache.configure(config)
        tracing.configure(config.server.otel_endpoint)
        self.ledger.quotas, self.ledger.timeout_s = config.server.budgets, config.server.request_timeout_s
        return ReloadOut(**changes)

    async def clear_cache(self) -> CacheCleared:
        try:
            return CacheCleared(cleared=await self._store("cache", self.cache.clear()))
        except StoreUnavailable as exc:
            raise Unavailable(f"the cache cannot be cleared: {exc}") from None

    async def ready(self) -> dict[str, object]:
        healthy = self.pipeline.healthy()
        await self._store_call("ready", self.store.ping())  # records whether the store answers
        return {"ready": any(healthy.values()), "experts": healthy, "store": self.store.kind, "store_ok": self.store_up,
                "time": time.time()}
