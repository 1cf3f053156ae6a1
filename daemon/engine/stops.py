"""Where an answer ends: EOS, stop strings over streamed text (emit what cannot be the start of a
stop, cut at the first one), max_tokens."""

from __future__ import annotations

from daemon.engine.records import Delta, Step


class StopText:
    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.hit: str | None = None  # the stop string that ended the output

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string ended the output)."""
        buffer = self.pending + text
        hits = [(i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:
            at, self.hit = min(hits, key=lambda h: h[0])
            self.pending = ""
            return buffer[:at], True
        held = max((self._overlap(buffer, s) for s in self.stops), default=0)
        self.pending = buffer[len(buffer) - held :]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        """Text held back as a possible stop prefix, released at the end of generation."""
        text, self.pending = self.pending, ""
        return text

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
        for n in range(min(len(text), len(stop) - 1), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0


class Output:
    """One answer's text: each step's tokens up to EOS, a stop string or max_tokens."""

    def __init__(self, tokenizer, stops: tuple[str, ...], max_tokens: int):
        self.detokenizer = tokenizer.detokenizer
        self.eos = set(tokenizer.eos_token_ids)
        self.stops = StopText(stops)
        self.max_tokens = max_tokens
        self.token_ids: list[int] = []
        self.finish: str | None = None  # "stop" (EOS or a stop string) | "length", once it ends

    def take(self, step: Step, last: bool = False) -> Delta:
        """The tokens of `step` the answer keeps and the text they add. `last`: the answer ends with
        them ("length" unless EOS or a stop string ends it first)."""
        kept, text, stopped = [], [], False
        for token in step.tokens:
            if token in self.eos:
                self.finish = "stop"
                break
            kept.append(token)
            self.detokenizer.add_token(token)
            piece, stopped = self.stops.feed(self.detokenizer.last_segment)
            text.append(piece)
            if stopped:
                self.finish = "stop"
                break
            if len(self.token_ids) + len(kept) >= self.max_tokens:
                self.finish = "length"
                break
        self.token_ids.extend(kept)
        self.finish = self.finish or ("length" if last else None)
        if self.finish and not stopped and (final := self._final_text()):
            if text:  # one piece per kept token: the last one's takes what was held back
                text[-1] += final
            else:
                text.append(final)
        return Delta(tuple(kept), "".join(text), step.logprobs[: len(kept)], tuple(text[: len(kept)]), step.drafted,
                     step.accepted, step.lookup)

    def _final_text(self) -> str:
        """Text still held by the detokenizer (partial UTF-8) and by the stop matcher, at the end."""
        self.detokenizer.finalize()
        piece, stopped = self.stops.feed(self.detokenizer.last_segment)
        return piece if stopped else piece + self.stops.flush()
