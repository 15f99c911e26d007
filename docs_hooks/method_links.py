"""MkDocs hook: a method name in the first column of a table links to the method's page.

Tables written by hand link their method names in the Markdown; this hook covers the tables a
page includes from elsewhere (``benchmarks/README.md``'s QM9 table, shown in ``docs/qm9.md``),
which are written for GitHub and cannot hold links that also work in the site. It runs on the
HTML of each page (after ``pymdownx.snippets`` has inserted the included text): a ``<td>`` that
opens a row and holds only a registered method name (``mgda-ub`` or ``<code>mgda-ub</code>``)
becomes a link to that method's page. The pages come from the identity line every method page
starts with (``method="mgda"``, ``method="mgda-ub"`` · class ...), so nothing is imported.

Example:
    >>> pages = {"gls": "methods/gls.md"}
    >>> link_method_cells("<tr>\\n<td>gls</td><td>1</td></tr>", pages, lambda f: "methods/gls/")
    '<tr>\\n<td><a href="methods/gls/">gls</a></td><td>1</td></tr>'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the first paragraph of a method page that names its registry names
_IDENTITY = re.compile(r"^`method=\"[\w-]+\"`.*?(?=\n\n|\Z)", re.S | re.M)
_NAME = re.compile(r'`method="([\w-]+)"`')
_FIRST_CELL = re.compile(r"(<tr>\s*<td[^>]*>)(<code>)?([a-z][\w-]*)(</code>)?(</td>)")


def method_pages(docs_dir: Path) -> dict[str, str]:
    """``{registry name: "methods/<page>.md"}`` from the identity line of each method page."""
    pages: dict[str, str] = {}
    for path in sorted((docs_dir / "methods").glob("*.md")):
        identity = _IDENTITY.search(path.read_text(encoding="utf-8"))
        for name in _NAME.findall(identity.group(0)) if identity else ():
            pages[name] = f"methods/{path.name}"
    return pages


def link_method_cells(html: str, pages: dict[str, str], href: Callable[[str], str]) -> str:
    """Wrap each row-opening cell that holds only a method name in a link to ``href(page)``."""

    def link(match: re.Match[str]) -> str:
        opening, code, name, code_end, closing = match.groups()
        if name not in pages or bool(code) != bool(code_end):
            return match.group(0)
        inner = f"{code or ''}{name}{code_end or ''}"
        return f'{opening}<a href="{href(pages[name])}">{inner}</a>{closing}'

    return _FIRST_CELL.sub(link, html)


def on_page_content(html: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    from mkdocs.utils import get_relative_url

    pages = method_pages(Path(config["docs_dir"]))
    own = page.file.src_uri

    def href(src: str) -> str:
        target = files.get_file_from_path(src)
        return get_relative_url(target.url, page.url) if target is not None else src

    return link_method_cells(html, {n: p for n, p in pages.items() if p != own}, href)
