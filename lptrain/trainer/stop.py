"""SIGTERM / SIGINT: stop cleanly, never lose the last checkpoint.

- During start-up (before the first training step) a signal stops at once: nothing has been
  trained since the last checkpoint, so there is nothing to save. Short critical sections
  (moving an earlier run aside, writing the run files) finish first.
- In the loop, a signal asks for a stop at the end of the current step: a checkpoint is saved
  and the process exits 0.
- The same signal arriving again within `REPEAT_S` is the same request, not a second one:
  schedulers signal the whole process group and torchrun forwards the signal it got itself, so
  each rank of a torchrun job usually receives SIGTERM twice within milliseconds.
- A later second signal means "stop now": the process exits without saving (a save under way is
  abandoned; saves are atomic, so the last complete checkpoint is intact).

`Interrupted` derives from BaseException so that library code catching `Exception` does not
swallow it; the command line turns it into one line and an exit status.
"""

from __future__ import annotations

import contextlib
import signal
import time

REPEAT_S = 2.0  # generous: on a loaded node torchrun may take a while to forward
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    def __init__(self, signum: int, when: str):
        super().__init__(f"{signal.Signals(signum).name} {when}")
        self.signum = signum
        self.when = when  # "during start-up" | "again"


class Signals:
    """Install on construction; `loop()` switches from start-up to in-loop behaviour."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.first: tuple[int, float] | None = None  # (signum, time) of the first signal
        self.in_loop = False
        self.deferring = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    @property
    def requested(self) -> bool:
        return self.first is not None

    def loop(self) -> None:
        self.in_loop = True

    @contextlib.contextmanager
    def deferred(self):
        """Start-up work that must not be cut in half: a signal takes effect at the end."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        self._stop_if_starting()

    def _stop_if_starting(self) -> None:
        if self.first is not None and not self.in_loop and not self.deferring:
            raise Interrupted(self.first[0], "during start-up")

    def _handle(self, signum, frame):
        now = self.clock()
        if self.first is None:
            self.first = (signum, now)
            self._stop_if_starting()
            return
        if now - self.first[1] < REPEAT_S:
            return  # the same request delivered twice (process group + torchrun)
        raise Interrupted(signum, "again")

    def close(self) -> None:
        """Put back the handlers that were there before (the CLI also runs in-process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
