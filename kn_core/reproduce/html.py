"""Self-contained HTML reports that open in any browser without a server. The reproduction's report.html is
rendered from the same Markdown as report.md (``report.write_html``), so the two never disagree and every
section another part of the pipeline adds to report.md appears here too; the GUI's "Export report" uses the
same renderer. Figures are embedded as data: URIs, tables sort by clicking a column header, and a provenance
block says which model (sha256), libraries, parameters, time and command produced the numbers.

No network at all: a Content-Security-Policy meta forbids every fetch except data: images, the one inline
style and the one inline script (allowed by their sha256, not by 'unsafe-inline'). Links in the Markdown are
shown as text, never as live references.

The Markdown is our own generated subset (headings, pipe tables, paragraphs, lists, code fences, ``**bold**``,
``*italic*``, `` `code` ``, images, and ``<details>``/``<summary>`` lines), so a small converter is enough and
no library is needed.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import json
import re
from pathlib import Path

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1em 2em;color:#1d2329;background:#fff}
h1{font-size:1.7em;margin:.4em 0}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #d0d7de;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f5f7}th.sortable{cursor:pointer;user-select:none}
th.sortable:after{content:" \\21C5";color:#9aa4ae}th[aria-sort=ascending]:after{content:" \\25B2";color:#1d2329}
th[aria-sort=descending]:after{content:" \\25BC";color:#1d2329}tfoot td{background:#fafbfc}
tbody tr:nth-child(even){background:#fafbfc}code{background:#f3f5f7;padding:0 3px;border-radius:3px}
pre{background:#f3f5f7;padding:.6em;overflow:auto}img{max-width:100%;display:block;margin:.5em 0}
.missing,.broken{color:#b3261e;font-weight:600}nav{font-size:13px;margin:.5em 0 1em}
nav a{margin-right:.8em;white-space:nowrap}
.provenance td:first-child{white-space:nowrap;font-weight:600}.provenance td{font-family:ui-monospace,monospace}
"""

# Sorting: numbers ("+12.34%", "x1.2e26", "0.45", "3 of 7") by value, other text alphabetically, empty and
# "n/a" cells last in both directions. Rows in <tfoot> (averages, the paper's numbers) stay put.
# On load, each image's decoded width is written to data-natural-width, and an image that failed to decode
# says so in red, so a broken figure is never silently blank.
SCRIPT = """
(function(){
function key(text){
  var t=text.trim();
  if(t===""||t==="n/a"||t==="-")return null;
  var m=t.replace(/^[x\\u00d7]/,"").replace(/%$/,"").match(/^[-+]?(\\d+\\.?\\d*|\\.\\d+)(e[-+]?\\d+)?/i);
  return m?parseFloat(m[0]):t.toLowerCase();
}
function compare(a,b){
  if(a===null||b===null)return a===null?(b===null?0:1):-1;
  if(typeof a!==typeof b)return typeof a==="number"?-1:1;
  return a<b?-1:a>b?1:0;
}
function sortBy(table,col,th){
  var dir=th.getAttribute("aria-sort")==="ascending"?-1:1,body=table.tBodies[0];
  var rows=Array.prototype.slice.call(body.rows).map(function(r,i){
    var c=r.cells[col];return {row:r,key:key(c?c.textContent:""),i:i};});
  rows.sort(function(a,b){
    if(a.key===null||b.key===null)return compare(a.key,b.key)||a.i-b.i;
    return dir*compare(a.key,b.key)||a.i-b.i;});
  rows.forEach(function(x){body.appendChild(x.row);});
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute("aria-sort");});
  th.setAttribute("aria-sort",dir===1?"ascending":"descending");
}
Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    th.classList.add("sortable");th.title="click to sort";
    th.addEventListener("click",function(){sortBy(table,col,th);});});
});
function checkImages(){
  Array.prototype.forEach.call(document.images,function(img){
    var marked=img.hasAttribute("data-natural-width");
    img.setAttribute("data-natural-width",String(img.naturalWidth));
    if(!img.naturalWidth&&!marked){var s=document.createElement("span");s.className="broken";
      s.textContent="figure "+img.alt+" could not be decoded";img.parentNode.insertBefore(s,img.nextSibling);}
  });
  document.body.setAttribute("data-images-checked",String(document.images.length));
}
if(document.readyState==="complete")checkImages();else window.addEventListener("load",checkImages);
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


CSP = (f"default-src 'none'; img-src data:; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; "
       "base-uri 'none'; form-action 'none'")

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*]+?)(?<=\S)\*(?![*\w])")
_TABLE_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_DETAILS = re.compile(r"^<details>\s*<summary>(.*)</summary>$")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}


def figure_uri(data: bytes, name: str) -> str:
    mime = _MIME.get(Path(name).suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


_ESCAPED = re.compile(r"\\([\\`\[\]<>|!*_:(])")


class _Inline:
    """Inline Markdown (code spans, bold, images, links) to HTML, with every piece of text escaped."""

    def __init__(self, figures: dict[str, bytes]):
        self.figures = figures

    def image(self, m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        data = self.figures.get(src)
        if data is None:
            return f'<span class="missing">[figure {html.escape(src)} was not written]</span>'
        return f'<img alt="{html.escape(alt)}" src="{figure_uri(data, src)}">'

    @staticmethod
    def link(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if target.startswith("#"):  # a place in this page; anything else stays text (no network, no files)
            return f'<a href="#{html.escape(target[1:])}">{text}</a>'
        return f"{text} ({target})"

    def __call__(self, text: str) -> str:
        held: list[str] = []  # backslash-escaped characters (validation.markdown_text): shown as themselves

        def hold_escape(m):
            held.append(m.group(1))
            return f"\x01{len(held) - 1}\x01"

        return re.sub("\x01(\\d+)\x01", lambda m: html.escape(held[int(m.group(1))]),
                      self._render(_ESCAPED.sub(hold_escape, text)))

    def _render(self, text: str) -> str:
        parts = text.split("`")
        out = []
        for k, part in enumerate(parts):
            if k % 2 and k < len(parts) - 1:
                out.append(f"<code>{html.escape(part)}</code>")
                continue
            if k % 2:  # an unmatched backtick: keep it as a character
                part = "`" + part
            images: list[str] = []

            def hold(m, images=images):
                images.append(self.image(m))
                return f"\x00{len(images) - 1}\x00"

            part = _IMAGE.sub(hold, part)
            part = html.escape(part, quote=False)
            part = _LINK.sub(self.link, part)
            part = _BOLD.sub(r"<strong>\1</strong>", part)
            part = _ITALIC.sub(r"<em>\1</em>", part)
            out.append(re.sub("\x00(\\d+)\x00", lambda m: images[int(m.group(1))], part))
        return "".join(out)


def _cells(line: str) -> list[str]:
    """A table row's cells; ``\\|`` is a pipe inside a cell (e.g. |Δp|)."""
    line = line.strip()
    inner = line[1:-1] if line.endswith("|") and not line.endswith("\\|") else line[1:]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _is_summary_row(cells: list[str]) -> bool:
    """Averages and the paper's numbers: kept under the table (tfoot) while the rows above it sort."""
    first = cells[0] if cells else ""
    return (first.startswith("**") and first.endswith("**")) or first.lower().startswith("paper")


def _table(header: list[str], rows: list[list[str]], inline) -> list[str]:
    body = [r for r in rows if not _is_summary_row(r)]
    foot = [r for r in rows if _is_summary_row(r)]
    width = len(header)

    def tr(cells, tag):
        cells = (cells + [""] * width)[:max(width, len(cells))]
        return "<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>"

    out = ['<table class="sortable">', "<thead>" + tr(header, "th") + "</thead>", "<tbody>"]
    out += [tr(r, "td") for r in body] + ["</tbody>"]
    if foot:
        out += ["<tfoot>"] + [tr(r, "td") for r in foot] + ["</tfoot>"]
    return out + ["</table>"]


def _slug(text: str, used: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def markdown_to_html(text: str, figures: dict[str, bytes]) -> tuple[str, list[tuple[str, str]]]:
    """(HTML body, [(anchor, title) of each level-2 heading]) of our generated Markdown."""
    inline = _Inline(figures)
    lines = text.split("\n")
    out: list[str] = []
    toc: list[tuple[str, str]] = []
    used: set[str] = set()
    para: list[str] = []
    in_list = False

    def flush():
        nonlocal in_list
        if para:
            joined = "".join(inline(p[:-2]) + "<br>" if p.endswith("  ") else inline(p) + " " for p in para)
            out.append("<p>" + joined.strip() + "</p>")
            para.clear()
        if in_list:
            out.append("</ul>")
            in_list = False

    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if stripped.startswith("```"):
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:end])) + "</code></pre>")
            i = end + 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if heading:
            flush()
            level, title = len(heading.group(1)), heading.group(2)
            anchor = _slug(title, used)
            if level == 2:
                toc.append((anchor, title))
            out.append(f'<h{level} id="{anchor}">{inline(title)}</h{level}>')
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            flush()
            end = i + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            out += _table(_cells(stripped), [_cells(r) for r in lines[i + 2:end]], inline)
            i = end
            continue
        elif _DETAILS.match(stripped):
            flush()
            out.append(f"<details><summary>{inline(_DETAILS.match(stripped).group(1))}</summary>")
        elif stripped == "</details>":
            flush()
            out.append("</details>")
        elif stripped.startswith("- "):
            if para:
                flush()
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(stripped[2:])}</li>")
        elif not stripped:
            flush()
        else:
            if in_list:
                flush()
            para.append(line.lstrip())
        i += 1
    flush()
    return "\n".join(out), toc


def _flatten(d, prefix="") -> list[tuple[str, object]]:
    items = []
    for key, value in (d or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, name + ".")
        else:
            items.append((name, value))
    return items


def provenance_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows: what produced the numbers. Missing facts say so (an older report.json)."""
    prov = report.get("provenance") or {}
    model = report.get("model") or {}
    rows = [("report written", prov.get("written") or _dt.datetime.now(_dt.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC")),
            ("run started", prov.get("started") or "not recorded (report from before provenance was recorded)"),
            ("command", prov.get("command") or "not recorded"),
            ("status", str(report.get("status", "-"))),
            ("model", str(model.get("name") or model.get("source") or "-")),
            ("model sha256", str(model.get("sha256") or "not recorded")),
            ("model shape", ", ".join(f"{k} {model[k]}" for k in ("family", "kind", "layers", "neurons", "hidden",
                                                                      "vocab", "dtype", "device") if k in model))]
    rows += [(f"version: {k}", str(v)) for k, v in (report.get("versions") or {}).items()]
    rows += [(f"parameter: {k}", json.dumps(v) if not isinstance(v, str) else v)
             for k, v in _flatten(report.get("parameters"))]
    return rows


def render_html(markdown: str, figures: dict[str, bytes], provenance: list[tuple[str, str]],
                title: str | None = None) -> str:
    """One self-contained HTML page: the Markdown (figures from ``figures``: name -> PNG bytes) and a
    provenance table at the end (linked from the top)."""
    body, toc = markdown_to_html(markdown, figures)
    first = re.search(r"^#\s+(.*)$", markdown, re.M)
    title = title or (first.group(1) if first else "Knowledge Neuron Studio report")
    toc.append(("provenance", "Provenance"))
    nav = "<nav>" + " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in toc) + "</nav>"
    prov = ['<h2 id="provenance">Provenance</h2>', '<table class="provenance sortable">',
            "<thead><tr><th>what</th><th>value</th></tr></thead>", "<tbody>"]
    prov += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in provenance]
    prov += ["</tbody>", "</table>"]
    if body.startswith("<h1"):  # the nav goes under the title
        head, _, rest = body.partition("\n")
        body = head + "\n" + nav + "\n" + rest
    else:
        body = nav + "\n" + body
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        body, *prov, f"<script>{SCRIPT}</script>", "</body>", "</html>", ""])


def read_figures(folder: Path, markdown: str) -> dict[str, bytes]:
    """The image files the Markdown names that exist in ``folder`` (plain names only: nothing outside it)."""
    figures = {}
    for _, src in _IMAGE.findall(markdown):
        path = Path(folder) / src
        if "/" not in src and "\\" not in src and path.is_file():
            figures[src] = path.read_bytes()
    return figures
