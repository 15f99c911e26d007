"""The built site, seen by a browser: every page loads, renders its formulas offline, links right.

The site is built strict into a temporary folder, served on 127.0.0.1 and every page is opened in
headless Chromium (``docs_hooks/browser_check.py`` does the work; as a script it writes a
screenshot of every page to a folder). Skipped, with the reason, where Chromium or the ``docs``
extra is missing. One browser for all pages: 35 to 60 s on two busy shared cores, the build
included (about 10 s of CPU).
"""

from __future__ import annotations

import importlib.util
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "browser_check", ROOT / "docs_hooks/browser_check.py"
)
assert _spec is not None and _spec.loader is not None
bc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("browser_check", bc)  # its dataclass looks its module up there
_spec.loader.exec_module(bc)


def _write_png(path: Path, rows: list[bytes], width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + row for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


# -- the checks themselves, on hand-made pages (no browser, no build) -------------------------

_PAGE = (
    "<html><head><title>MGDA - gradbalance</title></head><body>"
    '<article class="md-content__inner">{}</article></body></html>'
)


def test_rendered_math_passes():
    html = _PAGE.format(
        '<p>with <span class="arithmatex"><mjx-container class="MathJax"><mjx-math>'
        "<mjx-mi>x</mjx-mi></mjx-math></mjx-container></span> and <code>\\frac{a}{b}</code></p>"
    )
    assert bc.rendered_page_problems("p", html) == []
    assert bc.scan(html).math_total == bc.scan(html).math_rendered == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<span class="arithmatex">\\(x\\)</span>', "not rendered"),
        ('<div class="arithmatex">\\[\n\\frac{a}{b}\n\\]</div>', "not rendered"),
        ("<p>the loss $L_i$ of task i</p>", "raw TeX"),
        ("<p>$$ a + b $$</p>", "raw TeX"),
        ("<p>weights \\alpha_i</p>", "raw TeX"),
        (
            '<span class="arithmatex"><mjx-container><mjx-merror>x</mjx-merror></mjx-container>'
            "</span>",
            "MathJax error",
        ),
    ],
)
def test_unrendered_math_and_raw_tex_are_found(body, expected):
    problems = bc.rendered_page_problems("p", _PAGE.format(body))
    assert any(expected in p for p in problems), problems


def test_a_404_or_an_empty_page_is_found():
    assert bc.rendered_page_problems("p", "<html><title>404 - Not found</title></html>")
    assert bc.rendered_page_problems("p", "<html><title>Error response</title><p>x</p></html>")


def test_broken_links_and_anchors_are_found(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"png")
    (tmp_path / "index.html").write_text(
        '<a href="a/">ok</a><a href="a/#here">ok</a><a href="#top" id="top">ok</a>'
        '<a href="https://arxiv.org/abs/1810.04650">external</a><img src="img/x.png">'
        '<a href="b/">no page</a><a href="a/#nowhere">no anchor</a><img src="img/y.png">'
    )
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">H</h2><a href="../#top">ok</a>')
    problems = bc.link_problems(tmp_path)
    assert len(problems) == 3, problems
    assert all(p.startswith("index.html:") for p in problems), problems
    assert {"'b/'", "'a/#nowhere'", "'img/y.png'"} == {
        p.split("=")[1].split(" ")[0].rstrip(":") for p in problems
    }


def test_the_screenshot_check_rejects_a_blank_or_misshapen_image(tmp_path):
    flat = _write_png(tmp_path / "flat.png", [b"\xff" * 12] * 4, 4, 4)
    busy = _write_png(
        tmp_path / "busy.png", [bytes(range(i, i + 12)) for i in (0, 40, 80, 120)], 4, 4
    )
    assert bc.png_problems(flat, (4, 4))
    assert bc.png_problems(busy, (4, 4)) == []
    assert bc.png_problems(busy, (8, 4))
    (tmp_path / "text.png").write_text("not a png")
    assert bc.png_problems(tmp_path / "text.png", (4, 4))


# -- the real site in headless Chromium ---------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    needed = {
        "mkdocs": "mkdocs",
        "material": "mkdocs-material",
        "mkdocstrings": "mkdocstrings",
        "mathjax": "django-static-mathjax",
    }
    for module, extra in needed.items():
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the docs extra is not installed ({extra} is missing)")
    site = tmp_path_factory.mktemp("site")
    bc.build_site(site)
    return site


@pytest.fixture(scope="module")
def browsed(built_site, tmp_path_factory):
    """Every page's rendered DOM, screenshots of a few pages, and what the server lacked."""
    chromium = bc.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; or set CHROMIUM=/path)")
    pages = [p for p in bc.site_pages(built_site) if p != "404.html"]
    shots = tmp_path_factory.mktemp("screenshots")
    with bc.serve(built_site) as (url, missing):
        doms = bc.browse(chromium, url, pages, shots, bc.REPRESENTATIVE)
    pngs = [shots / bc.screenshot_name(page) for page in bc.REPRESENTATIVE]
    return doms, pngs, list(missing)


def test_every_page_loads_and_renders_its_formulas(browsed):
    doms, _, _ = browsed
    assert len(doms) >= 40, sorted(doms)
    problems = [p for page, dom in doms.items() for p in bc.rendered_page_problems(page, dom)]
    assert not problems, "\n".join(problems)


def test_method_pages_have_formulas(browsed):
    """A guard on the guard: the formulas the checks look at are really there."""
    doms, _, _ = browsed
    for page in (ROOT / "docs" / "methods").glob("*.md"):
        if page.stem != "index":
            scanned = bc.scan(doms[f"methods/{page.stem}/"])
            assert scanned.math_total > 0, page.name
            assert scanned.math_rendered == scanned.math_total, page.name


def test_the_browser_found_every_file_it_asked_for(browsed):
    """MathJax's fonts, the theme's scripts, images: nothing the pages load is missing."""
    _, _, missing = browsed
    assert not missing, missing


def test_screenshots_show_the_pages(browsed):
    _, pngs, _ = browsed
    for png in pngs:
        assert not bc.png_problems(png), png


def test_internal_links_and_images_resolve(built_site):
    problems = bc.link_problems(built_site)
    assert not problems, "\n".join(problems)


def test_method_names_in_built_tables_are_links(built_site):
    """Tables a page includes from elsewhere (the QM9 benchmark table) link their method names
    too: ``docs_hooks/method_links.py`` does it when mkdocs.yml registers it."""
    if "docs_hooks/method_links.py" not in (ROOT / "mkdocs.yml").read_text(encoding="utf-8"):
        pytest.skip("mkdocs.yml does not register docs_hooks/method_links.py (the lead adds it)")
    import gradbalance.methods as gm

    names = "|".join(re.escape(n) for n in gm.available())
    unlinked = re.compile(rf"<tr>\s*<td[^>]*>(?:<code>)?({names})(?:</code>)?</td>")
    found = [
        f"{path.relative_to(built_site)}: {m.group(1)}"
        for path in sorted(built_site.rglob("*.html"))
        for m in unlinked.finditer(path.read_text(encoding="utf-8"))
    ]
    assert not found, found
