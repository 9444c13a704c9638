"""Run the `lptrain` command line with faults injected at chosen points (for tests).

    python -m lptrain.testing.faults FAULT[,FAULT...] train RECIPE.yaml [options]

FAULT is one of (N counts training-mode forward calls of the model, from 1):
  kill@N          SIGKILL this process at call N (a crash: no handler, no cleanup)
  term@N          SIGTERM at call N
  term2@N         SIGTERM twice, 50 ms apart, at call N (the process group plus torchrun)
  term@startup    SIGTERM inside `deepspeed.initialize` (start-up, before any step)
  term@save       with term@N: a second SIGTERM, REPEAT_S later, in the save the first asked for
  nan@N           the loss of call N is NaN
"""

from __future__ import annotations

import os
import signal
import sys
import time

from lptrain.checkpoint import store
from lptrain.cli import main as cli_main
from lptrain.distributed import engine
from lptrain.models import decoder
from lptrain.trainer import stop

_TERMED = []  # set once a `term@N` fault has sent its signal


def _at_calls(faults: dict[str, set[int]]) -> None:

    forward, calls = decoder.Decoder.forward, [0]

    def faulty(self, tokens):
        loss = forward(self, tokens)
        if not self.training:
            return loss
        calls[0] += 1
        n = calls[0]
        if n in faults.get("kill", ()):
            os.kill(os.getpid(), signal.SIGKILL)
        if n in faults.get("term", ()):
            _TERMED.append(n)
            os.kill(os.getpid(), signal.SIGTERM)
        if n in faults.get("term2", ()):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        if n in faults.get("nan", ()):
            return loss * float("nan")
        return loss

    decoder.Decoder.forward = faulty


def _term_at_startup() -> None:

    initialize = engine.initialize

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return initialize(*args, **kwargs)

    engine.initialize = interrupted


def _term_again_at_save() -> None:

    save = store.save

    def interrupted(*args, **kwargs):
        if _TERMED:  # the save that the first SIGTERM asked for
            time.sleep(stop.REPEAT_S + 0.1)  # past the window in which a repeat is the same
            os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    store.save = interrupted


def install(spec: str) -> None:
    at_calls: dict[str, set[int]] = {}
    for fault in spec.split(","):
        kind, _, where = fault.partition("@")
        if fault == "term@startup":
            _term_at_startup()
        elif fault == "term@save":
            _term_again_at_save()
        elif kind in ("kill", "term", "term2", "nan") and where.isdigit():
            at_calls.setdefault(kind, set()).add(int(where))
        else:
            raise SystemExit(f"unknown fault {fault!r}")
    if at_calls:
        _at_calls(at_calls)


def main(argv: list[str]) -> int:
    install(argv[0])

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
