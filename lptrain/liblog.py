"""Library output goes to the run's log file, not to the terminal.

DeepSpeed logs through a handler bound to stdout ("OVERFLOW! Skipping step", checkpoint
notices) and prints op-build notices; `datasets` and `torch.distributed` log warnings. During
`lptrain train` all of it lands in `RUN/logs/rank{r}.log`: the loggers below are taken over and
anything printed to stdout is captured line by line. stdout keeps only lptrain's run summary
(printed to the real stdout), stderr lptrain's own messages, progress and errors. Records from
before the run directory is known are held in memory and written when it is (a run refused
before that leaves no log; its one-line error says why).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path

LOGGERS = ("DeepSpeed", "torch.distributed", "datasets", "transformers", "lptrain.library")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ACTIVE: "LibraryLog | None" = None  # the log of the `lptrain train` in progress, if any


class _Lines(io.TextIOBase):
    """A text stream that logs each complete line (for captured prints)."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.partial = logger, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        lines = (self.partial + s).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(s)

    def flush(self) -> None:
        pass


class LibraryLog:
    def __init__(self):
        self.held: list[logging.LogRecord] = []
        self.file: logging.Handler | None = None
        self.handler = _Relay(self)
        self.stdout = sys.stdout  # the real one: the run summary goes here
        self.lines = _Lines(logging.getLogger("lptrain.library"))

    def take_over(self) -> None:
        """Route the library loggers here (after `import deepspeed` created its handler)."""
        for name in LOGGERS:
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.addHandler(self.handler)
            lg.propagate = False
            if lg.level == logging.NOTSET:
                lg.setLevel(logging.INFO if name == "lptrain.library" else logging.WARNING)

    def attach(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter(_FORMAT))
        for record in self.held:
            self.file.handle(record)
        self.held.clear()

    @contextlib.contextmanager
    def active(self):
        """Capture stdout into the log for the duration (the CLI wraps `train` in this)."""
        global _ACTIVE
        _ACTIVE, previous = self, _ACTIVE
        self.take_over()
        try:
            with contextlib.redirect_stdout(self.lines):
                yield self
        finally:
            _ACTIVE = previous
            for name in LOGGERS:  # back to Python's default handling (stderr, WARNING and up)
                lg = logging.getLogger(name)
                lg.removeHandler(self.handler)
                lg.propagate = True
            if self.file is not None:
                self.file.close()


class _Relay(logging.Handler):
    def __init__(self, log: LibraryLog):
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if self.log.file is not None:
            self.log.file.handle(record)
        else:
            self.log.held.append(record)


def library_output():
    """Where code that prints (DeepSpeed's op builds) should print: the active run's log, or
    stderr outside `lptrain train` (stdout stays clean either way)."""
    return contextlib.redirect_stdout(_ACTIVE.lines if _ACTIVE is not None else sys.stderr)


def adopt_library_loggers() -> None:
    """Call after importing a library that installs its own handlers (DeepSpeed does)."""
    if _ACTIVE is not None:
        _ACTIVE.take_over()
