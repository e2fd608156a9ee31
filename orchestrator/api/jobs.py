"""Asynchronous queries whose records live in the store, so they outlive the API process.

A job is written to the store and added to the pending set before the client
hears its id. A runner claims a job with a short-lived claim key that it
renews while the job runs. If the process dies, the claim lapses, and any
process's sweep (every ``sweep_s``, including the restarted one's first
sweep) claims the job and runs it again. Several replicas on one redis share
the work the same way: while a runner lives, its renewed claim keeps the
others off its jobs, so a job runs again only when its runner died.

A job record names its owner, the key id that submitted it: only that key
(or an admin) reads it, and the run is counted in that key's usage.

A runner holds at most ``max_running`` jobs at once, and a job the scheduler
refuses as overloaded goes back to the pending set: the backlog waits in the
store, never in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from orchestrator.api.schemas import JobOut, QueryBody, QueryResponse
from orchestrator.api.store import Store, StoreUnavailable, retry_while_down
from orchestrator.engine.requests import Overloaded

log = logging.getLogger(__name__)

PENDING = "jobs:pending"


class JobRunner:
    def __init__(
        self,
        store: Store,
        run: Callable[[QueryBody, str], Awaitable[QueryResponse]],
        ttl_s: float,
        claim_s: float = 15.0,
        sweep_s: float = 5.0,
        max_running: int = 64,
    ) -> None:
        self.store = store
        self.run = run
        self.ttl_s = ttl_s
        self.claim_s = claim_s
        self.sweep_s = sweep_s
        self.max_running = max_running
        self.owner = uuid.uuid4().hex
        self._tasks: dict[str, asyncio.Task] = {}
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        tasks = [t for t in [self._sweeper, *self._tasks.values()] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def submit(self, body: QueryBody, owner: str) -> JobOut:
        job = JobOut(id="job-" + uuid.uuid4().hex, status="queued", created=time.time())
        await self._save(job, body, owner)
        await self.store.sadd(PENDING, job.id)
        await self._claim_and_start(job.id)
        return job

    async def get(self, job_id: str) -> tuple[JobOut, str] | None:
        """The job and its owner's key id."""
        raw = await self.store.get(f"job:{job_id}")
        if raw is None:
            return None
        record = json.loads(raw)
        return JobOut.model_validate(record["job"]), record["owner"]

    async def _save(self, job: JobOut, body: QueryBody, owner: str) -> None:
        record = {"job": job.model_dump(mode="json"), "request": body.model_dump(mode="json", by_alias=True),
                  "owner": owner}
        await self.store.set(f"job:{job.id}", json.dumps(record), self.ttl_s)

    async def _claim_and_start(self, job_id: str) -> None:
        if job_id in self._tasks or len(self._tasks) >= self.max_running:
            return
        if await self.store.set(f"job:{job_id}:claim", self.owner, self.claim_s, only_new=True):
            self._tasks[job_id] = asyncio.create_task(self._execute(job_id))

    async def _sweep_forever(self) -> None:
        while True:
            try:
                for job_id in await self.store.smembers(PENDING):
                    await self._claim_and_start(job_id)
            except StoreUnavailable as exc:
                log.warning("job sweep skipped: %s", exc)
            await asyncio.sleep(self.sweep_s)

    async def _renew(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.claim_s / 3)
            with contextlib.suppress(StoreUnavailable):
                await self.store.set(f"job:{job_id}:claim", self.owner, self.claim_s)

    async def _finish(self, job: JobOut, body: QueryBody, owner: str) -> None:
        """Save a job's outcome, trying again while the store is down (its claim is renewed meanwhile): the job
        has run, and if it were left for another process to run again, it would be spent and counted twice."""
        await retry_while_down(lambda: self._save(job, body, owner))
        await retry_while_down(lambda: self.store.srem(PENDING, job.id))

    async def _execute(self, job_id: str) -> None:
        renew = asyncio.create_task(self._renew(job_id))
        try:
            raw = await self.store.get(f"job:{job_id}")
            if raw is None:  # expired or deleted: nothing left to run
                await self.store.srem(PENDING, job_id)
                return
            record = json.loads(raw)
            job, body = JobOut.model_validate(record["job"]), QueryBody.model_validate(record["request"])
            owner = record["owner"]
            if job.status in ("done", "failed"):
                await self.store.srem(PENDING, job_id)
                return
            job.status = "running"
            await self._save(job, body, owner)
            try:
                job.result, job.status = await self.run(body, owner), "done"
            except Overloaded:  # back to the pending set; a later sweep runs it
                job.status = "queued"
                await self._save(job, body, owner)
                await self.store.delete(f"job:{job_id}:claim")
                return
            except Exception as exc:  # the job's outcome, recorded for the client
                job.error, job.status = str(exc) or type(exc).__name__, "failed"
            job.finished = time.time()
            await self._finish(job, body, owner)
        except StoreUnavailable as exc:
            log.warning("job %s paused, the store is unavailable: %s", job_id, exc)
        finally:
            renew.cancel()
            self._tasks.pop(job_id, None)
