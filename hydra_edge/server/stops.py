"""Stop sequences on streamed text: OpenAI's `stop` ends the answer before the first stop string,
and a client never sees any part of it, so text that could still become one is held back."""

from __future__ import annotations


class StopScanner:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string was reached)."""
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            text, self.held = self.held[: min(found)], ""
            return text, True
        keep = self._longest_stop_prefix_at_end()
        text, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return text, False

    def flush(self) -> str:
        """What is still held when the answer ends without a stop string."""
        text, self.held = self.held, ""
        return text

    def _longest_stop_prefix_at_end(self) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.held)), best, -1):
                if self.held.endswith(stop[:n]):
                    best = n
                    break
        return best
