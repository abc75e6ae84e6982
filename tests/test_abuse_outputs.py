"""What every output does with hostile text, and what a command does with --project (issue 25): CSV cells that
a spreadsheet would run as formulas, report.md/report.html with <script>, <img onerror>, javascript: links,
pipes and newlines in fact texts, reports written atomically on a full disk, batch files with a byte-order
mark, --project stored by every verb that computes, and a reader of a project a writer has open."""

from __future__ import annotations

import csv
import errno
import json
import re
from pathlib import Path

import pytest

from kn_core.cli import main
from kn_core.store import create_project, open_project
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "=HYPERLINK(\"http://x\")"
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"
LINK = "[click](javascript:alert(3))"


# ------------------------------------------------------------------------------------------------ CSV

@pytest.mark.parametrize("text,written", [
    ("=1+2", "'=1+2"), ("+SUM(A1)", "'+SUM(A1)"), ("-2+3", "'-2+3"), ("@cmd", "'@cmd"), ("\tx", "'\tx"),
    ("-0.25", "-0.25"), ("+3e5", "+3e5"), ("-inf", "-inf"), ("Paris", "Paris"), ("a=b", "a=b")])
def test_csv_cells_that_start_like_formulas_are_text(text, written):
    from kn_core.validation import csv_cell, csv_uncell

    assert csv_cell(text) == written
    assert csv_cell(-0.25) == -0.25  # numbers stay numbers
    assert csv_uncell(csv_cell(text)) == text


def test_project_export_and_fact_export_quote_formulas_and_read_them_back(tmp_path):
    from kn_core.fact_files import export_facts, import_facts
    from kn_core.facts import Fact, FactSet, Relation
    from kn_core.store import export_project

    rel = Relation("P1", "-name", ("[X] is in [Y] .",))
    factset = FactSet("set", {"P1": rel}, [Fact("P1", HOSTILE, "@SUM(1)"), Fact("P1", "-3", "Paris")])
    with create_project(tmp_path / "p.knproj") as project:
        project.import_factset(factset)
    export_project(tmp_path / "p.knproj", tmp_path / "out")
    rows = list(csv.reader(open(tmp_path / "out" / "facts.csv", encoding="utf-8")))
    cells = [cell for row in rows for cell in row]
    assert "'" + HOSTILE in cells and "'@SUM(1)" in cells and "-3" in cells
    assert not any(cell.startswith(("=", "+", "@")) for cell in cells)
    export_facts(factset, tmp_path / "facts.csv")
    text = (tmp_path / "facts.csv").read_text()
    assert "'" + HOSTILE.replace('"', '""') in text and "'-name" in text
    back = import_facts(tmp_path / "facts.csv")
    assert [(f.subject, f.object) for f in back.facts] == [(HOSTILE, "@SUM(1)"), ("-3", "Paris")]
    assert back.relation("P1").name == "-name"


# ------------------------------------------------------------------------------------------ report.md

def _hostile_report() -> dict:
    report = json.loads((ROOT / "docs" / "reproduction" / "pararel" / "report.json").read_text())
    swap = {"midfielder": f"mid{SCRIPT}fielder|x\ny {LINK}", "NBC": f"N{IMG}BC`code`|"}

    def walk(tree):
        if isinstance(tree, dict):
            return {k: walk(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v) for v in tree]
        return swap.get(tree, tree) if isinstance(tree, str) else tree

    return walk(report)


def test_report_md_escapes_html_links_pipes_and_newlines(tmp_path):
    from kn_core.reproduce.report import write_report

    write_report(_hostile_report(), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "mid" in md and "fielder" in md  # the texts are there, as text
    assert not re.search(r"(?<!\\)<(script|img)", md)  # only as \\<script: text, not HTML
    for raw in ("](javascript:", "\ny [click]"):
        assert raw not in md, raw
    header_cells = None
    for line in md.splitlines():  # a row holding the hostile texts has its table header's number of cells
        if not line.startswith("|"):
            header_cells = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
        header_cells = header_cells or cells
        if "fielder" in line or "BC" in line:
            assert cells == header_cells, line
    page = (tmp_path / "report.html").read_text()
    body = page[page.index("<body>"):]
    assert "<script>alert" not in body and "<img src=x" not in body and 'href="javascript' not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body  # shown as the characters, not as markup
    assert "\\<" not in body and "\\|" not in body  # no Markdown escapes leak into the page


# ---------------------------------------------------------------------------- reports on a full disk

def test_a_report_written_on_a_full_disk_keeps_the_earlier_one_whole(small_disk, fill_disk):
    """write_text_atomic on a real full drive: ENOSPC, the earlier report.json byte for byte, no temporary
    file left."""
    from kn_core import jsonio

    target = small_disk / "report.json"
    target.write_text('{"complete": true}')
    fill_disk(small_disk)
    with pytest.raises(OSError) as info:
        jsonio.write_text_atomic(target, "x" * 100000)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == '{"complete": true}'
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "report.json"]


def test_kn_reproduce_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import kn_core.reproduce as reproduce

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rep" / "report.json"))

    monkeypatch.setattr(reproduce, "run_reproduce", full_disk)
    model = _gpt2_folder(tmp_path)
    capsys.readouterr()
    code = main(["reproduce", "--out", str(tmp_path / "rep"), "--model", str(model)])
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith("[model]")]
    assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0] and "free space" in lines[0]


def _gpt2_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2"
    if not folder.exists():
        lm = make_tiny("gpt2")
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- batch files

def test_a_batch_file_with_a_byte_order_mark_is_read_as_fact_files_are(tmp_path):
    from kn_core.batch_requests import parse_requests
    from kn_core.fact_files import builtin_facts

    path = tmp_path / "requests.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"relation": "P36", "subject": "France", "new_object": "Berlin"}\n')
    parsed = parse_requests(path, builtin_facts())
    assert not parsed.bad and len(parsed.requests) == 1


def test_a_subject_inside_a_word_is_not_replaced_there():
    """"France" in "Francesca" is not the subject: the template replaces the whole word only."""
    from kn_core.batch_requests import parse_requests

    line = json.dumps({"prompt": "Francesca says the capital of France is", "subject": "France",
                       "ground_truth": "Paris", "target_new": "Rome", "rephrase_prompts": ["In France, the capital is",
                                                                                          "Francesca knows it is"]})
    parsed = parse_requests([line])
    request = parsed.requests[0]
    assert request.relation.templates[:2] == ("Francesca says the capital of [X] is [Y]", "In [X], the capital is [Y]")
    assert [what for what, _ in request.left_out] == ["rephrase 'Francesca knows it is'"]


# ---------------------------------------------------------------------------------- --project stored

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return str(_gpt2_folder(tmp_path_factory.mktemp("model")))


VERB = ["--relation", "P36", "--subject", "France", "--steps", "2", "--p", "0.1"]


@pytest.mark.parametrize("argv,kind", [
    (["edit", "suppress", *VERB], "edit suppress"), (["edit", "amplify", *VERB], "edit amplify"),
    (["edit", "update", *VERB, "--new-object", "Berlin"], "edit update"),
    (["edit", "erase", "--relation", "P36", "--steps", "2", "--p", "0.1", "--max-facts", "2"], "edit erase"),
    (["neuron", "--layer", "1", "--index", "2"], "neuron")], ids=lambda x: x if isinstance(x, str) else x[1])
def test_project_stores_what_the_verb_computed(argv, kind, gpt2, tmp_path, capsys):
    path = tmp_path / "p.knproj"
    code = main(argv + ["--model", gpt2, "--project", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    with open_project(path, read_only=True) as project:
        stored = project.list_evaluations(kind)
        assert len(stored) == 1 and project.counts()["models"] == 1
        assert stored[0].report == json.loads(out)


def test_allowed_missing_weights_are_recorded_with_the_results(gpt2, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    import shutil

    folder = tmp_path / "missing"
    shutil.copytree(gpt2, folder)
    state = load_file(folder / "model.safetensors")
    state.pop("transformer.h.1.mlp.c_proj.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code = main(["predict", "The capital of", "--model", str(folder), "--allow-missing-weights", "--project",
                 str(tmp_path / "p.knproj")])
    assert code == 0, capsys.readouterr().err
    with open_project(tmp_path / "p.knproj", read_only=True) as project:
        info = project.list_models()[0].info
    assert info["weights_not_from_files"] == {"missing": ["transformer.h.1.mlp.c_proj.weight"]}


# ------------------------------------------------------------------------- a reader beside a writer

def test_a_reader_sees_the_last_commit_while_a_writer_has_the_project(tmp_path, capsys):
    """`kn project info` and `kn project export` work while a writer holds the project (before: refused as
    locked): they read a private copy of its last commit; a second writer is still refused."""
    path = tmp_path / "p.knproj"
    with create_project(path) as writer:
        writer.add_fact({"relation": "P1", "subject": "a", "object": "b"})
        with writer.atomic("a save in progress"):
            writer.add_fact({"relation": "P1", "subject": "c", "object": "d"})
            assert main(["project", "info", str(path), "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["counts"]["facts"] == 1  # not the uncommitted one
        for k in range(30):
            writer.add_fact({"relation": "P1", "subject": f"s{k}", "object": "o"})
        assert main(["project", "export", str(path), "--out", str(tmp_path / "export")]) == 0
        capsys.readouterr()
        assert len(list(csv.reader(open(tmp_path / "export" / "facts.csv")))) == 1 + 32
        assert main(["predict", "hi", "--project", str(path), "--model", "/nonexistent"]) == 2
        assert "open in another process" in capsys.readouterr().err
    assert not list(Path("/tmp").glob(f"kn-snapshot-*/{path.name}"))
