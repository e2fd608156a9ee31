"""The expert pool: one actor per expert, residency under a memory limit per device (the config calls it a budget), restarts.

Actors exist for the pool's lifetime, but a model is resident only while the
budget of its device allows. Loading an expert that does not fit unloads the
least recently used idle residents first. The pool counts every load and
unload, because the scheduler's whole purpose is to keep that count low.

A backend that sleeps (vLLM on CUDA) is put to sleep instead of unloaded: its
weights wait in host RAM, so they count against the ``cpu`` budget and not its
device's, and the next load is a wake-up. Making room on the host drops
sleeping experts whole.

The pool decides residency only; *when* work runs is the scheduler's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from workers.actor import ExpertLoadError, ExpertWorker, NotLoadedError
from workers.config import ExpertConfig, PoolConfig
from workers.errors import UserError
from workers.placement import actor_options, check_placement
from workers.types import GenerationResult, Prompt, SamplingParams, TokenDelta, WorkerInfo

log = logging.getLogger(__name__)

_ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
HEALTH_PROBE_S = 2.0


def live_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def reason(exc: BaseException) -> str:
    """The original error's message; a RayTaskError's own text embeds the remote traceback."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return str(exc) if isinstance(exc, RuntimeError | ValueError | KeyError) else f"{type(exc).__name__}: {exc}"


class UnknownExpertError(UserError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class MemoryLimitError(UserError, RuntimeError):
    """An expert is larger than its device's whole memory limit (``pool.memory_budget_gb``)."""


class ExpertUnavailableError(UserError, RuntimeError):
    """An expert failed to load or its actor is gone for good."""


@dataclass
class PoolStats:
    loads: int = 0
    """Every time an expert became resident: a load, or a wake-up from sleep (``wakes`` counts those)."""
    unloads: int = 0
    """Every time an expert left its device: unloaded, or put to sleep (``sleeps`` counts those)."""
    wakes: int = 0
    sleeps: int = 0
    load_seconds: float = 0.0
    restarts: int = 0
    failures: int = 0
    """Loads that failed; the expert is then unavailable until it is reloaded."""
    loads_by_expert: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    config: ExpertConfig
    actor: ray.actor.ActorHandle
    device: str = "cpu"
    size: int = 0
    resident: bool = False
    asleep: bool = False
    loading: bool = False
    failed: str | None = None
    in_use: int = 0
    last_used: float = 0.0


class ExpertPool:
    """Create with ``await ExpertPool.start(...)`` once Ray is initialised."""

    def __init__(self, config: PoolConfig, model_store: Path, namespace: str, detached: bool = False) -> None:
        """``detached``: the experts are shared, named actors that outlive this pool (Ray Serve replicas)."""
        self.slots: dict[str, _Slot] = {}
        self.config = config
        self.model_store = model_store
        self.namespace = namespace
        self.detached = detached
        self.stats = PoolStats()
        self._changed = asyncio.Condition()

    @classmethod
    async def start(
        cls,
        experts: list[ExpertConfig],
        config: PoolConfig,
        model_store: Path,
        namespace: str,
        detached: bool = False,
    ) -> ExpertPool:
        check_placement(experts, live_nodes())
        pool = cls(config, model_store, namespace, detached)
        pool.slots = {e.name: pool._spawn(e) for e in experts}
        await asyncio.gather(*(pool._probe(slot) for slot in pool.slots.values()))
        return pool

    def _spawn(self, expert: ExpertConfig) -> _Slot:
        actor = ray.remote(ExpertWorker).options(**actor_options(expert, self.namespace, self.detached)).remote(
            expert, str(self.model_store)
        )
        return _Slot(config=expert, actor=actor)

    async def add(self, expert: ExpertConfig) -> None:
        """One more expert, while the others keep serving (a config reload)."""
        if expert.name in self.slots:
            raise ValueError(f"expert {expert.name!r} is already in the pool")
        check_placement([expert], live_nodes())
        slot = self._spawn(expert)
        await self._probe(slot)
        self.slots[expert.name] = slot

    async def remove(self, name: str) -> None:
        """Take an expert out once its running calls finish; killing its actor frees its memory."""
        slot = self._slot(name)
        async with self._changed:
            while slot.in_use:
                await self._changed.wait()
            del self.slots[name]
            self._changed.notify_all()
        ray.kill(slot.actor, no_restart=True)

    async def _probe(self, slot: _Slot) -> None:
        try:
            info: WorkerInfo = await slot.actor.info.remote()
            slot.device = info.device
            slot.resident = info.state == "loaded"  # a shared expert another replica already loaded
            slot.size = await slot.actor.estimate_memory_bytes.remote()
        except Exception as exc:  # a bad source marks this expert only
            slot.failed = reason(exc)
            log.warning("expert %s is unavailable: %s", slot.config.name, slot.failed)
            return
        limit = self._memory_limit(slot.device)
        if limit is not None and slot.size > limit:
            slot.failed = (
                f"needs {slot.size / 2**30:.2f} GiB but the budget for {slot.device} "
                f"is {limit / 2**30:.2f} GiB"
            )

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def in_flight(self, name: str) -> int:
        """Leases held on the expert now: calls running or about to."""
        return self._slot(name).in_use

    def config_of(self, name: str) -> ExpertConfig:
        return self._slot(name).config

    def _slot(self, name: str) -> _Slot:
        try:
            return self.slots[name]
        except KeyError:
            raise UnknownExpertError(
                f"unknown expert {name!r}; configured experts: {', '.join(self.slots)}"
            ) from None

    def _memory_limit(self, device: str) -> int | None:
        gb = self.config.memory_budget_gb.get(device)
        return None if gb is None else int(gb * 2**30)

    def resident(self) -> list[str]:
        return [n for n, s in self.slots.items() if s.resident]

    async def _make_room(self, slot: _Slot) -> bool:
        """Unload idle LRU residents on slot's device until it fits; False if it must wait.

        Called under the pool lock. Unloading only drops the model's references,
        so it is quick enough to do there; loading is not, and happens outside.
        """
        limit = self._memory_limit(slot.device)
        if limit is None:
            return True
        if slot.size > limit:
            raise MemoryLimitError(
                f"expert {slot.config.name} needs {slot.size / 2**30:.2f} GiB; "
                f"the budget for {slot.device} is {limit / 2**30:.2f} GiB"
            )
        held = self._held(slot.device)
        used = sum(s.size for s in held)
        idle = sorted((s for s in held if s.in_use == 0 and not s.loading), key=lambda s: s.last_used)
        for victim in idle:
            if used + slot.size <= limit:
                break
            await self._unload(victim, deep=victim.asleep)
            used -= victim.size
        return used + slot.size <= limit

    def _held(self, device: str) -> list[_Slot]:
        """The experts that hold memory on ``device``: resident or loading there, and on the host every
        sleeping expert, whose weights wait in host RAM."""
        return [s for s in self.slots.values()
                if ((s.resident or s.loading) and s.device == device) or (device == "cpu" and s.asleep)]

    async def _unload(self, slot: _Slot, deep: bool = False) -> None:
        """Free the slot's device: asleep if its backend can sleep (not ``deep``), else unloaded."""
        if slot.resident:
            self.stats.unloads += 1
        slot.resident = False
        state = "unloaded"
        with contextlib.suppress(*_ACTOR_LOST):
            state = await slot.actor.unload.remote(deep)
        slot.asleep = state == "sleeping"
        self.stats.sleeps += slot.asleep
    async def _load(self, slot: _Slot) -> None:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(slot.actor.load.remote(), self.config.load_timeout_s)
        except ExpertLoadError as exc:
            slot.failed = reason(exc)
            self.stats.failures += 1
            raise ExpertUnavailableError(slot.failed) from None
        name = slot.config.name
        self.stats.loads += 1
        self.stats.wakes += slot.asleep
        slot.asleep = False
        self.stats.loads_by_expert[name] = self.stats.loads_by_expert.get(name, 0) + 1
        self.stats.load_seconds += time.perf_counter() - started

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[ray.actor.ActorHandle]:
        """Hold an expert resident (loading it if needed) for the duration of the block.

        A leased expert is never evicted. A load that needs room held by leased
        experts waits until they are released. The load itself runs outside the
        pool lock, with its memory reserved, so resident experts stay usable.
        """
        slot = self._slot(name)
        async with self._changed:
            while True:
                if slot.failed:
                    raise ExpertUnavailableError(f"expert {name} is unavailable: {slot.failed}")
                if slot.resident:
                    must_load = False
                    break
                if not slot.loading and await self._make_room(slot):
                    slot.loading, must_load = True, True
                    break
                await self._changed.wait()
            slot.in_use += 1
        try:
            if must_load:
                try:
                    await self._load(slot)
                    slot.resident = True
                finally:
                    async with self._changed:
                        slot.loading = False
                        self._changed.notify_all()
            yield slot.actor
        finally:
            async with self._changed:
                slot.in_use -= 1
                slot.last_used = time.monotonic()
                self._changed.notify_all()

    async def _call(self, name: str, method: str, *args: object) -> object:
        """Run one actor call under a lease; after an actor crash, wait for its restart and retry once.

        A retried call's result says so in its ``notes``, so that callers can report the recovery.
        """
        losses = 0
        while True:
            try:
                async with self.lease(name) as actor:
                    result = await asyncio.wait_for(
                        getattr(actor, method).remote(*args), self.config.generate_timeout_s
                    )
                if losses and isinstance(result, GenerationResult):
                    result.notes.append(f"{name}'s actor died during the call; it restarted and the call was retried")
                return result
            except (*_ACTOR_LOST, NotLoadedError) as exc:
                slot = self._slot(name)
                slot.resident = slot.asleep = False  # a restarted actor comes back with nothing loaded
                losses += 1
                self.stats.restarts += 1
                log.warning("expert %s lost its actor (%s); attempt %d", name, type(exc).__name__, losses)
                if losses > 1 or not await self._wait_alive(slot):
                    raise ExpertUnavailableError(
                        f"expert {name}'s actor died and did not come back within {self.config.restart_wait_s:g} s "
                        f"(was its node lost?): {reason(exc)}"
                    ) from None

    async def _wait_alive(self, slot: _Slot) -> bool:
        """True once the actor answers again. A call to an actor whose restart waits for a node (one that
        offers its resources) would wait as long, so each probe has its own short limit."""
        deadline = time.monotonic() + self.config.restart_wait_s
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(slot.actor.health.remote(), HEALTH_PROBE_S)
                return True
            except ActorDiedError:
                return False
            except (*_ACTOR_LOST, TimeoutError):
                await asyncio.sleep(0.2)
        return False

    async def generate(
        self, name: str, prompts: list[str | Prompt], params: SamplingParams | None = None
    ) -> GenerationResult:
        return await self._call(name, "generate", prompts, params or self.config_of(name).generation.sampling())

    async def stream(self, name: str, prompts: list[str | Prompt], params: SamplingParams, call: str
                     ) -> AsyncIterator[list[TokenDelta] | GenerationResult]:
        """One batched call as a stream: lists of each row's new text as it is written, then the result. Held
        resident by a lease like ``generate``; an actor lost mid-stream fails the call (the text already sent
        cannot be taken back), without the restart-and-retry of ``generate``."""
        async with self.lease(name) as actor:
            try:
                async for ref in actor.generate_stream.options(num_returns="streaming").remote(prompts, params, call):
                    yield await ref
            except _ACTOR_LOST as exc:
                self._slot(name).resident = False
                raise ExpertUnavailableError(f"expert {name}'s actor died while streaming: {reason(exc)}") from None

    async def count_tokens(self, name: str, prompts: list[str | Prompt]) -> list[int]:
        """The prompt tokens each prompt would be charged on this expert: what a budget reservation is made of."""
        return await self._call(name, "count_tokens", prompts)

    def cancel(self, name: str, call: str, row: int) -> None:
        """End one row of a streaming call whose client went away (fire and forget)."""
        if name in self.slots:
            self.slots[name].actor.cancel.remote(call, row)

    async def unload(self, name: str) -> None:
        """Unload an idle expert now, as the naive per-query baseline of ``bench scheduler`` does."""
        slot = self._slot(name)
        async with self._changed:
            if slot.resident and slot.in_use == 0:
                await self._unload(slot)
                self._changed.notify_all()

    async def info(self) -> list[WorkerInfo]:
        async def one(slot: _Slot) -> WorkerInfo:
            try:
                info = await slot.actor.info.remote()
            except _ACTOR_LOST as exc:
                return WorkerInfo(slot.config.name, slot.config.backend, slot.config.origin,
                                  "dead", slot.device, 0, error=str(exc))
            if slot.failed:
                info.state, info.error = "failed", slot.failed
            info.details["estimated_bytes"] = slot.size
            return info

        return list(await asyncio.gather(*(one(s) for s in self.slots.values())))

    def healthy(self) -> dict[str, bool]:
        return {name: slot.failed is None for name, slot in self.slots.items()}

    def shutdown(self) -> None:
        """Stop the experts, unless they are shared (detached): then other replicas still use them."""
        if not self.detached:
            for slot in self.slots.values():
                ray.kill(slot.actor, no_restart=True)
        self.slots.clear()
