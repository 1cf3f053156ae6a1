"""GET /openapi.json, and schemathesis fuzzing every operation it documents against a real daemon on
the default model (as vLLM's tests/entrypoints/openai/test_openapi_schema.py does): any 5xx, or a
status, content type or body the document does not describe, fails."""

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from test_server_app import app_with

from daemon.engine.sampling import new_key
from daemon.server.openai_shapes import ApiError, ChatRequest, parse
from daemon.server.openapi import document

MAX_TOKENS = 2  # what a generated request may ask for (conftest's default_daemon's default too): shapes, not answers


def map_body(ctx, body):
    """Generated token limits can be huge: capped, so each generation request stays short. A model
    name is the served one: a random name is a 404 before the rest is read (GET /v1/models/{model}
    fuzzes names)."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = "SmolLM2-135M-Instruct"
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(key)
            if type(value) is int and value > MAX_TOKENS:
                body[key] = MAX_TOKENS
    return body


# The document is generated from code: loaded here so that each operation is a test of its own (the
# served copy is checked to be the same one); its calls go to the daemon.
api = schemathesis.openapi.from_dict(document(auth=False))
api.config.update(request_timeout=60)
api.config.generation.update(max_examples=50, allow_x00=False)
api.hook(map_body)
# A request the schema allows may still be refused for a rule JSON Schema does not carry here
# (tool_choice without tools, an empty prompt, token ids past this model's vocabulary, a draft
# policy's name): a 400 in OpenAI's or Anthropic's error shape, as documented.
accepted = api.config.checks.positive_data_acceptance
accepted.expected_statuses = [*accepted.expected_statuses, "400"]


@pytest.mark.real_model
@api.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)  # CI: the same cases
def test_every_operation_answers_as_documented(case, default_daemon):
    case.call_and_validate(base_url=default_daemon.url)


@pytest.mark.real_model
def test_the_daemon_serves_the_document(default_daemon):
    with urllib.request.urlopen(default_daemon.url + "/openapi.json") as r:
        assert r.headers["Content-Type"].startswith("application/json")
        assert json.load(r) == document(auth=False)


async def test_the_document_is_open_and_names_the_key_schemes(aiohttp_client):
    client = await aiohttp_client(app_with(api_key="s3cret"))
    r = await client.get("/openapi.json")
    assert r.status == 200
    doc = await r.json()
    assert doc["openapi"].startswith("3.1") and set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in chat["responses"]
    assert "security" not in doc["paths"]["/health"]["get"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert (await client.get("/v1/models")).status == 401


async def test_without_a_key_no_scheme_and_every_ref_resolves(aiohttp_client):
    client = await aiohttp_client(app_with())
    doc = await (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in doc["components"]
    assert "401" not in doc["paths"]["/v1/messages"]["post"]["responses"]
    text = str(doc)
    refs = {part.split("'")[0] for part in text.split("#/components/schemas/")[1:]}
    assert refs and refs <= set(doc["components"]["schemas"])
    message_error = doc["paths"]["/v1/messages"]["post"]["responses"]["400"]["content"]["application/json"]
    assert message_error["schema"] == {"$ref": "#/components/schemas/AnthropicError"}


def _chat(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x"}], **fields}).encode()


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**63 - 1])
def test_every_int64_seed_makes_a_key(seed):
    """MLX's PRNG key refused a negative seed (a 500): OpenAI's int64 range is taken modulo 2**64."""
    body = parse(ChatRequest, _chat(seed=seed))
    assert body.seed == seed % 2**64
    new_key(body.seed)


@pytest.mark.parametrize("field, value", [("seed", 2**63), ("seed", -(2**63) - 1), ("logit_bias", {"²": 1.0})])
def test_past_the_range_is_a_400_naming_the_field(field, value):
    """A logit_bias key str.isdigit() took but int() did not was a 500."""
    with pytest.raises(ApiError) as e:
        parse(ChatRequest, _chat(**{field: value})).bias(100)
    assert e.value.status == 400 and e.value.param == field
