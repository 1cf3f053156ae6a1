"""What kind of content is being written: code, prose or structured text, from the text seen so far.

Structured: JSON held to a grammar (structured output, a forced tool call), a tool call between
<tool_call> tags, a ```json block; highly predictable, so it keeps acceptance estimates of its own.
Inside another fenced block (```) it is code; outside, a cheap score over the last few hundred
characters decides (symbol density, code keywords, indented lines). `ContentTracker.feed` is cheap
enough to run every step, so an answer that opens a code fence switches class inside it and back after.
"""

from __future__ import annotations

import re

CODE, PROSE, STRUCTURED = "code", "prose", "structured"
CLASSES = (CODE, PROSE, STRUCTURED)
WINDOW = 240  # characters of recent text the score reads
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_SYMBOLS = set("{}()[];=<>_*/\\|&#$%+:\"'`^~")
_KEYWORDS = re.compile(
    r"\b(def|return|import|from|class|function|const|let|var|fn|func|public|private|static|void|int|"
    r"char|struct|impl|package|include|elif|else|for|while|if|try|except|catch|print|printf|console|"
    r"self|this|null|None|True|False|true|false|SELECT|FROM|WHERE|CREATE|TABLE|INSERT|echo|lambda|async|await|new|"
    r"interface|val)\b"
)
_INDENTED = re.compile(r"\n(?:    |\t)\S")
_CALL = re.compile(r"\w\(|\)\s*[{:;]|->|=>|==|!=|\+=|::")


def code_score(text: str) -> float:
    """> 0 means code. A pure function of the text."""
    if not text.strip():
        return -1.0
    n = len(text)
    symbols = sum(c in _SYMBOLS for c in text) / n
    keywords = len(_KEYWORDS.findall(text)) / max(1, len(text.split()))
    structure = (len(_INDENTED.findall(text)) + len(_CALL.findall(text))) * 40 / n
    return 6 * symbols + 2.5 * keywords + structure - 1.0


def classify(text: str) -> str:
    return CODE if code_score(text[-WINDOW:]) > 0 else PROSE


def _last_new(text: str, marker: str, new_from: int) -> int:
    """Where the last `marker` that ends past `new_from` starts in `text`; -1 if none."""
    i = text.rfind(marker)
    return i if i >= 0 and i + len(marker) > new_from else -1


class ContentTracker:
    """Incremental: feed text as it is generated, read `current`. `structured`: the whole answer
    is held to a JSON grammar."""

    def __init__(self, prompt_text: str = "", structured: bool = False):
        self.structured = structured
        self.in_fence, self.fence_info, self.in_call = False, None, False
        self.tail = ""
        self.current = STRUCTURED if structured else PROSE
        self.feed(prompt_text)

    def feed(self, text: str) -> str:
        if not text:
            return self.current
        joined, new_from = self.tail + text, len(self.tail)
        if (joined.count("```") - self.tail.count("```")) % 2 == 1:
            self.in_fence, self.fence_info = not self.in_fence, None
        opened, closed = _last_new(joined, CALL_OPEN, new_from), _last_new(joined, CALL_CLOSE, new_from)
        if opened >= 0 or closed >= 0:
            self.in_call = opened > closed
        self.tail = joined[-WINDOW:]
        after_fence = self.tail.rsplit("```", 1)[-1]
        if self.in_fence and self.fence_info is None and "\n" in after_fence:
            self.fence_info = after_fence.split("\n", 1)[0].strip().lower()
        self.current = self._class(after_fence)
        return self.current

    def _class(self, after_fence: str) -> str:
        if self.structured or self.in_call or (self.in_fence and self.fence_info == "json"):
            return STRUCTURED
        if self.in_fence:
            return CODE
        return classify(after_fence) if after_fence.strip() else PROSE
