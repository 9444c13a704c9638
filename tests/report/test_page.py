"""The report page in a real browser (report/page.py): headless Chromium loads it, every
embedded figure decodes, and a screenshot shows it."""

from __future__ import annotations

import pytest

from lptrain.testing import browser


@pytest.mark.skipif(
    browser.chromium() is None,
    reason="chromium is not installed (./scripts/setup.sh train,dev installs Debian's "
    "package when apt-get is available as root)",
)
def test_the_page_renders_with_every_figure(report, tmp_path):
    page = report[0] / "report.html"  # tests/report/conftest.py
    dom = browser.dump_dom(page)
    # loss, gap, and for the monitored run six heatmaps, its MXFP6 shadow's SQNR and underflow
    # heatmaps, the scale traces and the gradients (six of them folded under "More
    # statistics": collapsed, yet decoded)
    assert 'data-images-loaded="12/12"' in dom and "All 12 figures loaded." in dom
    assert "<summary>More statistics (6 figures)</summary>" in dom
    assert "mxfp6 shadow SQNR (dB) heatmap" in dom
    shot = browser.screenshot(page, tmp_path / "page.png")
    from PIL import Image  # matplotlib's own dependency

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colours = img.resize((120, 240)).getcolors(maxcolors=120 * 240)
    assert len(colours) > 50  # tables and plots, not a blank or error page
