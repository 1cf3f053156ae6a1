"""GET /mtpd/status's body, as pydantic models: what /openapi.json documents for the page's data
(daemon.server.page builds the same dict). Pure data."""

from __future__ import annotations

from pydantic import BaseModel, Field

from daemon.server.response_models import HealthMemory, LastSpeculation


class Counts(BaseModel):
    drafted: int
    accepted: int


class Acceptance(BaseModel):
    by_position: list[Counts] = Field(description="[j]: drafts made at draft position j + 1, and of them accepted")
    by_class: dict[str, dict[str, Counts]] = Field(
        description="content class (code, prose, structured) -> source (mtp: the drafter; lookup: copies)")


class Costs(BaseModel):
    """The adaptive policy's cost model as it stands (policies.cost), milliseconds."""

    draft_ms: float = Field(description="one drafter forward")
    round_ms: list[float] = Field(description="[k]: a round of k drafts, drafted and verified (k = 0: a plain step)")
    lookup_round_ms: list[float] = Field(description="[k]: a round of k copied drafts, verified")
    block: bool = Field(description="a block drafter: one forward drafts any k")


class Status(BaseModel):
    """What the page shows: the model and its drafter, the load, speculation's figures since start-up."""

    model: str
    drafter: str | None
    drafter_kind: str | None = Field(description="chained (MTP layers), dflash or dspark (block drafters)")
    speculation: str = Field(description="the default draft policy")
    uptime_s: float
    requests_served: int
    completion_tokens: int
    running: int
    waiting: int
    tokens_per_second: float = Field(description="tokens streamed over the last 5 seconds, every request together")
    acceptance: Acceptance
    costs: Costs | None = Field(description="None: no drafter, so no cost model")
    off_tokens_per_second: float | None = Field(description="the cost model's plain decoding rate: 1 / a plain step")
    last_request: LastSpeculation | None
    memory: HealthMemory
