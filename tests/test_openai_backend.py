"""The openai backend against a small OpenAI-compatible server on 127.0.0.1 (``tests.live.FakeOpenAI``).

The server is a stand-in for a remote vLLM endpoint, which cannot run here (no
GPU, no hub); it answers deterministically so that every field the backend
parses can be checked. Real HTTP, real uvicorn.
"""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import STORE_ROOT, run
from tests.live import FakeOpenAI
from workers.backends.openai_backend import OpenAIBackend, RemoteExpertError
from workers.config import OpenAIExpert, PoolConfig
from workers.pool import ExpertPool
from workers.types import Prompt, SamplingParams


@pytest.fixture(scope="module")
def remote():
    fake = FakeOpenAI()
    yield fake.app, fake.base_url
    fake.stop()


def _expert(base_url, **kw):
    return OpenAIExpert(name="remote", backend="openai", base_url=base_url, model="remote-7b",
                        api_key_env="TEST_REMOTE_KEY", **kw)


def test_batch_becomes_requests_with_usage(remote, monkeypatch):
    app, url = remote
    monkeypatch.setenv("TEST_REMOTE_KEY", "sekrit")
    backend = OpenAIBackend(_expert(url))
    backend.load()
    app.state.calls.clear()
    out = backend.generate([Prompt("one two"), Prompt("three")], SamplingParams(max_new_tokens=9, temperature=0.5, seed=3))
    assert [c.text for c in out] == ["echo: one two", "echo: three"]
    assert [(c.prompt_tokens, c.completion_tokens) for c in out] == [(2, 3), (1, 2)]
    assert sorted(c["messages"][0]["content"] for c in app.state.calls) == ["one two", "three"]
    assert {(c["max_tokens"], c["temperature"], c["seed"]) for c in app.state.calls} == {(9, 0.5, 3)}


def test_errors_are_clear(remote, monkeypatch):
    _, url = remote
    monkeypatch.delenv("TEST_REMOTE_KEY", raising=False)
    with pytest.raises(RemoteExpertError, match="TEST_REMOTE_KEY is not set"):
        OpenAIBackend(_expert(url)).load()
    monkeypatch.setenv("TEST_REMOTE_KEY", "wrong")
    with pytest.raises(RemoteExpertError, match="answered 401"):
        OpenAIBackend(_expert(url)).load()
    monkeypatch.setenv("TEST_REMOTE_KEY", "sekrit")
    with pytest.raises(RemoteExpertError, match="does not serve 'other'"):
        OpenAIBackend(_expert(url).model_copy(update={"model": "other"})).load()
    backend = OpenAIBackend(_expert(url))
    backend.load()
    with pytest.raises(RemoteExpertError, match="endpoint answered 500"):
        backend.generate([Prompt("explode")], SamplingParams())
    with pytest.raises(RemoteExpertError, match="cannot reach"):
        OpenAIBackend(_expert("http://127.0.0.1:9/v1")).load()


def test_remote_expert_through_a_ray_actor(remote, ray_cluster, monkeypatch):
    _, url = remote
    monkeypatch.setenv("TEST_REMOTE_KEY", "sekrit")  # the local actor inherits the driver's environment

    async def main():
        pool = await ExpertPool.start([_expert(url)], PoolConfig(), STORE_ROOT, namespace=f"t-{uuid.uuid4().hex[:8]}")
        try:
            return await pool.generate("remote", ["hello there"]), (await pool.info())[0]
        finally:
            pool.shutdown()

    result, info = run(main())
    assert result.completions[0].text == "echo: hello there"
    assert info.device == "remote" and info.state == "loaded"
