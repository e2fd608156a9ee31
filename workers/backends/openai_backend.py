"""Experts served elsewhere behind an OpenAI-compatible API (vLLM, TGI, a hosted model).

A batch becomes concurrent HTTP requests: the remote server does its own
batching, so holding requests back here would only add latency.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import httpx

from workers.backends import OnDelta, deliver_whole
from workers.config import OpenAIExpert
from workers.types import Completion, Prompt, SamplingParams


class RemoteExpertError(RuntimeError):
    """The remote endpoint refused or failed a request."""


class OpenAIBackend:
    device = "remote"

    def __init__(self, config: OpenAIExpert) -> None:
        self.config = config
        self.headers: dict[str, str] | None = None

    def _api_key(self) -> str | None:
        if self.config.api_key_env is None:
            return None
        key = os.environ.get(self.config.api_key_env)
        if not key:
            raise RemoteExpertError(
                f"{self.config.name}: environment variable {self.config.api_key_env} is not set"
            )
        return key

    def load(self) -> None:
        """Check that the endpoint answers and serves the configured model."""
        key = self._api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = self.config.base_url.rstrip("/") + "/models"
        try:
            resp = httpx.get(url, headers=headers, timeout=self.config.timeout_s)
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.config.name}: cannot reach {url}: {exc}") from exc
        if resp.status_code != 200:
            raise RemoteExpertError(f"{self.config.name}: {url} answered {resp.status_code}")
        served = {m.get("id") for m in resp.json().get("data", [])}
        if self.config.model not in served:
            raise RemoteExpertError(
                f"{self.config.name}: {url} does not serve {self.config.model!r} (it serves {sorted(served)})"
            )
        self.headers = headers

    def unload(self) -> None:
        self.headers = None

    def estimate_memory_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def generate(self, prompts: list[Prompt], params: SamplingParams, on_delta: OnDelta | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """Concurrent requests to the remote server; a stream gets each answer whole when it arrives (the remote
        call is not streamed)."""
        if self.headers is None:
            raise RuntimeError(f"expert {self.config.name} is not loaded")
        return deliver_whole(asyncio.run(self._generate_all(prompts, params)), on_delta)

    async def _generate_all(self, prompts: list[Prompt], params: SamplingParams) -> list[Completion]:
        limits = httpx.Limits(max_connections=self.config.max_batch_size)
        async with httpx.AsyncClient(
            base_url=self.config.base_url, headers=self.headers, timeout=self.config.timeout_s, limits=limits
        ) as client:
            return list(await asyncio.gather(*(self._one(client, p, params) for p in prompts)))

    async def _one(self, client: httpx.AsyncClient, prompt: Prompt, params: SamplingParams) -> Completion:
        body: dict[str, object] = {
            "model": self.config.model,
            "messages": prompt.as_messages(),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        try:
            resp = await client.post("chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise RemoteExpertError(f"{self.config.name}: request failed: {exc}") from exc
        if resp.status_code != 200:
            raise RemoteExpertError(
                f"{self.config.name}: endpoint answered {resp.status_code}: {resp.text[:200]}"
            )
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        return Completion(
            text=(choice["message"].get("content") or "").strip(),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason") or "stop",
        )

    def describe(self) -> dict[str, object]:
        return {"base_url": self.config.base_url, "model": self.config.model}
