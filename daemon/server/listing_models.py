"""The bodies of `GET /v1/models` and `GET /v1/models/{id}`, in OpenAI's shape and, for a client
that sends `anthropic-version`, Anthropic's: what /openapi.json documents. Pure data."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, RootModel


class ServedModelInfo(BaseModel):
    drafter: str | None = Field(None, description="absent for a model not loaded yet")
    context_length: int | None = Field(None, description="absent for a model not loaded yet")
    speculation: str | None = Field(description="the draft policy a `<model>:<policy>` id selects")
    loaded: bool
    source: Literal["model", "settings", "models_dir", "hf cache"] = Field(
        description="the `model` setting, a [models.NAME] table, models_dir or the Hugging Face cache")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    mtpd: ServedModelInfo


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AnthropicModelCard(BaseModel):
    """Anthropic's shape, for a request that sends `anthropic-version`."""

    type: Literal["model"]
    id: str
    display_name: str
    created_at: str


class AnthropicModelList(BaseModel):
    data: list[AnthropicModelCard]
    has_more: bool
    first_id: str | None
    last_id: str | None


class ModelListing(RootModel[ModelList | AnthropicModelList]):
    pass


class ModelListingCard(RootModel[ModelCard | AnthropicModelCard]):
    pass
