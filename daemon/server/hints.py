"""Hints: request fields a conforming server may leave unused on a model that lacks what they steer
(a thinking effort on a model without reasoning, billing metadata, a cache's time to live).

mtpd's policy for request fields (docs/serving.md): a field that constrains the answer is applied or
refused with a 400; a hint is accepted, checked against its documented values, and reported as
unused. Both APIs' request models declare their hints with `hint()`; `unused(body)` names the ones a
request set, and `report` puts them in one response header and the request's log line."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

HEADER = "x-mtpd-unused-hints"
MARK = "x-mtpd-hint"  # in the OpenAPI document too: the field is accepted and left unused
# anthropic-beta values whose features mtpd serves; any other value is reported as unused
SERVED_BETAS = frozenset({"context-management-2025-06-27", "structured-outputs-2025-11-13",
                          "token-counting-2024-11-01"})
UNUSED = web.RequestKey("unused_hints", list)


def hint(default=None, name: str | None = None, **kwargs):
    """A pydantic Field for a hint: validated like any field, reported when set, under `name` if
    given, else under its path (see `unused`)."""
    return Field(default, json_schema_extra={MARK: name or True}, **kwargs)


def unused(body: BaseModel) -> list[str]:
    """The hints `body` sets, in field order, each named once by its path from the body or from the
    list item it sits in (`output_config.effort`, `cache_control` on any block)."""
    names: list[str] = []
    _collect(body, "", names)
    return list(dict.fromkeys(names))


def _collect(value, path: str, names: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _collect(item, "", names)
    elif isinstance(value, BaseModel):
        for name, info in type(value).model_fields.items():
            field = getattr(value, name)
            if field is None:
                continue
            key = path + (info.alias or name)
            mark = info.json_schema_extra.get(MARK) if isinstance(info.json_schema_extra, dict) else None
            if mark:
                names.append(mark if isinstance(mark, str) else key)
            else:
                _collect(field, key + ".", names)


def unused_betas(http: web.Request) -> list[str]:
    """The request's `anthropic-beta` values (comma-separated, in one header or several) mtpd does not serve."""
    given = (v.strip() for header in http.headers.getall("anthropic-beta", []) for v in header.split(","))
    return [f"anthropic-beta:{v}" for v in dict.fromkeys(given) if v and v not in SERVED_BETAS]


def report(http: web.Request, names: list[str]) -> None:
    """Keeps `names` for the response header (`add_header`) and the request's log line."""
    http[UNUSED] = names


async def add_header(http: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` signal, so that streams carry the header too."""
    names = http.get(UNUSED)
    if names:
        response.headers[HEADER] = ", ".join(names)
