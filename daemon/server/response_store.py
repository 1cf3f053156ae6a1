"""The responses kept in memory for `previous_response_id` (OpenAI's Responses API): each one's
conversation as input items (its predecessors', its own input, its output), so a later request
continues from it. Bounded both by count and by bytes (the items' JSON); the oldest goes first.
Nothing is written to disk: a restart forgets them all."""

from __future__ import annotations

from collections import OrderedDict

from pydantic import BaseModel

from daemon.server.openai_shapes import ApiError

MAX_RESPONSES = 1000
MAX_BYTES = 64 * 2**20


class ResponseStore:
    """Used on the event loop's thread only."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._kept: OrderedDict[str, tuple[list[BaseModel], int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, rid: str, items: list[BaseModel]) -> None:
        """Keeps `items` under `rid`, dropping the oldest until both bounds hold; a conversation
        larger than the whole budget is not kept."""
        size = sum(len(item.model_dump_json(exclude_none=True)) for item in items)
        if size > self.max_bytes:
            return
        self._kept[rid] = (items, size)
        self.bytes += size
        while len(self._kept) > self.max_responses or self.bytes > self.max_bytes:
            _, (_, dropped) = self._kept.popitem(last=False)
            self.bytes -= dropped

    def get(self, rid: str) -> list[BaseModel]:
        """The conversation kept under `rid`; a 400 if it never was, or was dropped since."""
        if rid not in self._kept:
            raise ApiError(400, f"previous_response_id: no response {rid!r} is kept (never stored, stored with "
                                f"store: false, or dropped as newer ones came)", "previous_response_id",
                           "previous_response_not_found")
        return list(self._kept[rid][0])
