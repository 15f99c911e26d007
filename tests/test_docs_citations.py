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


#: the headings every method page has, in this order; a page may add sections of its own between
#: "Formula" and "Deviations from the paper" (a solver, cost, state, scale behaviour), and the
#: last four close every page in this order
TEMPLATE = (
    "Formula",
    "When to use it",
    "Usage",
    "Deviations from the paper",
    "Tests",
    "Cite",
    "API",
)
IDENTITY = re.compile(r"^`method=\"[\w-]+\"`.*?(?=\n\n)", re.S | re.M)


def _method_pages() -> dict[str, str]:
    return {name: text for name, text in _pages().items() if name != "index.md"}


@pytest.mark.parametrize("page", sorted(_method_pages()))
def test_method_page_follows_the_template(page):
    """Title, paper and links, the identity line, then the template's sections in its order."""
    text = _method_pages()[page]
    heads = re.findall(r"^## (.+)$", text, re.M)
    assert [h for h in heads if h in TEMPLATE] == list(TEMPLATE), (page, heads)
    assert heads[0] == "Formula" and heads[-4:] == list(TEMPLATE[-4:]), (page, heads)
    assert heads.index("When to use it") < heads.index("Usage"), (page, heads)
    assert re.match(r"# \S", text), f"{page}: no title"
    assert text.count("**Paper.**") == text.count("**Links.**") <= 1, page
    identity = IDENTITY.search(text)
    assert identity, f'{page}: no identity line (`method="name"` · class ... · kind · reads ...)'
    assert identity.start() < text.index("\n## "), (
        f"{page}: the identity line comes before ## Formula"
    )
    if "**Paper.**" in text:
        assert text.index("**Paper.**") < text.index("**Links.**") < identity.start(), page
    for block in BIBTEX_BLOCK.findall(text):
        check_bibtex(block)
    # the identity line names exactly the registered methods whose classes the page documents
    documented = {cls for cls, name in _page_of_class().items() if name == page}
    registered = {n for n in gm.available() if gm.get_class(n) in documented}
    assert set(re.findall(r'`method="([\w-]+)"`', identity.group(0))) == registered, page
    tests = re.search(r"^## Tests\n\n(.*?)^## ", text, re.S | re.M)
    assert tests is not None
    for path in re.findall(r"`(tests/[\w/]+\.py)`", tests.group(1)) or [None]:
        assert path is not None, f"{page}: the Tests section names no test file"
        assert (ROOT / path).is_file(), (page, path)


def test_every_registered_method_has_a_page():
    by_class = _page_of_class()
    missing = [n for n in gm.available() if gm.get_class(n) not in by_class]
    assert not missing, f"no page in docs/methods documents {missing}"


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\(.*?\)", "", text).lower())


def _method_of_cell() -> dict[str, str]:
    """Normalised registry and class names -> the method page (relative to docs/)."""
    out = {}
    for name in gm.available():
        page = _page_of_class().get(gm.get_class(name))
        if page is not None:
            out[_norm(name)] = out[_norm(gm.get_class(name).__name__)] = f"methods/{page}"
    return out


def _table_first_cells(text: str) -> list[str]:
    cells, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("|") and not re.match(r"^\|[\s:|-]+\|$", line):
            cells.append(line.split("|")[1].strip())
    return cells


DOC_TABLES = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.name != "changelog.md"
)


@pytest.mark.parametrize("source", [*DOC_TABLES, "README.md"])
def test_method_names_in_tables_link_to_their_pages(source):
    """A table row that starts with a method's name links that name to the method's page."""
    path = ROOT / source
    pages = _method_of_cell()
    bad = []
    for cell in _table_first_cells(path.read_text(encoding="utf-8")):
        link = re.fullmatch(r"(.*?)\[(.+?)\]\(([^)#]+)(?:#[^)]*)?\)(.*)", cell)
        label = link.group(2) if link else cell
        page = pages.get(_norm(label.replace("`", "")))
        if page is None:
            continue
        if link is None:
            bad.append(f"{cell!r} is not linked (to {page})")
            continue
        target = (path.parent / link.group(3)).resolve()
        if target != (ROOT / "docs" / page).resolve():
            bad.append(f"{cell!r} links {link.group(3)}, not {page}")
    assert not bad, f"{source}: " + "; ".join(bad)


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
