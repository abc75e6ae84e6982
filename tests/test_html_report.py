"""report.html in a real headless Chromium (Debian's `chromium`; `bash setup.sh test` installs it): the figures
decode, the tables sort, and the page reaches no network. Missing Chromium fails these tests (it never skips
them): CI must check the report in a browser."""

from __future__ import annotations

import html
import http.server
import json
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kn_core.reproduce import render_markdown, write_report
from kn_core.reproduce.html import CSP, SCRIPT, STYLE, _csp_hash, markdown_to_html, render_html

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "reproduction" / "pararel" / "report.json"


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is missing: install Debian's `chromium` (sudo apt-get install -y chromium; "
                "`bash setup.sh test` does it) so the HTML report is checked in a real browser")


def _browse(chromium: str, page: Path, tmp: Path, *flags: str) -> str:
    """The DOM after load (scripts run) of a local page, in headless Chromium with its own profile."""
    profile = tmp / f"profile-{page.stem}"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", *flags, "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """The committed reproduction re-rendered by write_report (figures, report.md and report.html)."""
    out = tmp_path_factory.mktemp("report")
    report = json.loads(COMMITTED.read_text())
    write_report(report, out)
    return out


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A whole `kn reproduce` run on a tiny model: every section the pipeline writes today."""
    from test_reproduce import _factset
    from tiny import TINY_CAUSAL, make_tiny

    from kn_core.reproduce import run_reproduce

    out = tmp_path_factory.mktemp("tiny-run")
    run_reproduce(make_tiny(TINY_CAUSAL), _factset(), out, relations=["P36", "P37", "P99"], facts_per_relation=2,
                  steps=1, control_prompts=4, say=lambda m: None, command="kn reproduce --test")
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


# ---------------------------------------------------------------- the file itself

@pytest.mark.parametrize("which", ["report_dir", "tiny_run_dir"])
def test_html_is_written_beside_report_md_with_every_section_and_figure(which, request):
    report_dir = request.getfixturevalue(which)
    page = (report_dir / "report.html").read_text()
    md = (report_dir / "report.md").read_text()
    headings = [re.sub(r"[*`]", "", t) for t in re.findall(r"^#{2,3} (.*)$", md, re.M)]
    shown = [html.unescape(re.sub(r"<[^>]+>", "", t)) for t in re.findall(r"<h[23] id=\"[^\"]+\">(.*?)</h[23]>", page)]
    assert len(headings) > 5
    assert headings == shown[:len(headings)]  # every section of report.md, also ones added later, in order
    figures = _report(report_dir)["figures"]
    assert figures and page.count('src="data:image/png;base64,') == len(figures)
    assert "was not written" not in page
    model = _report(report_dir)["model"]
    assert model["sha256"] in page and "torch" in page and "parameter: attribution.steps" in page
    if which == "tiny_run_dir":  # a run records when and how it was started
        assert "<td>kn reproduce --test</td>" in page and re.search(r"run started</td><td>\d{4}-\d\d-\d\d ", page)


def test_numbers_in_the_page_are_the_numbers_in_report_md(report_dir):
    md = (report_dir / "report.md").read_text()
    page = (report_dir / "report.html").read_text()
    cells = {c.strip() for line in md.splitlines() if line.startswith("|") for c in line.strip("|").split("|")}
    numbers = {c for c in cells if re.fullmatch(r"[-+]?\d+(\.\d+)?%?|x[\d.e-]+", c)}
    assert len(numbers) > 20
    for n in numbers:
        assert f">{n}<" in page or f">{n}</" in page or f"<strong>{n}</strong>" in page, n


def test_markdown_text_is_escaped_and_new_sections_render():
    md = ("# Title\n\n## Degeneracy\n\nA fact about <img src=x onerror=alert(1)> & `a<b>` **bold**, a *redundant "
          "pair*, 2 * 3 and 2*3\n\n"
          "| neuron set | answer kept |\n|---|---|\n| L3#7 | yes, \\|Δp\\| 0.1 |\n| **average** | 0.5 |\n\n"
          "- [a link](https://example.org/x) stays text\n")
    body, toc = markdown_to_html(md, {})
    assert toc == [("degeneracy", "Degeneracy")]
    assert "<img" not in body and "&lt;img src=x onerror=alert(1)&gt; &amp;" in body
    assert "<code>a&lt;b&gt;</code>" in body and "<strong>bold</strong>" in body
    assert "<em>redundant pair</em>, 2 * 3 and 2*3" in body
    assert "<tfoot><tr><td><strong>average</strong></td>" in body.replace("\n", "")
    assert "<tr><td>L3#7</td><td>yes, |Δp| 0.1</td></tr>" in body
    assert "<a " not in body and "a link (https://example.org/x)" in body


def test_a_missing_figure_is_said_not_left_blank():
    body, _ = markdown_to_html("![layers](layer_histogram.png)\n", {})
    assert "figure layer_histogram.png was not written" in body


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.attrs, self.meta = [], []

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]
        if tag == "meta":
            self.meta.append(dict(attrs))


def test_the_page_references_nothing_outside_itself(report_dir):
    page = (report_dir / "report.html").read_text()
    refs = _Refs()
    refs.feed(page)
    for tag, name, value in refs.attrs:
        if name in ("src", "href", "action", "srcset", "poster", "data", "background"):
            assert value.startswith("data:image/png;base64,") or value.startswith("#"), (tag, name, value[:80])
    assert "url(" not in STYLE and "@import" not in STYLE
    for word in ("http", "fetch", "XMLHttpRequest", "WebSocket", "import(", "src="):
        assert word not in SCRIPT
    # URLs may appear only as text the reader sees (e.g. a fact about a website), never in a tag
    for tag in re.findall(r"<[^>]*https?://[^>]*>", page):
        pytest.fail(f"external reference in a tag: {tag[:120]}")
    csp = [m["content"] for m in refs.meta if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp == [CSP]
    assert "default-src 'none'" in CSP and "img-src data:" in CSP and "unsafe" not in CSP
    assert _csp_hash(SCRIPT) in CSP and _csp_hash(STYLE) in CSP


# ---------------------------------------------------------------- in Chromium

@pytest.mark.parametrize("which", ["report_dir", "tiny_run_dir"])
def test_chromium_decodes_every_figure(chromium, which, request, tmp_path):
    report_dir = request.getfixturevalue(which)
    dom = _browse(chromium, report_dir / "report.html", tmp_path)
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    figures = _report(report_dir)["figures"]
    assert f'data-images-checked="{len(figures)}"' in dom  # the page's own script ran (the CSP allows it)
    assert len(widths) == len(figures) and all(w > 100 for w in widths), widths
    assert 'class="broken"' not in dom


def test_a_broken_figure_is_marked_in_the_browser(chromium, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(render_html("# R\n\n![layers](layers.png)\n", {"layers.png": b"not a png"}, []))
    dom = _browse(chromium, page, tmp_path)
    assert 'data-natural-width="0"' in dom and ('<span class="broken">figure layers could not be '
                                                       'decoded</span>') in dom


def _with_probe(page: str, script: str) -> str:
    """The page without its CSP and with a test script that writes its findings into <pre id="probe">."""
    page = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
    return page.replace("</body>", f'<pre id="probe"></pre><script>{script}</script></body>')


def test_chromium_sorts_a_table_by_a_column(chromium, report_dir, tmp_path):
    probe = """
    var table=document.querySelector("#relations ~ table.sortable");
    var th=table.tHead.rows[0].cells[1];
    function col(){return Array.prototype.map.call(table.tBodies[0].rows,function(r){
      return r.cells[0].textContent+"="+r.cells[1].textContent;}).join(",");}
    var out=[col()];th.click();out.push(col());th.click();out.push(col());
    out.push(th.getAttribute("aria-sort"));
    document.getElementById("probe").textContent=out.join("\\n");
    """
    page = tmp_path / "sort.html"
    page.write_text(_with_probe((report_dir / "report.html").read_text(), probe))
    dom = _browse(chromium, page, tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).split("\n")
    original, ascending, descending, state = found
    pairs = [p.split("=") for p in original.split(",")]
    assert len(pairs) >= 3 and len({v for _, v in pairs}) > 1
    by_value = sorted(pairs, key=lambda p: int(p[1]))  # "facts in set": numbers, sorted as numbers
    assert ascending == ",".join("=".join(p) for p in by_value)
    assert descending == ",".join("=".join(p) for p in sorted(pairs, key=lambda p: -int(p[1])))
    assert state == "descending"


def test_sorting_keeps_averages_below_and_reads_percentages_and_ratios(chromium, tmp_path):
    md = ("# R\n\n## T\n\n| relation | change | ratio |\n|---|---|---|\n| A | +3.50% | x1.2e26 |\n"
          "| B | -40.00% | x0.85 |\n| C | n/a | x12 |\n| D | +12.00% | n/a |\n| **average** | +1.00% | x2 |\n")
    probe = """
    var t=document.querySelector("table.sortable"),out=[];
    function col(){return Array.prototype.map.call(t.rows,function(r){return r.cells[0].textContent;}).join("");}
    t.tHead.rows[0].cells[1].click();out.push(col());t.tHead.rows[0].cells[1].click();out.push(col());
    t.tHead.rows[0].cells[2].click();out.push(col());
    document.getElementById("probe").textContent=out.join(" ");
    """
    page = tmp_path / "units.html"
    page.write_text(_with_probe(render_html(md, {}, []), probe))
    dom = _browse(chromium, page, tmp_path)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1).split(" ")
    # header row first, the average last; n/a last in both directions
    assert found == ["relationBADCaverage", "relationDABCaverage", "relationBCADaverage"]


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802 - the http.server API
        self.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_chromium_makes_no_request_from_the_report(chromium, report_dir, tmp_path):
    """A request the page would make (an image from a local server) is blocked by the report's CSP; the same
    page without the CSP makes it, so this test can fail. (Not through a proxy: Chromium's own background
    requests, e.g. its clock check, would go through it too; the page's references are scanned above.)"""
    _Counter.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        original = (report_dir / "report.html").read_text()
        bait = original.replace("</body>", f'<img alt="bait" src="{url}/bait.png"></body>')
        guarded = tmp_path / "guarded.html"
        guarded.write_text(bait)
        _browse(chromium, guarded, tmp_path)
        assert _Counter.hits == []
        open_page = tmp_path / "open.html"
        open_page.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", bait))
        _browse(chromium, open_page, tmp_path)
        assert _Counter.hits == ["/bait.png"]
    finally:
        server.shutdown()
        server.server_close()


def test_markdown_and_html_come_from_the_same_report(report_dir):
    """report.html is a rendering of report.md: re-rendering the JSON gives the same Markdown and page body."""
    report = _report(report_dir)
    assert render_markdown(report) == (report_dir / "report.md").read_text()
