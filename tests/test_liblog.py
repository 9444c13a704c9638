"""Library output to the run's log (liblog.py); end to end, DeepSpeed's overflow warning is
checked by test_trainer.py::test_nonfinite_step_is_skipped_and_counted."""

from __future__ import annotations

import logging
import sys

from lptrain import liblog


def test_library_output_lands_in_the_log_not_on_stdout(tmp_path, capsys):
    ds = logging.getLogger("DeepSpeed")
    own = logging.StreamHandler(sys.stdout)  # what DeepSpeed installs at import
    ds.addHandler(own)
    log = liblog.LibraryLog()
    with log.active():
        ds.warning("OVERFLOW! Skipping step.")  # before the run dir is known: held
        print("DeepSpeed op built successfully")
        with liblog.library_output():
            print("printed inside initialize")
        logging.getLogger("datasets.builder").warning("a datasets warning")
        log.attach(tmp_path / "logs" / "rank0.log")
        print("summary", file=log.stdout)
        ds.warning("after attach")
    assert capsys.readouterr().out == "summary\n"
    text = (tmp_path / "logs" / "rank0.log").read_text()
    for line in ("OVERFLOW! Skipping step.", "DeepSpeed op built successfully",
                 "printed inside initialize", "a datasets warning", "after attach"):  # fmt: skip
        assert line in text
    assert ds.handlers == [] and ds.propagate  # handed back to Python's default handling
    with liblog.library_output():  # outside a run: stderr, never stdout
        print("to stderr")
    assert capsys.readouterr().err == "to stderr\n"
