"""Abuse under running writers (issue 25): whole-set runs and batch edits killed, their project replaced or
deleted under them, and their disk filled; each time nothing committed is lost and nothing is claimed as stored
that is not. The tiny model and fact set of tests/runner_child.py; a real 2 MB tmpfs where this process may
mount one (root), else those tests skip saying why."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kn_core.attribution import AttributionParams
from kn_core.cli import main
from kn_core.fact_files import export_facts
from kn_core.models import load_model
from kn_core.runner import attribute_factset
from kn_core.store import create_project, open_project
from runner_child import save_tiny, tiny_factset
from test_runner import stored_facts

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
REQUESTS = [{"prompt": f"The capital of {country} is", "subject": country, "ground_truth": city,
             "target_new": new, "neurons": [[0, 1], [1, 2]]}
            for country, city, new in (("France", "Paris", "Berlin"), ("Germany", "Berlin", "Rome"))]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    model = save_tiny(root / "model")
    facts = export_facts(tiny_factset(), root / "facts.jsonl")
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    lm = load_model(model, device="cpu")
    with create_project(root / "serial.knproj") as serial:  # the reference: one uninterrupted run
        attribute_factset(serial, lm, tiny_factset(), AttributionParams(steps=4))
        want = stored_facts(serial)
    return {"root": root, "model": model, "facts": str(facts), "requests": str(requests), "lm": lm, "want": want}


def other_project(path: Path) -> str:
    with create_project(path) as project:
        project.add_fact({"relation": "P1", "subject": "someone else's", "object": "work"})
    return sha(path)


def start_runner(setup, project: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "runner_child.py"), setup["model"], setup["facts"],
                             str(project), "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def first_stored(child: subprocess.Popen) -> str:
    line = child.stdout.readline()
    assert line.startswith("stored"), (line, child.stderr.read() if child.poll() is not None else "")
    return line


def resumed_matches(setup, path: Path) -> None:
    """Run again to the end: every fact once, bitwise what the uninterrupted run stored."""
    with open_project(path) as project:
        assert project.check_integrity() == []
        report = attribute_factset(project, setup["lm"], tiny_factset(), AttributionParams(steps=4))
        assert report.attributed + report.already_stored == len(setup["want"])
        got = stored_facts(project)
    assert set(got) == set(setup["want"])
    for subject, (_, scores, neurons) in setup["want"].items():
        assert all(np.array_equal(got[subject][1][k], scores[k]) for k in scores), subject
        assert got[subject][2] == neurons, subject


# ------------------------------------------------------------------ a project replaced or deleted under a writer

@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_a_project_replaced_or_deleted_under_a_whole_set_run_stops_it(setup, tmp_path, how):
    """`mv other.knproj p.knproj` (or `rm p.knproj`) while the run writes: the next commit finds another file (or
    none) at the path and the run stops with ProjectReplacedError instead of writing on into the unlinked file and
    reporting success; the file now at the path keeps every byte."""
    path = tmp_path / "p.knproj"
    other_sha = other_project(tmp_path / "other.knproj")
    child = start_runner(setup, path)
    try:
        first_stored(child)
        if how == "replaced":
            os.replace(tmp_path / "other.knproj", path)
        else:
            path.unlink()
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert child.returncode != 0 and "finished" not in out, (out, err[-2000:])
    assert "ProjectReplacedError" in err and ("replaced by another file" if how == "replaced" else "deleted") in err
    if how == "replaced":
        assert sha(path) == other_sha
    else:
        assert not path.exists()


def test_the_cli_says_so_in_one_line_and_claims_nothing(setup, tmp_path, capsys, monkeypatch):
    import kn_core.runner as runner

    path = tmp_path / "p.knproj"
    other_sha = other_project(tmp_path / "other.knproj")
    store = runner._store

    def store_then_replace(*args, **kwargs):
        run_id = store(*args, **kwargs)
        if (tmp_path / "other.knproj").exists():
            os.replace(tmp_path / "other.knproj", path)  # what `mv` does while the run goes on
        return run_id

    monkeypatch.setattr(runner, "_store", store_then_replace)
    code = main(["attribute", "--facts", setup["facts"], "--project", str(path), "--model", setup["model"],
                 "--steps", "4", "--json"])
    out, err = capsys.readouterr()
    errors = [line.rsplit("\r", 1)[-1] for line in err.split("\n") if "error" in line]
    assert code == 2 and len(errors) == 1 and "replaced by another file" in errors[0], err
    assert json.loads(out)["error_type"] == "ProjectReplacedError" and "attributed" not in out
    assert sha(path) == other_sha


def test_a_project_replaced_under_a_batch_edit_keeps_the_other_file(setup, tmp_path, capsys, monkeypatch):
    import kn_core.batch as batch

    path = tmp_path / "p.knproj"
    with create_project(path):
        pass
    other_sha = other_project(tmp_path / "other.knproj")
    run_batch = batch.run_batch

    def replace_then_run(*args, **kwargs):
        os.replace(tmp_path / "other.knproj", path)
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(batch, "run_batch", replace_then_run)
    code = main(["edit", "batch", setup["requests"], "--model", setup["model"], "--project", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "replaced by another file" in err.strip().splitlines()[-1], err
    assert sha(path) == other_sha


# -------------------------------------------------------------------------------------------- killed writers

def test_a_batch_edit_killed_mid_way_leaves_the_project_as_it_was(setup, tmp_path):
    """A batch is one transaction: killed while it computes (or while it stores), the project is byte for byte
    what it was, and it opens and reads normally."""
    path = tmp_path / "p.knproj"
    with create_project(path) as project:
        project.add_fact({"relation": "P36", "subject": "France", "object": "Paris"})
    before = sha(path)
    # Without explicit neurons every request is attributed first: 40 of them at 200 steps keep the child busy
    # for seconds after its model is ready (a single-prompt request gets neurons, so it does not fail early).
    requests = tmp_path / "slow.jsonl"
    requests.write_text("".join(json.dumps({"prompt": f"The capital of Land{k} is", "subject": f"Land{k}",
                                            "ground_truth": "Paris", "target_new": "Berlin"}) + "\n"
                                for k in range(40)))
    child = subprocess.Popen([sys.executable, "-m", "kn_core.cli", "edit", "batch", str(requests), "--model",
                              setup["model"], "--project", str(path), "--steps", "200"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while "model ready" not in seen and time.monotonic() < deadline:
            seen += child.stderr.readline()
        time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, "the batch ended before it was killed: make it longer"
    assert sha(path) == before
    with open_project(path) as project:
        assert project.counts()["facts"] == 1 and project.counts()["evaluations"] == 0
    assert sha(path) == before


# ------------------------------------------------------------------------------------------- a full disk

def test_a_whole_set_run_on_a_disk_that_fills_loses_nothing(setup, small_disk, fill_disk, tmp_path):
    """The disk fills after the first stored fact: the run stops (a one-line store error), every fact stored
    before is there, bitwise, and running again with room finishes the set without storing a fact twice."""
    path = small_disk / "p.knproj"
    child = start_runner(setup, path)
    try:
        first_stored(child)
        filler = fill_disk(small_disk)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert child.returncode != 0 and "finished" not in out
    assert "ProjectDiskFullError" in err or "ProjectCheckpointError" in err, err[-2000:]
    stored_before = out.count("stored") + 1
    filler.unlink()
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    for name in os.listdir(small_disk):
        shutil.copy(small_disk / name, roomy / name)
    with open_project(roomy / "p.knproj") as project:
        assert len(stored_facts(project)) == stored_before
    resumed_matches(setup, roomy / "p.knproj")


def test_a_batch_edit_on_a_full_disk_fails_in_one_line_and_changes_nothing(setup, small_disk, fill_disk,
                                                                             capsys):
    path = small_disk / "p.knproj"
    with create_project(path) as project:
        project.add_fact({"relation": "P36", "subject": "France", "object": "Paris"})
    before = sha(path)
    filler = fill_disk(small_disk)
    argv = ["edit", "batch", setup["requests"], "--model", setup["model"], "--project", str(path)]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip() and not line.startswith("[model]")]
    assert code == 2 and len(lines) == 1 and "disk full" in lines[0], lines
    assert sha(path) == before
    filler.unlink()
    assert main(argv) == 0  # with room, the same batch is stored
    capsys.readouterr()
    with open_project(path, read_only=True) as project:
        assert project.counts()["evaluations"] == 1
