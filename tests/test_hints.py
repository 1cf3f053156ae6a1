"""The request-field policy (docs/serving.md): hints are accepted and named in one response header
and the log line, Anthropic's context editing is applied, system messages inside `messages` join
the system prompt, and a prompt past the context gets Anthropic's wording under /v1/messages.
Through HTTP against a scripted fake engine whose tokenizer is one token per character."""

import pytest
from test_messages import sse_events
from test_server_app import FakeWorker, app_with
from test_tool_calls import prompt_of, scripted

from daemon.server.context_edits import PLACEHOLDER
from daemon.server.hints import HEADER

READ = {"name": "Read", "description": "Read a file",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
BETAS = "claude-code-20250219,context-management-2025-06-27,interleaved-thinking-2025-05-14,effort-2025-11-24"


def claude_codes_first_request() -> dict:
    """The shape of Claude Code 2.1's first request: its own model name, hints, context edits and a system message."""
    ephemeral = {"type": "ephemeral", "ttl": "1h"}
    return {
        "model": "claude-opus-4-8", "max_tokens": 32000, "stream": True, "tools": [{**READ, "cache_control": ephemeral}],
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328; cch=00000;"},
                   {"type": "text", "text": "You are Claude Code.", "cache_control": ephemeral}],
        "messages": [{"role": "system", "content": "The user's shell is bash."},
                     {"role": "user", "content": [{"type": "text", "text": "Add sub(a, b) to calc.py",
                                                   "cache_control": {"type": "ephemeral"}}]}],
        "metadata": {"user_id": "user_0a1b_account__session_2c3d"},
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"},
                                         {"type": "clear_tool_uses_20250919",
                                          "trigger": {"type": "input_tokens", "value": 180000}}]},
    }


async def test_claude_codes_first_request_is_answered_and_names_the_hints_it_left_unused(aiohttp_client):
    worker = FakeWorker(answer=scripted("Done."), context=4096)
    client = await aiohttp_client(app_with(worker))
    r = await client.post("/v1/messages", json=claude_codes_first_request(),
                          headers={"anthropic-beta": BETAS, "anthropic-version": "2023-06-01"})
    assert r.status == 200, await r.text()
    assert sorted(r.headers[HEADER].split(", ")) == sorted([
        "cache_control", "thinking", "output_config.effort", "context_management.clear_thinking_20251015",
        "metadata", "anthropic-beta:claude-code-20250219", "anthropic-beta:interleaved-thinking-2025-05-14",
        "anthropic-beta:effort-2025-11-24", "model"])
    events = sse_events(await r.text())
    assert events[0][1]["message"]["model"] == "tiny"  # the model that answered, not the one named
    end = next(data for name, data in events if name == "message_delta")
    assert end["context_management"] == {"applied_edits": []}  # far below the trigger: nothing cleared
    prompt = prompt_of(worker)
    assert prompt.index("You are Claude Code.") < prompt.index("The user's shell is bash.") < prompt.index("Add sub")


async def test_a_request_without_hints_has_no_header_and_system_messages_keep_their_order(aiohttp_client):
    worker = FakeWorker(context=4096)
    client = await aiohttp_client(app_with(worker))
    messages = [{"role": "system", "content": "First."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "system", "content": [{"type": "text", "text": "Second."}]},
                {"role": "user", "content": "Bye"}]
    r = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 3, "system": "Zeroth.",
                                                "messages": messages})
    assert r.status == 200 and HEADER not in r.headers
    assert "context_management" not in await r.json()
    prompt = prompt_of(worker)
    assert prompt.index("Zeroth.\n\nFirst.\n\nSecond.") < prompt.index("Hi") < prompt.index("Hello") < prompt.index("Bye")


async def test_openai_hints_go_through_the_same_header(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker()))
    r = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "reasoning_effort": "high",
        "user": "u1", "service_tier": "auto"})
    assert r.status == 200 and r.headers[HEADER] == "user, service_tier, reasoning_effort"
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "reasoning_effort": "extreme"})
    assert r.status == 400 and (await r.json())["error"]["param"] == "reasoning_effort"


# -- clear_tool_uses_20250919 ---------------------------------------------------------------------


def tool_turns(n: int) -> list[dict]:
    """A conversation of `n` Read calls, each answered with a 200-character result, then a question."""
    messages = [{"role": "user", "content": "Read the files."}]
    for i in range(1, n + 1):
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{i}", "name": f"Read{i % 2}",
                                               "input": {"path": f"file{i}.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}",
                                          "content": f"result {i} " + "x" * 190}]}]
    return messages + [{"role": "user", "content": "Which file is longest?"}]


TOOLS = [{**READ, "name": "Read0"}, {**READ, "name": "Read1"}]


def tool_body(edit: dict | None) -> dict:
    """Five tool uses, with one clear_tool_uses edit (its type added) or none."""
    body = {"model": "tiny", "messages": tool_turns(5), "tools": TOOLS}
    if edit is not None:
        body["context_management"] = {"edits": [{"type": "clear_tool_uses_20250919", **edit}]}
    return body


@pytest.fixture
async def ask(aiohttp_client):
    """ask(edit) -> (the message answering tool_body(edit), the prompt the engine was given)."""
    worker = FakeWorker(context=8192)
    client = await aiohttp_client(app_with(worker))

    async def ask(edit: dict | None) -> tuple[dict, str]:
        r = await client.post("/v1/messages", json={**tool_body(edit), "max_tokens": 3})
        assert r.status == 200, await r.text()
        return await r.json(), prompt_of(worker)

    ask.client = client
    return ask


async def test_clear_tool_uses_clears_old_results_past_the_trigger_and_keeps_the_last_n(ask):
    whole, whole_prompt = await ask(None)
    tokens = whole["usage"]["input_tokens"]
    edit = {"trigger": {"type": "input_tokens", "value": tokens - 1}, "keep": {"type": "tool_uses", "value": 2}}
    edited, prompt = await ask(edit)
    assert all(f"result {i} " in whole_prompt for i in range(1, 6))
    assert [f"result {i} " in prompt for i in range(1, 6)] == [False, False, False, True, True]
    assert prompt.count(PLACEHOLDER) == 3 and '"path": "file1.py"' in prompt  # inputs stay by default
    freed = tokens - edited["usage"]["input_tokens"]
    assert freed > 3 * 150
    assert edited["context_management"] == {"applied_edits": [
        {"type": "clear_tool_uses_20250919", "cleared_tool_uses": 3, "cleared_input_tokens": freed}]}
    r = await ask.client.post("/v1/messages/count_tokens", json=tool_body(edit))
    assert (await r.json())["input_tokens"] == edited["usage"]["input_tokens"]  # counted after the edits


async def test_clear_tool_uses_below_its_trigger_or_its_minimum_changes_nothing(ask):
    whole, whole_prompt = await ask(None)
    tokens = whole["usage"]["input_tokens"]
    for edit in ({"trigger": {"type": "input_tokens", "value": tokens}},  # past it, not at it
                 {"trigger": {"type": "tool_uses", "value": 5}},
                 {"trigger": {"type": "tool_uses", "value": 4}, "clear_at_least": {"type": "input_tokens",
                                                                                   "value": tokens}}):
        answer, prompt = await ask(edit)
        assert prompt == whole_prompt and answer["context_management"] == {"applied_edits": []}, edit


async def test_clear_tool_uses_spares_excluded_tools_and_clears_inputs_when_asked(ask):
    edit = {"trigger": {"type": "tool_uses", "value": 0}, "keep": {"type": "tool_uses", "value": 1},
            "exclude_tools": ["Read1"], "clear_tool_inputs": ["Read0"]}  # uses 1, 3, 5 are Read1's
    answer, prompt = await ask(edit)
    assert [f"result {i} " in prompt for i in range(1, 6)] == [True, False, True, False, True]
    assert '"path": "file2.py"' not in prompt and '"path": "file1.py"' in prompt
    assert answer["context_management"]["applied_edits"][0]["cleared_tool_uses"] == 2


# -- refused, and the context's limit -------------------------------------------------------------


@pytest.mark.parametrize("field, value, words", [
    ("output_config", {"effort": "extreme"}, "output_config.effort"),
    ("thinking", {"type": "enabled", "budget_tokens": 512}, "thinking.budget_tokens"),
    ("thinking", {"type": "adaptive", "budget_tokens": 2048}, "budget_tokens goes with type 'enabled'"),
    ("cache_control", {"type": "ephemeral", "ttl": "2h"}, "cache_control.ttl"),
    ("context_management", {"edits": [{"type": "compact_20260112"}]}, "'compact_20260112'"),
    ("context_management", {"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses", "value": -1}}]},
     "edits.0: Input should be greater"),
    ("stop_sequences", "END", "stop_sequences"),  # constrains the answer: applied as documented, or refused
])
async def test_a_hint_out_of_its_documented_values_or_an_unimplemented_edit_is_refused(aiohttp_client, field, value,
                                                                                         words):
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))
    r = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 3, field: value,
                                                "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status == 400
    error = await r.json()
    assert error["error"]["type"] == "invalid_request_error" and words in error["error"]["message"], error


async def test_a_prompt_past_the_context_gets_anthropics_wording_under_messages_only(aiohttp_client):
    client = await aiohttp_client(app_with(FakeWorker(context=64)))
    messages = [{"role": "user", "content": "a long question " * 8}]
    counted = await (await client.post("/v1/messages/count_tokens", json={"model": "tiny", "messages": messages})).json()
    r = await client.post("/v1/messages", json={"model": "tiny", "max_tokens": 3, "messages": messages})
    assert r.status == 400 and await r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": f"prompt is too long: {counted['input_tokens']} tokens > 64 maximum"}}
    r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status == 400 and (await r.json())["error"] == {
        "message": f"the prompt has {counted['input_tokens']} tokens; this model's context is 64 tokens",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}


@pytest.mark.parametrize("name, status", [("gpt-5-codex", 200), ("o3", 200), ("claude-sonnet-4-5", 200),
                                          ("qwen3-8b", 404), ("gpt5", 404)])
async def test_the_model_names_agents_send_by_default_are_answered_by_the_loaded_model(aiohttp_client, name, status):
    """model_aliases: Claude Code's and Codex's defaults reach the loaded model (reported as unused);
    a name that is neither is a 404, as before."""
    client = await aiohttp_client(app_with(FakeWorker(context=4096)))
    r = await client.post("/v1/chat/completions", json={"model": name, "max_tokens": 2,
                                                        "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status == status, await r.text()
    if status == 200:
        assert r.headers[HEADER] == "model" and (await r.json())["model"] == "tiny"
    else:
        assert (await r.json())["error"]["code"] == "model_not_found"
