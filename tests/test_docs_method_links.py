"""The docs hook that links method names in the first column of tables to the method pages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import gradbalance.methods as gm

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("method_links", ROOT / "docs_hooks/method_links.py")
assert _spec is not None and _spec.loader is not None
method_links = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("method_links", method_links)
_spec.loader.exec_module(method_links)


def test_every_registered_method_has_a_page_from_the_identity_lines():
    pages = method_links.method_pages(ROOT / "docs")
    assert set(pages) == set(gm.available())
    assert pages["mgda-ub"] == pages["mgda"] == "methods/mgda.md"
    assert pages["equal"] == pages["fixed"] == "methods/static.md"
    assert all((ROOT / "docs" / p).is_file() for p in pages.values())


PAGES = {"gls": "methods/gls.md", "mgda-ub": "methods/mgda.md"}


def _href(src: str) -> str:
    return "../" + src.removesuffix(".md") + "/"


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<tr>\n<td>gls</td>", '<tr>\n<td><a href="../methods/gls/">gls</a></td>'),
        (
            '<tr><td align="left"><code>mgda-ub</code></td>',
            '<tr><td align="left"><a href="../methods/mgda/"><code>mgda-ub</code></a></td>',
        ),
    ],
)
def test_a_first_cell_naming_a_method_is_linked(html, expected):
    assert method_links.link_method_cells(html, PAGES, _href) == expected


@pytest.mark.parametrize(
    "html",
    [
        "<tr><td>stl</td><td>gls</td></tr>",  # not a method; gls is not in the first column
        '<tr><td><a href="x/">gls</a></td></tr>',  # already linked
        "<tr><td><code>gls</td></tr>",  # unbalanced code
        "<p>gls</p><td>gls</td>",  # not a row's first cell
        "<tr><td>gls (SI)</td></tr>",  # more than the name
    ],
)
def test_other_cells_are_left_alone(html):
    assert method_links.link_method_cells(html, PAGES, _href) == html


def test_the_hook_links_relative_to_the_page_and_not_to_itself():
    pytest.importorskip("mkdocs")
    urls = {"methods/gls.md": "methods/gls/", "methods/mgda.md": "methods/mgda/"}
    files = SimpleNamespace(
        get_file_from_path=lambda src: SimpleNamespace(url=urls[src]) if src in urls else None
    )
    config = {"docs_dir": str(ROOT / "docs")}
    html = "<tr><td>gls</td></tr><tr><td>mgda-ub</td></tr>"
    qm9 = SimpleNamespace(url="qm9/", file=SimpleNamespace(src_uri="qm9.md"))
    out = method_links.on_page_content(html, page=qm9, config=config, files=files)
    assert out == (
        '<tr><td><a href="../methods/gls/">gls</a></td></tr>'
        '<tr><td><a href="../methods/mgda/">mgda-ub</a></td></tr>'
    )
    mgda = SimpleNamespace(url="methods/mgda/", file=SimpleNamespace(src_uri="methods/mgda.md"))
    out = method_links.on_page_content(html, page=mgda, config=config, files=files)
    assert out == '<tr><td><a href="../gls/">gls</a></td></tr><tr><td>mgda-ub</td></tr>'
