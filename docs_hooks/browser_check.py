"""Check the built site in headless Chromium: every page loads, renders its formulas, links right.

The site is built strict into a temporary folder and served on ``127.0.0.1`` (a thread running
``http.server``; every request it cannot answer is reported). Every page is opened in one headless
Chromium, driven over the DevTools protocol on a pipe (:class:`Browser`), and read once MathJax
has typeset it and the fonts have loaded. Its DOM must show:

* the page itself: Material's content area, a title that is not the 404 page's;
* rendered math: every ``arithmatex`` span or div holds an ``mjx-container``, no MathJax error
  (``mjx-merror``) and no raw TeX left in the visible text (``\\(``, ``\\[``, ``$$``, ``\\frac``
  and any other ``\\command`` outside code blocks).

The built HTML is also scanned for internal links: every ``href``/``src`` to a local page, image,
script or stylesheet must name a built file, and every ``#anchor`` an ``id`` of its target page.
Screenshots (1280×2000 PNG) show what a reader sees.

``tests/test_docs_browser.py`` runs this (screenshots of a few pages only). As a script it checks
every page and writes a screenshot of each to the folder given (default
``$TMPDIR/gradbalance-site-screenshots``)::

    python docs_hooks/browser_check.py --out /tmp/shots

Needs the ``docs`` extra and Chromium (Debian: ``apt-get install chromium``; another binary can be
named by the ``CHROMIUM`` environment variable).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import http.server
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent

#: pages a reader meets first, and the heaviest in formulas, tables and API blocks
REPRESENTATIVE = ("", "methods/mgda/", "methods/nash_mtl/", "qm9/", "choosing/", "api/")

#: text that means MathJax did not typeset something (outside code, where TeX is shown on purpose)
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\[A-Za-z]+|\$[^$\s][^$]*\$")

_SKIP_TEXT = {"script", "style", "code", "pre", "noscript", "textarea", "mjx-container", "svg"}
_VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary: ``$CHROMIUM``, else the first one on ``PATH``."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_site(dest: Path) -> None:
    """``mkdocs build --strict`` of this repository into ``dest``; raises with mkdocs' output."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(dest)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}")


class _Handler(http.server.SimpleHTTPRequestHandler):
    missing: list[str]  # set per server by serve(): what the browser asked for and did not get

    def log_message(self, format: str, *args: object) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.missing.append(f"{code} {self.path}")
        super().send_error(code, message, explain)


@contextlib.contextmanager
def serve(site: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``site`` on a free port of 127.0.0.1 in a thread.

    Yields the base URL and a list that collects every request answered with an error (a font,
    script or image the browser asked for and the site lacks).
    """
    missing: list[str] = []
    handler = type("Handler", (_Handler,), {"missing": missing})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(site))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", missing
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def site_pages(site: Path) -> list[str]:
    """Every built page as a URL path relative to the site root (``""``, ``"methods/mgda/"``)."""
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site).as_posix()
        pages.append(rel[: -len("index.html")] if rel.endswith("index.html") else rel)
    return pages


#: run in each page once it has loaded: wait for MathJax's first typesetting and the web fonts
_SETTLED_DOM = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;
  return document.documentElement.outerHTML;
})()"""


#: run by the child before Chromium: its pipe ends to fds 3 and 4, then exec Chromium (a shell
#: cannot: dash takes one-digit fds only; ``preexec_fn`` is unsafe beside the server's thread)
_AT_FDS_3_4 = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

    One browser and one tab serve every page (a Chromium start per page costs six times the
    CPU). The protocol is JSON messages ended by a NUL byte, written to the browser's fd 3 and
    read from its fd 4; the page is read once MathJax has typeset it and the fonts are loaded.

    Example:
        >>> with Browser(find_chromium()) as browser:  # doctest: +SKIP
        ...     dom = browser.open("http://127.0.0.1:8000/methods/mgda/")
        ...     browser.screenshot(Path("mgda.png"))
    """

    def __init__(
        self, chromium: str, *, size: tuple[int, int] = (1280, 2000), timeout: float = 60.0
    ) -> None:
        self.size, self.timeout = size, timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="gb-chromium-")
        self._log = Path(self._tmp.name) / "stderr.log"
        pipe_in, self._to_browser = os.pipe()
        self._from_browser, pipe_out = os.pipe()
        # the child's ends as fds >= 10, so that moving them to 3 and 4 cannot clobber one
        child_in = fcntl.fcntl(pipe_in, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(pipe_out, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(pipe_in)
        os.close(pipe_out)
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={Path(self._tmp.name) / 'profile'}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _AT_FDS_3_4, str(child_in), str(child_out), chromium, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child_in, child_out),
            )
        os.close(child_in)
        os.close(child_out)
        self._buffer, self._last_id = b"", 0
        self._events: list[dict[str, Any]] = []
        try:
            target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})
            self._session = attached["sessionId"]
            self._call("Page.enable", session=True)
            metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False}
            self._call("Emulation.setDeviceMetricsOverride", metrics, session=True)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], self.timeout)
            if not ready:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                log = self._log.read_text(errors="replace")[-800:]
                raise RuntimeError(f"Chromium closed its pipe (exit {self._proc.poll()}): {log}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def _call(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = False
    ) -> dict[str, Any]:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") == self._last_id:
                if "error" in answer:
                    raise RuntimeError(f"Chromium: {method} failed: {answer['error']}")
                return dict(answer.get("result", {}))
            self._events.append(answer)

    def _wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self._events):
            self._events.append(self._receive())

    def open(self, url: str) -> str:
        """Load ``url`` in the tab; its DOM once MathJax and the fonts are done, as HTML."""
        self._events.clear()
        loaded = self._call("Page.navigate", {"url": url}, session=True)
        if loaded.get("errorText"):
            raise RuntimeError(f"Chromium could not open {url}: {loaded['errorText']}")
        self._wait_for("Page.loadEventFired")
        params = {"expression": _SETTLED_DOM, "awaitPromise": True, "returnByValue": True}
        result = self._call("Runtime.evaluate", params, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{url}: the page's scripts failed: {result['exceptionDetails']}")
        return str(result["result"]["value"])

    def screenshot(self, png: Path) -> Path:
        """A PNG of the top of the open page (``size``), written to ``png``."""
        data = self._call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(data))
        return png

    def close(self) -> None:
        """Close the browser and its pipes and remove its profile."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                self._call("Browser.close")
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._tmp.cleanup()


def screenshot_name(page: str) -> str:
    """The file name of a page's screenshot: ``"methods/mgda/"`` gives ``methods_mgda.png``."""
    return (page.strip("/").replace("/", "_").removesuffix(".html") or "index") + ".png"


def png_problems(png: Path, size: tuple[int, int] = (1280, 2000)) -> list[str]:
    """What is wrong with a screenshot: not a PNG, another size, or one flat colour."""
    data = png.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return [f"{png.name}: not a PNG"]
    width, height = struct.unpack(">II", data[16:24])
    if (width, height) != size:
        return [f"{png.name}: {width}x{height}, expected {size[0]}x{size[1]}"]
    idat, pos = b"", 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    if len(set(zlib.decompress(idat))) < 16:
        return [f"{png.name}: (nearly) one flat colour"]
    return []


@dataclass
class PageScan:
    """What one HTML page holds, from :func:`scan`."""

    title: str = ""
    has_content: bool = False
    math_total: int = 0
    math_rendered: int = 0
    math_errors: int = 0
    ids: set[str] = field(default_factory=set)
    refs: list[tuple[str, str]] = field(default_factory=list)  # (attribute, value)
    text: list[str] = field(default_factory=list)  # visible text, outside code and math


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = PageScan()
        self.stack: list[tuple[str, bool]] = []  # (tag, is arithmatex)
        self.rendered: list[bool] = []  # one flag per open arithmatex element
        self.skip = 0
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.out.ids.add(a[key])
        for key in ("href", "src"):
            if key in a and tag in ("a", "link", "img", "script", "source", "iframe"):
                self.out.refs.append((key, a[key]))
        if tag == "article" and "md-content__inner" in classes:
            self.out.has_content = True
        if tag == "mjx-container" and self.rendered:
            self.rendered[-1] = True
        if tag == "mjx-merror":
            self.out.math_errors += 1
        if tag == "title":
            self.in_title = True
        if tag in _VOID:
            return
        math = "arithmatex" in classes
        if math:
            self.out.math_total += 1
            self.rendered.append(False)
        self.stack.append((tag, math))
        self.skip += tag in _SKIP_TEXT

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _VOID or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:  # close what the end tag closes (implicitly closed elements too)
            open_tag, math = self.stack.pop()
            self.skip -= open_tag in _SKIP_TEXT
            if math:
                self.out.math_rendered += self.rendered.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.out.title += data
        elif not self.skip and data.strip():
            self.out.text.append(data)


def scan(html: str) -> PageScan:
    """Parse ``html`` (a built page or a rendered DOM) into a :class:`PageScan`."""
    scanner = _Scanner()
    scanner.feed(html)
    scanner.close()
    return scanner.out


def rendered_page_problems(name: str, html: str) -> list[str]:
    """What is wrong with a page's rendered DOM (see the module docstring)."""
    page = scan(html)
    problems = []
    if not page.has_content or "404" in page.title:
        problems.append(f"{name}: did not load (title {page.title.strip()!r})")
    if page.math_rendered < page.math_total:
        problems.append(
            f"{name}: {page.math_total - page.math_rendered} of {page.math_total} formulas "
            "not rendered by MathJax"
        )
    if page.math_errors:
        problems.append(f"{name}: {page.math_errors} MathJax error(s) (mjx-merror)")
    for chunk in page.text:
        for match in RAW_TEX.finditer(chunk):
            start = max(match.start() - 30, 0)
            problems.append(f"{name}: raw TeX {match.group(0)!r} in {chunk[start:][:80]!r}")
            break
    return problems


def link_problems(site: Path) -> list[str]:
    """Local ``href``/``src`` values of the built pages that name no file or no anchor."""
    scans = {p: scan(p.read_text(encoding="utf-8")) for p in sorted(site.rglob("*.html"))}
    problems = []
    for path, page in scans.items():
        rel = path.relative_to(site).as_posix()
        base = "/" + (rel[: -len("index.html")] if rel.endswith("index.html") else rel)
        for attr, value in page.refs:
            parts = urlsplit(value)
            if parts.scheme or parts.netloc or value.startswith(("mailto:", "javascript:")):
                continue
            target = urlsplit(urljoin(base, value))
            file = site / unquote(target.path).lstrip("/")
            if target.path.endswith("/") or file.is_dir():
                file = file / "index.html"
            if not file.is_file():
                problems.append(f"{rel}: {attr}={value!r} names no built file")
            elif target.fragment and file.suffix == ".html":
                if unquote(target.fragment) not in scans[file].ids:
                    problems.append(f"{rel}: {attr}={value!r}: no id {target.fragment!r} there")
    return problems


def browse(
    chromium: str,
    base_url: str,
    pages: list[str],
    shots: Path | None = None,
    shot_pages: Iterable[str] = (),
) -> dict[str, str]:
    """The rendered DOM of every page; a screenshot in ``shots`` of each of ``shot_pages``."""
    wanted = set(shot_pages)
    doms = {}
    with Browser(chromium) as browser:
        for page in pages:
            doms[page] = browser.open(base_url + page)
            if shots is not None and page in wanted:
                browser.screenshot(shots / screenshot_name(page))
    return doms


def main(argv: list[str] | None = None) -> int:
    """Build, check every page and write a screenshot of each; 0 when nothing is wrong."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    default_out = Path(tempfile.gettempdir()) / "gradbalance-site-screenshots"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        sys.stderr.write("no Chromium found: apt-get install chromium, or set CHROMIUM\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="gb-site-") as tmp:
        site = Path(tmp)
        build_site(site)
        pages = [p for p in site_pages(site) if p != "404.html"]
        problems = link_problems(site)
        with serve(site) as (url, missing):
            doms = browse(chromium, url, pages, args.out, pages)
        for page, dom in doms.items():
            problems += rendered_page_problems(page or "index", dom)
            problems += png_problems(args.out / screenshot_name(page))
        problems += [f"the browser asked for what the site lacks: {m}" for m in missing]
    for line in problems:
        sys.stderr.write(line + "\n")
    sys.stdout.write(
        f"{len(pages)} pages checked, {len(problems)} problem(s); screenshots in {args.out}\n"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
