"""What kind of content is being written: code or prose, from the text seen so far.

Inside a fenced block (```) it is code; outside, a cheap score over the last few hundred characters
decides (symbol density, code keywords, indented lines). `ContentTracker.feed` is cheap enough to run
every step, so an answer that opens a code fence switches class inside it and back after.
"""

from __future__ import annotations

import re

CODE, PROSE = "code", "prose"
CLASSES = (CODE, PROSE)
WINDOW = 240  # characters of recent text the score reads

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


class ContentTracker:
    """Incremental: feed text as it is generated, read `current`."""

    def __init__(self, prompt_text: str = ""):
        self.in_fence = False
        self.tail = ""
        self.current = PROSE
        self.feed(prompt_text)

    def feed(self, text: str) -> str:
        if not text:
            return self.current
        joined = self.tail + text
        self.in_fence ^= (joined.count("```") - self.tail.count("```")) % 2 == 1
        self.tail = joined[-WINDOW:]
        if self.in_fence:
            self.current = CODE
        else:
            after_fence = self.tail.rsplit("```", 1)[-1]
            self.current = classify(after_fence) if after_fence.strip() else PROSE
        return self.current
