"""A dependency-free progress bar on stderr."""

import sys
import time


class ProgressBar:
    """``with ProgressBar(total, "label") as bar: ... bar.advance("step")``."""

    def __init__(self, total: int, label: str, width: int = 30, stream=sys.stderr):
        self.total, self.label, self.width, self.stream = max(total, 1), label, width, stream
        self.done = 0
        self.started = time.perf_counter()

    def __enter__(self):
        self._draw("")
        return self

    def advance(self, step: str = "") -> None:
        self.done += 1
        self._draw(step)

    def _draw(self, step: str) -> None:
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{self.done}/{self.total} {elapsed:6.1f}s {step[:40]:<40}")
        self.stream.flush()

    def __exit__(self, *exc):
        self.stream.write("\n")
        self.stream.flush()
