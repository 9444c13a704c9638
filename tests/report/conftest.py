"""One `lptrain report` of the two monitored runs per session: the plot tests read its files
and the browser test opens its page (building it renders every figure: seconds)."""

from __future__ import annotations

import pytest

from lptrain.cli import main


@pytest.fixture(scope="session")
def report(monitored_runs, tmp_path_factory):
    """(output directory, [plain run, monitored run])."""
    out = tmp_path_factory.mktemp("report")
    dirs = [str(monitored_runs["plain"]), str(monitored_runs["monitored"])]
    assert main(["report", *dirs, "--out", str(out)]) == 0
    return out, dirs
