"""The docs hook that bundles MathJax and refuses pages that load resources from the network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("offline_math", ROOT / "docs_hooks/offline_math.py")
if _spec is None or _spec.loader is None or importlib.util.find_spec("mkdocs") is None:
    pytest.skip("the docs extra is not installed", allow_module_level=True)
offline_math = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_math)


@pytest.mark.parametrize(
    "html",
    [
        '<script src="https://unpkg.com/mathjax@3/es5/tex-mml-chtml.js"></script>',
        '<script defer src="//cdn.example.org/x.js"></script>',
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">',
        "<style>@font-face { src: url('https://fonts.gstatic.com/a.woff2') }</style>",
    ],
)
def test_remote_scripts_stylesheets_and_fonts_are_found(html):
    assert offline_math.remote_resources(html)


@pytest.mark.parametrize(
    "html",
    [
        '<script src="../../assets/mathjax/es5/tex-mml-chtml.js"></script>',
        '<link rel="stylesheet" href="assets/stylesheets/main.css">',
        '<link rel="canonical" href="https://example.org/methods/mgda/">',
        '<a href="https://arxiv.org/abs/1810.04650">the paper</a>',
    ],
)
def test_local_resources_and_plain_links_pass(html):
    assert offline_math.remote_resources(html) == []


def test_the_mathjax_build_is_found_in_the_docs_extra():
    if importlib.util.find_spec("mathjax") is None:
        pytest.skip("django-static-mathjax (docs extra) is not installed")
    es5 = offline_math.mathjax_source()
    assert (es5 / "tex-mml-chtml.js").stat().st_size > 100_000
    assert any((es5 / "output" / "chtml" / "fonts").rglob("*.woff"))


def test_mkdocs_serves_mathjax_from_the_bundled_copy():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"{offline_math.MATHJAX_DIR}/es5/tex-mml-chtml.js" in config
    assert "docs_hooks/offline_math.py" in config
    assert "font: false" in config
