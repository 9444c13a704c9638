"""mkdocs hooks: pages whose text lives elsewhere, so that it is written once.

- docs/index.md is the README (the repository's front page), its links rewritten for the site:
  `docs/x.md` -> `x.md`; a link to a file outside docs/ becomes its path in code.
- docs/config.md's reference is generated from the config dataclasses by
  lptrain.config.reference.
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent
README = DOCS.parent / "README.md"
MARKERS = {
    "<!-- readme -->": lambda: _site_links(README.read_text(encoding="utf-8")),
    "<!-- config-reference -->": lambda: _config_reference(),
}


def _site_links(text: str) -> str:
    def link(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        if target.startswith(("http://", "https://", "#")):
            return m.group(0)
        if target.startswith("docs/") and (DOCS / target[5:].split("#")[0]).is_file():
            return f"[{label}]({target[5:]})"
        return f"`{target}`"  # a repository file outside docs/: its path, in code

    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", link, text)


def _config_reference() -> str:
    from lptrain.config.reference import render

    return render()


def on_page_markdown(markdown, page, config, files):
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
