"""What a run shows on the console: Flower's own messages from warning level only (all of them with `verbose=true`;
Hydra's job log keeps every log record either way) and one progress line per run: rounds done, elapsed time, ETA and the
last evaluation's benign accuracy per model. On a terminal the line is rewritten in place (a message of Flower's
erases it first, and the next round draws it again below the message); elsewhere (CI, Hydra
sweep logs, `flwr run`'s stream) and with `verbose=true` it is printed as a plain line after the first round, at
most every PLAIN_EVERY seconds, and after the last round."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from flwr.common.logger import FLOWER_LOGGER, ConsoleHandler, update_console_handler

PLAIN_EVERY = 30.0  # seconds between two plain progress lines


def show_flower(verbose: bool) -> int:
    """Set the level of Flower's console handler (which this app's log lines go through too): INFO with `verbose`,
    else WARNING; return the level it had, to restore with `update_console_handler(level=...)`."""
    before = min((h.level for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)), default=logging.INFO)
    update_console_handler(level=min(before, logging.INFO) if verbose else max(before, logging.WARNING))
    return before


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


def progress_text(done: int, total: int, elapsed: float, eta: float | None, final: dict[str, Any]) -> str:
    """One progress line, e.g. `round 40/150  0:12 elapsed  ETA 0:33  global 0.812  personal 0.905`."""
    accuracies = "".join(
        f"  {kind} {m['benign_acc']:.3f}" for kind, m in final.items() if m and m.get("benign_acc") is not None
    )
    return f"round {done}/{total}  {_clock(elapsed)} elapsed  ETA {'-' if eta is None else _clock(eta)}" + accuracies


class Progress:
    """The progress line of one run of rounds `first`..`total` (a resumed run starts after its checkpoint's round;
    the ETA extrapolates the mean time of this process's rounds)."""

    def __init__(self, first: int, total: int, in_place: bool, stream: TextIO = sys.stdout) -> None:
        self.first, self.total, self.in_place, self.stream = first, total, in_place, stream
        self.start = time.perf_counter()
        self.printed: float | None = None  # when the last plain line was printed
        self.open = False  # an in-place line is on the terminal, not yet ended
        self._consoles = [h for h in FLOWER_LOGGER.handlers if isinstance(h, ConsoleHandler)] if in_place else []
        for handler in self._consoles:  # a message clears the line first; the next round draws it again
            handler.addFilter(self._clear_for_message)

    def _clear_for_message(self, record: logging.LogRecord) -> bool:
        """Filter of Flower's console handlers (it sees only the records they print): erase an open in-place line so
        that the message starts at the left margin instead of at its end."""
        if self.open:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.open = False
        return True

    def update(self, done: int, final: dict[str, Any]) -> None:
        """Round `done` is over; `final` is the last evaluation's summary per model kind."""
        now = time.perf_counter()
        elapsed = now - self.start
        rounds = done - self.first + 1
        eta = elapsed / rounds * (self.total - done) if rounds > 0 else None
        text = progress_text(done, self.total, elapsed, eta, final)
        if self.in_place:
            self.stream.write(f"\r{text}\x1b[K")
            self.open = True
        elif self.printed is None or now - self.printed >= PLAIN_EVERY or done == self.total:
            self.stream.write(text + "\n")
            self.printed = now
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line (the run is over, or failed: what follows starts on a line of its own)."""
        for handler in self._consoles:
            handler.removeFilter(self._clear_for_message)
        self._consoles = []
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
