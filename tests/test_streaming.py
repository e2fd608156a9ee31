"""Token streaming and OpenAI compatibility against live servers on 127.0.0.1 with the real bundled experts,
read by clients we did not write (the official ``openai`` package, LangChain's ``ChatOpenAI``) and by a raw
parser of the event grammar."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from openai import APIError, AsyncOpenAI, NotFoundError, OpenAI, UnprocessableEntityError
from prometheus_client.parser import text_string_to_metric_families

from tests.live import ThreadServer

QUESTION = "What is the capital of France?"


def _config(**overrides: object) -> dict:
    server = {"max_tokens": 128, **overrides.pop("server", {})}
    return {"ray": {"namespace": f"stream-{uuid.uuid4().hex[:6]}"}, "routing": {"aggregation": "vote", **overrides},
            "server": server}


@pytest.fixture(scope="module")
def server(ray_cluster, store):
    s = ThreadServer(_config())
    yield s
    s.stop()


def sse_events(url: str, path: str, body: dict) -> tuple[httpx.Response, list[tuple[float, object]]]:
    """POST and read the raw stream, checking the grammar as it goes: every event is one ``data: `` line and a
    blank line, each is JSON except the last, which is ``[DONE]``. Returns (arrival time, payload) pairs."""
    events: list[tuple[float, object]] = []
    with httpx.stream("POST", url + path, json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        for text in r.iter_text():
            buffer += text
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                assert block.startswith("data: ") and "\n" not in block, block
                data = block[len("data: "):]
                assert not events or events[-1][1] != "[DONE]", "an event after [DONE]"
                events.append((time.time(), data if data == "[DONE]" else json.loads(data)))
        assert buffer == ""
    assert events[-1][1] == "[DONE]"
    return r, events


def test_chat_tokens_arrive_while_the_expert_is_still_generating(server):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24,
            "stream": True, "stream_options": {"include_usage": True}}
    r, events = sse_events(server.url, "/v1/chat/completions", body)
    chunks = [e for _, e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    opening, *middle, finish, usage = chunks
    assert opening["choices"][0]["delta"]["role"] == "assistant"
    assert opening["concilium"]["plan"]["streams"] == "smollm2" and r.headers["x-concilium-experts"] == "smollm2"
    pieces = [(t, e["choices"][0]["delta"]["content"]) for t, e in events[1:-3]]
    assert len(pieces) >= 3 and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert finish["choices"][0]["finish_reason"] == "stop" and usage["choices"] == []
    response = finish["concilium"]
    assert "".join(p for _, p in pieces) == response["answer"] and "Paris" in response["answer"]
    assert usage["usage"]["completion_tokens"] == response["total_usage"]["completion_tokens"] > 0
    # The first piece left before the expert's generation call returned, by the expert's own clock.
    assert pieces[0][0] < response["answers"][0]["finished_at"]


def test_a_vote_says_it_cannot_stream_and_a_synthesis_streams_the_aggregator(server):
    url = server.url
    _, voted = sse_events(url, "/v1/query", {"query": QUESTION, "max_tokens": 12, "stream": True})
    plan = voted[0][1]
    assert plan["plan"]["streams"] is None and "vote" in plan["plan"]["why"]
    final = voted[-2][1]
    assert "".join(e["delta"] for _, e in voted[1:-2]) == final["answer"] and final["id"] == plan["id"]
    _, synthesised = sse_events(url, "/v1/query", {"query": "Name a primary colour.", "max_tokens": 12,
                                                   "stream": True, "aggregation": "synthesize"})
    assert synthesised[0][1]["plan"]["streams"] == "aggregator"
    final = synthesised[-2][1]
    assert "".join(e["delta"] for _, e in synthesised[1:-2]) == final["answer"] and final["aggregation"] == "synthesize"


def test_official_openai_client_sync_async_streaming_and_completions(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    whole = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, seed=7, top_p=0.9,
                                           user="test-user", n=1)
    assert "Paris" in whole.choices[0].message.content
    stopped = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].message.content.strip()
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices

    async def streamed() -> str:
        async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
            stream = await aclient.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                                           stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(streamed()) == whole.choices[0].message.content
    completion = client.completions.create(model="smollm2", prompt=QUESTION, max_tokens=16)
    assert "Paris" in completion.choices[0].text and completion.usage.total_tokens > 0
    # Streamed with another max_tokens: the same request would be a cache hit, which is sent whole.
    pieces = [c.choices[0].text for c in client.completions.create(model="smollm2", prompt=QUESTION, max_tokens=15,
                                                                   stream=True) if c.choices]
    assert "".join(pieces) == completion.choices[0].text and len([p for p in pieces if p]) >= 3
    for field, value in (("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                         ("response_format", {"type": "json_object"}), ("logprobs", True)):
        with pytest.raises(UnprocessableEntityError, match=field):
            client.chat.completions.create(model="smollm2", messages=messages, **{field: value})
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(UnprocessableEntityError, match="only text parts"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": image}])


def test_official_openai_client_models_metadata_and_unknown_models(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Answer in a few words."},
                {"role": "user", "content": "What is the capital of France?"}]
    direct = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=12)
    assert "Paris" in direct.choices[0].message.content
    meta = direct.model_extra["concilium"]
    assert meta["routing"]["experts"] == ["smollm2"] and direct.usage.total_tokens > 0
    routed = client.chat.completions.with_raw_response.create(model="concilium/all", messages=messages, max_tokens=8)
    assert routed.headers["x-concilium-router"] == "all"
    stream = client.chat.completions.create(model="concilium", messages=messages, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage is not None and chunks[-2].choices[0].finish_reason == "stop"
    assert {m.id for m in client.models.list()} == {"concilium", "concilium/all", "smollm2", "gemma3"}
    with pytest.raises(NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=messages)


def test_langchain_chat_openai_invoke_and_stream_with_content_parts(server):
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="smollm2", max_tokens=16, temperature=0,
                     max_retries=0)
    turns = [SystemMessage(content="Answer in a few words."),
             HumanMessage(content=[{"type": "text", "text": QUESTION}])]
    reply = llm.invoke(turns)
    assert "Paris" in reply.content and reply.response_metadata["token_usage"]["completion_tokens"] > 0
    pieces = [c.content for c in llm.bind(max_tokens=15).stream(turns)]  # not the cached request
    assert len([p for p in pieces if p]) >= 3 and "".join(pieces) == reply.content


def _metric(url: str, name: str) -> float:
    families = {m.name: m for m in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    return sum(s.value for s in families[name].samples if not s.name.endswith("_created"))


def test_a_client_that_leaves_stops_its_row_and_errors_after_the_first_byte_are_events(ray_cluster, store):
    """Two streams share a window (``max_wait_ms`` 300) on smollm2. One client leaves after two pieces: its row
    stops, the other runs to its end. A stream past ``request_timeout_s`` ends with an error event and
    ``[DONE]``, which the openai client raises as an APIError."""
    s = ThreadServer(_config(max_wait_ms=300, server={"request_timeout_s": 4}))
    try:
        httpx.post(f"{s.url}/v1/query", json={"query": "Hi", "experts": ["smollm2"], "k": 1, "max_tokens": 2},
                   timeout=120)  # loads the model
        before = _metric(s.url, "concilium_generated_tokens")
        story = {"model": "smollm2", "max_tokens": 16, "stream": True,
                 "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}

        def leave_early() -> int:
            with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=story, timeout=120) as r:
                lines = r.iter_lines()
                return len([next(lines) for _ in range(6)])  # the opening and two pieces, with blank lines

        async def both() -> tuple[int, list]:
            left = asyncio.to_thread(leave_early)
            await asyncio.sleep(0.05)
            stayed = asyncio.to_thread(sse_events, s.url, "/v1/chat/completions", story)
            return await asyncio.gather(left, stayed)

        _, (_, events) = asyncio.run(both())
        kept = events[-2][1]["concilium"]["total_usage"]["completion_tokens"]
        assert kept == 16
        time.sleep(1)
        left_tokens = _metric(s.url, "concilium_generated_tokens") - before - kept
        assert 1 <= left_tokens < kept and _metric(s.url, "concilium_cancelled") == 1

        essay = {**story, "max_tokens": 128, "messages": [{"role": "user", "content": "Write a long essay."}]}
        _, events = sse_events(s.url, "/v1/chat/completions", essay)
        assert events[-2][1]["error"]["type"] == "timeout" and len(events) > 3
        client = OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(APIError, match="no answer within"):
            list(client.chat.completions.create(**essay))
    finally:
        s.stop()
