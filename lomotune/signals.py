"""SIGINT/SIGTERM during a run: the first stops it after the step with a checkpoint,
a second at once.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, save, exit. Second: abort at once (the
    last complete checkpoint is untouched: saves are atomic)."""

    def __init__(self, quiet: bool = False):  # quiet: ranks other than 0 say nothing
        self.quiet = quiet
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not the main thread (a library caller's worker): leave signals alone.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # second signal: stop now
        self.requested = True
        self.signal_number = signum
        if not self.quiet:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (again to abort now)",
                flush=True,
            )
