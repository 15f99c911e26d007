"""MkDocs hooks: the site renders formulas offline, and loads nothing from the network.

* MathJax 3 (the ``es5`` build: ``tex-mml-chtml.js`` and its web fonts) is copied from the
  ``django-static-mathjax`` package (a pure data wheel, no dependencies; in the ``docs`` extra)
  into ``site/assets/mathjax/``, where ``mkdocs.yml`` points ``extra_javascript``.
* After the build every page is scanned: a ``<script src>``, a stylesheet or a font that would be
  fetched from another host fails the build (raw TeX on a machine without network was the
  symptom).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

#: where the site serves MathJax from (``extra_javascript`` in mkdocs.yml points inside it)
MATHJAX_DIR = "assets/mathjax"

_REMOTE = re.compile(
    r"""<script[^>]+src=["'](?P<script>(?:https?:)?//[^"']+)["']"""
    r"""|<link[^>]+href=["'](?P<link>(?:https?:)?//[^"']+)["'][^>]*>"""
    r"""|url\(\s*["']?(?P<url>(?:https?:)?//[^"')]+)""",
    re.IGNORECASE,
)
#: ``<link>`` relations that only name a URL and fetch nothing the page needs
_HARMLESS_LINKS = re.compile(r"""rel=["'](?:canonical|alternate|author|license)["']""", re.I)


def mathjax_source() -> Path:
    """The ``es5`` folder of the MathJax 3 build shipped by ``django-static-mathjax``."""
    spec = importlib.util.find_spec("mathjax")  # locates the data package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(
            "the docs need MathJax from the 'django-static-mathjax' package: "
            'pip install -e ".[docs]"'
        )
    es5 = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (es5 / "tex-mml-chtml.js").is_file():
        raise PluginError(f"no MathJax build in {es5}; reinstall django-static-mathjax")
    return es5


def remote_resources(html: str) -> list[str]:
    """The URLs of scripts, stylesheets and fonts that ``html`` would fetch from another host."""
    found = []
    for match in _REMOTE.finditer(html):
        if match.group("link") and _HARMLESS_LINKS.search(match.group(0)):
            continue
        found.append(match.group("script") or match.group("link") or match.group("url"))
    return found


def on_post_build(config: Any, **kwargs: Any) -> None:
    site = Path(config["site_dir"])
    es5 = mathjax_source()
    target = site / MATHJAX_DIR / "es5"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-mml-chtml.js", target / "tex-mml-chtml.js")
    shutil.copytree(es5 / "output", target / "output", dirs_exist_ok=True)
    licence = es5.parent / "LICENSE"
    if licence.is_file():
        shutil.copy2(licence, site / MATHJAX_DIR / "LICENSE")
    remote = {
        str(path.relative_to(site)): urls
        for path in site.rglob("*")
        if path.suffix in (".html", ".css")
        for urls in [remote_resources(path.read_text(encoding="utf-8", errors="replace"))]
        if urls
    }
    if remote:
        first = next(iter(remote.items()))
        raise PluginError(
            f"{len(remote)} page(s) of the site load resources from the network, e.g. "
            f"{first[0]}: {first[1][:3]}; bundle them (the docs must work offline)"
        )
