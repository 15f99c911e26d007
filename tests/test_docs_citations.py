"""The docs cite: every method with a paper has a page linking it and a BibTeX entry; CITATION.cff.

Pages are mapped to methods through their mkdocstrings blocks (``::: gradbalance.methods.X``):
the page that documents a method's class is that method's page. Text checks only, no docs build.
"""

from __future__ import annotations

import importlib
import re
from functools import cache
from pathlib import Path

import pytest

import gradbalance.methods as gm

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOCS = ROOT / "docs" / "methods"

# what counts as a link to the paper: arXiv, a DOI, or a proceedings / OpenReview page
PAPER_LINK = re.compile(
    r"\]\(https://(?:arxiv\.org/abs/\d{4}\.\d{4,5}"
    r"|doi\.org/10\.\d{4,9}/\S+"
    r"|(?:proceedings\.neurips\.cc|papers\.nips\.cc|proceedings\.mlr\.press"
    r"|openaccess\.thecvf\.com|openreview\.net)/\S+)\)"
)
BIBTEX_BLOCK = re.compile(r"^```bibtex\n(.*?)^```$", re.S | re.M)
API_BLOCK = re.compile(r"^::: *([\w.]+)", re.M)


def _has_paper(cls: type) -> bool:
    paper = " ".join(getattr(cls, "paper", "").split())
    return bool(paper) and "no paper" not in paper.lower()


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@cache
def _pages() -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(METHOD_DOCS.glob("*.md"))}


@cache
def _page_of_class() -> dict[type, str]:
    out: dict[type, str] = {}
    for name, text in _pages().items():
        for dotted in API_BLOCK.findall(text):
            obj = _resolve(dotted)
            if isinstance(obj, type):
                out[obj] = name
    return out


def _cited_methods() -> list[str]:
    return [n for n in gm.available() if _has_paper(gm.get_class(n))]


def _bib_fields(entry: str) -> dict[str, str]:
    """``name = {value}`` / ``name = "value"`` / ``name = 123`` fields of one entry (top level)."""
    fields: dict[str, str] = {}
    body = entry[entry.index(",") + 1 : entry.rindex("}")]
    i = 0
    while True:
        m = re.compile(r"\s*([A-Za-z][\w-]*)\s*=\s*").match(body, i)
        if m is None:
            break
        key, i = m.group(1).lower(), m.end()
        if body[i] == "{":
            depth, j = 0, i
            while True:
                depth += {"{": 1, "}": -1}.get(body[j], 0)
                if depth == 0:
                    break
                j += 1
            value, i = body[i + 1 : j], j + 1
        elif body[i] == '"':
            j = body.index('"', i + 1)
            value, i = body[i + 1 : j], j + 1
        else:
            m2 = re.compile(r"[\w.-]+").match(body, i)
            assert m2 is not None, f"bad value for {key!r}"
            value, i = m2.group(0), m2.end()
        fields[key] = value
        m3 = re.compile(r"\s*,?").match(body, i)
        i = m3.end() if m3 else i
    assert not body[i:].strip(), f"unparsed BibTeX text: {body[i:]!r}"
    return fields


def check_bibtex(entry: str) -> dict[str, str]:
    """Minimal parse of one BibTeX entry; raises AssertionError on what a reader would choke on."""
    entry = entry.strip()
    depth = 0
    for ch in entry:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "a '}' closes nothing"
    assert depth == 0, "unbalanced braces"
    head = re.match(r"@([a-zA-Z]+)\{([\w:.-]+),", entry)
    assert head, "no '@type{key,' header"
    assert head.group(1).lower() in {"inproceedings", "article", "misc", "incollection"}
    assert entry.endswith("}") and entry.count("@") == 1, "one entry per block"
    fields = _bib_fields(entry)
    for key in ("title", "author", "year"):
        assert fields.get(key, "").strip(), f"no {key}"
    assert re.fullmatch(r"\d{4}", fields["year"]), fields["year"]
    return fields


def test_the_bibtex_checker_rejects_broken_entries():
    good = "@article{k1,\n  title = {A {B} c},\n  author = {X, Y},\n  year = {2020}\n}"
    assert check_bibtex(good)["title"] == "A {B} c"
    for bad in (
        good.replace("title = {A {B} c}", "title = {A {B c}"),
        good.replace("@article{k1,", "@article{"),
        good.replace("  year = {2020}\n", ""),
        good.replace("  title = {A {B} c},\n", ""),
    ):
        with pytest.raises(AssertionError):
            check_bibtex(bad)


def test_every_page_documents_importable_objects():
    assert _page_of_class(), "no ::: blocks found under docs/methods"


@pytest.mark.parametrize("name", _cited_methods())
def test_method_page_links_its_paper_and_gives_bibtex(name):
    cls = gm.get_class(name)
    page = _page_of_class().get(cls)
    assert page is not None, f"no page in docs/methods documents {cls.__qualname__} ({name!r})"
    text = _pages()[page]
    paper = re.search(r"^\*\*Paper\.\*\*.*?(?=\n\n)", text, re.S | re.M)
    assert paper, f"{page}: no **Paper.** paragraph"
    links = re.search(r"^\*\*Links\.\*\*(.*)$", text, re.M)
    assert links and PAPER_LINK.search(links.group(1)), f"{page}: no arXiv/DOI/proceedings link"
    blocks = BIBTEX_BLOCK.findall(text)
    assert len(blocks) == 1, f"{page}: expected one ```bibtex block, found {len(blocks)}"
    fields = check_bibtex(blocks[0])
    # the entry's year is the one the class cites
    years = re.findall(r"\b(?:19|20)\d{2}\b", cls.paper)
    assert years and fields["year"] == years[-1], (page, fields["year"], cls.paper)
    # an arXiv id the class cites is the one linked
    for arxiv_id in re.findall(r"arXiv:(\d{4}\.\d{4,5})", cls.paper):
        assert f"arxiv.org/abs/{arxiv_id}" in links.group(1), (page, arxiv_id)


def test_method_pages_share_one_template():
    """Paper, then Links; a Cite section, right before the API section at the end."""
    for page, text in _pages().items():
        if page == "index.md":
            continue
        heads = re.findall(r"^## (.+)$", text, re.M)
        assert heads[-2:] == ["Cite", "API"], (page, heads)
        assert text.count("**Paper.**") == text.count("**Links.**") <= 1, page
        if "**Paper.**" in text:
            assert text.index("**Paper.**") < text.index("**Links.**") < text.index("## ")
        for block in BIBTEX_BLOCK.findall(text):
            check_bibtex(block)


def test_citation_cff():
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    for key in ("cff-version", "message", "title", "authors"):
        assert data.get(key), f"CITATION.cff: no {key}"
    assert str(data["cff-version"]) == "1.2.0"
    assert data["title"] == "gradbalance"
    assert all(
        isinstance(a, dict) and ("name" in a or "family-names" in a) for a in data["authors"]
    )
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version and str(data.get("version")) == version.group(1)
