"""GET /openapi.json: an OpenAPI 3.1 document of every route, generated from the pydantic request
models (openai_shapes, anthropic_shapes, responses_shapes) and response models (response_models,
responses_models), so the document changes when they do. One JSON Schema namespace: pydantic's
`$defs` become components/schemas. With an API key set, the /v1 operations carry the two schemes
the auth middleware accepts and their 401; this route itself needs no key (the middleware guards
/v1/ and /mtpd/ only)."""

from __future__ import annotations

import functools
from importlib.metadata import version

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from daemon.server import listing_models as listing
from daemon.server import page_models
from daemon.server import response_models as out
from daemon.server import responses_models as responses_out
from daemon.server.anthropic_shapes import CountTokensRequest, MessagesRequest
from daemon.server.keys import SETTINGS
from daemon.server.openai_shapes import ChatRequest, CompletionRequest
from daemon.server.responses_shapes import ResponsesRequest
from daemon.server.security import guarded

OPENAI_ERRORS = {400: "invalid request (the message names the parameter)", 404: "no such model",
                 413: "the request body is too large", 500: "internal server error",
                 503: "the queue is full, or a rank of the cluster is lost (Retry-After)",
                 504: "the request timed out"}
MESSAGES_ERRORS = OPENAI_ERRORS  # the same statuses, in Anthropic's error shape
COUNT_ERRORS = {s: OPENAI_ERRORS[s] for s in (400, 413, 500)}
STREAMS = {out.ChatCompletion: out.ChatStreamData, out.Completion: out.CompletionStreamData,
           out.AnthropicMessageResponse: out.MessageStreamData,
           responses_out.ResponseObject: responses_out.ResponseStreamData}

# (method, path, operationId, summary, request model, 200 model or media type, error statuses, error model)
OPERATIONS = [
    ("post", "/v1/chat/completions", "createChatCompletion", "OpenAI chat completion", ChatRequest,
     out.ChatCompletion, OPENAI_ERRORS, out.ErrorResponse),
    ("post", "/v1/completions", "createCompletion", "OpenAI text completion", CompletionRequest,
     out.Completion, OPENAI_ERRORS, out.ErrorResponse),
    ("post", "/v1/responses", "createResponse", "OpenAI Responses API", ResponsesRequest,
     responses_out.ResponseObject, OPENAI_ERRORS, out.ErrorResponse),
    ("post", "/v1/messages", "createMessage", "Anthropic Messages API", MessagesRequest,
     out.AnthropicMessageResponse, MESSAGES_ERRORS, out.AnthropicError),
    ("post", "/v1/messages/count_tokens", "countTokens", "the prompt's token count, as the model reads it",
     CountTokensRequest, out.TokenCount, COUNT_ERRORS, out.AnthropicError),
    ("get", "/v1/models", "listModels",
     "every model it can serve, and the default under each draft policy (Anthropic's shape with anthropic-version)", None,
     listing.ModelListing, {500: OPENAI_ERRORS[500]}, out.ErrorResponse),
    ("get", "/v1/models/{model}", "getModel", "one model card (`<model>` or `<model>:<policy>`)", None,
     listing.ModelListingCard, {404: OPENAI_ERRORS[404], 500: OPENAI_ERRORS[500]}, out.ErrorResponse),
    ("get", "/health", "health", "liveness and totals (503 once a rank of the cluster is lost)", None,
     out.Health, {500: OPENAI_ERRORS[500]}, out.ErrorResponse),
    ("get", "/mtpd/status", "status", "the page's data: the model, the load, speculation's figures", None,
     page_models.Status, {500: OPENAI_ERRORS[500]}, out.ErrorResponse),
    ("get", "/metrics", "metrics", "Prometheus metrics", None, "text/plain", {500: OPENAI_ERRORS[500]},
     out.ErrorResponse),
    ("get", "/openapi.json", "openapi", "this document", None, "application/json", {500: OPENAI_ERRORS[500]},
     out.ErrorResponse),
]
SECURITY = {"bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}


def _content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _events(data: dict) -> dict:
    """`stream: true`'s answer: before OpenAPI 3.2's itemSchema, the schema is one event's (as
    schemathesis reads it: {"event", "data", ...}), its data JSON (OpenAI's streams end with [DONE])."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": data}
    event = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}}}
    return {"text/event-stream": {"schema": event}}


def _operation(path: str, op_id: str, summary: str, request: type[BaseModel] | None, ok, errors: dict, error_model,
               refs: dict, auth: bool) -> dict:
    if isinstance(ok, str):
        ok_content = {ok: {"schema": {"type": "object"} if ok == "application/json" else {"type": "string"}}}
    else:
        ok_content = _content(refs[ok]) | (_events(refs[STREAMS[ok]]) if ok in STREAMS else {})
    responses = {"200": {"description": "OK", "content": ok_content}}
    errors = errors | ({401: "invalid or missing API key"} if auth else {})
    for status in sorted(errors):
        responses[str(status)] = {"description": errors[status], "content": _content(refs[error_model])}
    if op_id == "health":
        responses["503"] = {"description": "a rank of the cluster is lost", "content": _content(refs[out.Health])}
    operation = {"operationId": op_id, "summary": summary, "responses": responses}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": _content(refs[request])}
    if "{model}" in path:
        operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    if auth:
        operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return operation


@functools.cache
def document(auth: bool) -> dict:
    """The OpenAPI 3.1 document; `auth`: an API key guards /v1/."""
    models = {m for op in OPERATIONS for m in (op[4], op[5], op[7]) if isinstance(m, type)} | set(STREAMS.values())
    mapping, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                       ref_template="#/components/schemas/{model}")
    refs = {model: schema for (model, _), schema in mapping.items()}
    paths: dict[str, dict] = {}
    for method, path, op_id, summary, request, ok, errors, error_model in OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(path, op_id, summary, request, ok, errors, error_model,
                                                        refs, auth and guarded(path))
    components: dict = {"schemas": defs["$defs"]}
    if auth:
        components["securitySchemes"] = SECURITY
    return {"openapi": "3.1.0", "info": {"title": "mtpd", "version": version("mtpd")}, "paths": paths, "components": components}


async def openapi(http: web.Request) -> web.Response:
    return web.json_response(document(http.app[SETTINGS].api_key is not None))
