"""The project store under failure: what opening writes (nothing until the checks pass), special files, a close
that cannot checkpoint (the -wal keeps everything; `kn project recover`), atomic exports with clean names, and a
real full disk through the CLI. docs/STORE.md ("What survives what") names these tests."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kn_core import store
from kn_core.store import (
    CorruptProjectError,
    NotAProjectError,
    ProjectDataError,
    ProjectExistsError,
    create_project,
    open_project,
)
from kn_core.cli.project import add_commands as add_project_commands
from test_store import CHILD, MODEL, assert_refused, child_env, facts_module, filled_project, rand, sha


@pytest.fixture(autouse=True)
def no_fsync_per_commit(monkeypatch):
    monkeypatch.setattr(store.database, "SYNCHRONOUS", "NORMAL")  # as in test_store.py


@pytest.fixture
def proj_path(tmp_path):
    return tmp_path / "study.knproj"


# ------------------------------------------------------------------------------------------ what open writes


def kn_project(capsys, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kn")
    add_project_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["project", *map(str, argv)])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_open_and_close_without_changes_keeps_every_byte(proj_path):
    """Opening checks and reads; only a save writes (switching the file to WAL first). Where there is no flock
    (Windows) a writer switches to WAL at open instead, which rewrites header bytes only (see docs/STORE.md)."""
    filled_project(proj_path)
    before = sha(proj_path)
    with open_project(proj_path, read_only=True) as p:
        modified = p.info()["modified_at"]
        p.list_runs(), p.load_scores(1), p.check_integrity()
    assert sha(proj_path) == before
    with open_project(proj_path) as p:
        p.list_facts(), p.load_edit_history(), p.counts(), p.check_integrity()
        assert sorted(os.listdir(proj_path.parent)) == [proj_path.name]  # not even a -wal yet
        with pytest.raises(ProjectDataError):  # a refused save writes nothing either
            p.add_neuron_set("no such kind", [(1, 2)])
    assert sha(proj_path) == before
    assert sorted(os.listdir(proj_path.parent)) == [proj_path.name]
    with open_project(proj_path) as p:  # a save: WAL while open, one file again after close
        p.set_setting("x", 1)
        assert Path(f"{proj_path}-wal").exists() and p.info()["modified_at"] > modified
    assert sha(proj_path) != before and sorted(os.listdir(proj_path.parent)) == [proj_path.name]


def test_damaged_file_is_not_written_by_a_failed_open(proj_path):
    filled_project(proj_path)
    with open_project(proj_path) as p:  # a run left running: opening for writing has something to record
        p.start_run(fact=1, prompts=["x"], params={}, model=MODEL)
        p._con.execute("UPDATE runs SET status = 'running'")
    con = sqlite3.connect(proj_path)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(proj_path.read_bytes())
    data[(root - 1) * page:(root - 1) * page + 8] = b"\x00" * 8  # the runs table's b-tree page header
    proj_path.write_bytes(bytes(data))
    before = sha(proj_path)
    assert_refused(proj_path, CorruptProjectError, "damaged")  # bytes unchanged
    with open_project(proj_path, read_only=True) as p:  # reading what is sound still works
        assert len(p.list_facts()) == 3
        with pytest.raises(CorruptProjectError, match="damaged"):
            p.list_runs()
    assert sha(proj_path) == before
    assert sorted(os.listdir(proj_path.parent)) == [proj_path.name]  # no -wal, no journal either


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_special_files_are_refused_without_opening_them(tmp_path):
    fifo = tmp_path / "pipe.knproj"
    os.mkfifo(fifo)
    started = time.monotonic()
    for read_only in (False, True):
        message = assert_refused(fifo, NotAProjectError, "is a named pipe", read_only=read_only)
        assert "not a project file" in message
    assert time.monotonic() - started < 5  # no wait for a writer that never comes
    with pytest.raises(ProjectExistsError):
        create_project(fifo)
    assert_refused(Path("/dev/null"), NotAProjectError, "is a character device")
    real = tmp_path / "p.knproj"
    create_project(real).close()
    os.mkfifo(tmp_path / "p.knproj-wal")
    assert_refused(real, NotAProjectError, "journal p.knproj-wal is a named pipe")


# ------------------------------------------------------------------------------------------ a failed close


def fill_wal_past_the_limit(path) -> dict:
    """store_child fill_wal: the WAL holds 2000 committed facts that closing cannot copy into the file."""
    result = subprocess.run([sys.executable, str(CHILD), "fill_wal", str(path)], capture_output=True, text=True,
                            env=child_env(), timeout=120)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "stored 2000", result.stderr
    return json.loads(lines[1])


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_failed_close_is_an_error_and_the_wal_keeps_everything(proj_path, tmp_path, capsys):
    """A checkpoint that fails at close (here a file-size limit, like a full disk) raises a one-line
    ProjectCheckpointError; the data stays in FILE-wal, every open replays it, `kn project recover` copies it
    into the file; the file without its -wal is reported as truncated and points to the recovery."""
    closed = fill_wal_past_the_limit(proj_path)
    message = closed["message"]
    assert not closed["closed"] and closed["type"] == "ProjectCheckpointError"
    assert "\n" not in message and str(proj_path) in message and "nothing is lost" in message
    assert f"every saved change is in {proj_path.name}-wal" in message
    assert f"kn project recover {proj_path}" in message
    wal = Path(f"{proj_path}-wal")
    assert wal.stat().st_size > 0
    header = proj_path.read_bytes()[:100]
    pages, page = int.from_bytes(header[28:32], "big"), int.from_bytes(header[16:18], "big")
    assert proj_path.stat().st_size < pages * page  # the half-done checkpoint: the file alone looks truncated

    alone = tmp_path / "alone" / proj_path.name
    alone.parent.mkdir()
    alone.write_bytes(proj_path.read_bytes())
    message = assert_refused(alone, CorruptProjectError, "truncated")
    assert "-wal file belonged with it" in message and "kn project recover" in message

    with open_project(proj_path, read_only=True) as p:  # the -wal is replayed before anything is judged
        assert p.counts()["facts"] == 5000 and p.check_integrity() == []
    rc, out, err = kn_project(capsys, "recover", proj_path, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["integrity"] == ["ok"] and doc["counts"]["facts"] == 5000
    assert doc["wal_bytes"] > 0 and not wal.exists()
    assert sorted(os.listdir(proj_path.parent)) == ["alone", proj_path.name]
    with open_project(proj_path, read_only=True) as p:
        facts = p.list_facts()
        assert len(facts) == 5000 and facts[-1].subject == "after 1999" and p.check_integrity() == []
    rc, out, err = kn_project(capsys, "recover", tmp_path / "missing.knproj")
    assert rc == 2 and err.count("\n") == 1 and "no such project file" in err


# ------------------------------------------------------------------------------------------ exports


def test_export_cleans_names_and_writes_atomically(proj_path, tmp_path, monkeypatch):
    filled_project(proj_path)
    with open_project(proj_path) as p:
        for bad in ("../../evil", "a/b", "x\ny", ".hidden", "", "a" * 65):
            with pytest.raises(ProjectDataError, match="bad array name"):
                p.add_prompt_result(1, 0, scores=rand(0), extra_arrays={bad: rand(1)})
        assert p.get_run(1).prompts[0].arrays == ("scores", "activations")  # nothing of the refused saves
        # a name stored by another program (or an older version) still cannot leave the export folder
        p._con.execute("UPDATE score_arrays SET name = '../../x/\x01..evil' WHERE run_id = 1 AND prompt_index = 1 "
                       "AND name = 'activations'")
    out = tmp_path / "export"
    store.export_project(proj_path, out, with_arrays=True)
    names = sorted(os.listdir(out / "arrays"))
    assert "run1_p1_.._.._x__evil.npy" not in names and all("/" not in n and ".." not in n for n in names)
    assert "run1_p1_____x___evil.npy" in names and sorted(os.listdir(tmp_path)) == ["export", "study.knproj"]
    assert np.array_equal(np.load(out / "arrays" / "run1_p1_____x___evil.npy"), rand(11))

    real_save, calls = np.save, []

    def failing_save(*args, **kwargs):  # the disk fills up half-way through the arrays
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(store.ProjectError, match="nothing was left half-written"):
        store.export_project(proj_path, fresh, with_arrays=True)
    assert not fresh.exists()
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if f != "arrays"}
    calls.clear()
    with pytest.raises(store.ProjectError, match="No space left"):
        store.export_project(proj_path, out, with_arrays=True)  # the earlier export stays whole
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != "arrays"} == before
    assert len(os.listdir(out / "arrays")) == 5
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["export", "study.knproj"]  # no temporary folder left
    store.export_project(proj_path, out)  # replaces the earlier export (no arrays this time)
    assert not (out / "arrays").exists() and (out / "facts.csv").exists()
    (out / "my notes.txt").write_text("mine")
    with pytest.raises(store.ProjectError, match="already holds other files"):
        store.export_project(proj_path, out)
    assert (out / "my notes.txt").read_text() == "mine"


def test_export_writes_strict_json_for_stored_non_finite_numbers(proj_path, tmp_path):
    """JSON has no NaN/Infinity: a NaN stored in a report (SQLite keeps Python's JSON text) is exported as null
    with a note saying what it was (kn_core.jsonio), never as a bare NaN that JSON readers refuse."""
    import math

    with create_project(proj_path) as p:
        p.add_evaluation("edit", {"p": math.nan, "after": [0.5, math.inf]}, params={"factor": 2.0})
    store.export_project(proj_path, tmp_path / "out")

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads((tmp_path / "out" / "evaluations.json").read_text(), parse_constant=refuse)[0]["report"]
    assert report == {"p": None, "after": [0.5, None], "p_note": "NaN",
                      "after_note": "1 non-finite value(s) written as null: [1]=Infinity"}


# ------------------------------------------------------------------------------------------ a real full disk


def test_full_disk_through_the_cli(small_disk, tmp_path, capsys):
    """On a real 2 MB file system. `kn facts import` is one transaction, the first save of its open, which goes
    through SQLite's rollback journal: on the full disk it fails with exit status 2 and one line, and the file
    keeps every byte. Saves that did commit into the -wal while the checkpoint at close finds no room: close
    fails in one line saying the data is in the -wal; copied with its -wal to a disk with room, the project
    holds every fact, and `kn project recover` makes it one file again."""
    facts = facts_module()
    from kn_core import cli
    from kn_core.fact_files import export_facts
    rel = facts.Relation("P1", "rel", ("[X] is [Y].",))
    big = tmp_path / "big.jsonl"
    many = [facts.Fact("P1", f"subject {i} " + "x" * 20, f"object {i}") for i in range(9000)]
    export_facts(facts.FactSet("big", {"P1": rel}, [facts.Fact("P1", f"subject {i} " + "x" * 60, f"object {i}")
                                                    for i in range(30000)]), big)  # more than the drive holds
    path = small_disk / "p.knproj"
    with create_project(path) as p:
        p.add_facts([facts.Fact("P1", f"pre {i}", "o") for i in range(3000)], {"P1": rel})
    before = sha(path)
    capsys.readouterr()
    rc = cli.main(["facts", "import", str(big), "--project", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert "disk full" in err and "rolled back" in err and "Traceback" not in err
    assert sha(path) == before and sorted(os.listdir(small_disk)) == ["p.knproj"]
    p = open_project(path)
    p.add_facts([facts.Fact("P1", f"pre {i}", "o") for i in range(3000)], {"P1": rel})  # a save: into the WAL
    p.add_facts(many, {"P1": rel})  # fits in the -wal, not in the file as well
    with pytest.raises(store.ProjectCheckpointError, match="nothing is lost") as info:
        p.close()
    assert "kn project recover" in str(info.value)
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    for name in os.listdir(small_disk):
        (roomy / name).write_bytes((small_disk / name).read_bytes())
    assert sorted(os.listdir(roomy)) == ["p.knproj", "p.knproj-wal"]
    with open_project(roomy / "p.knproj", read_only=True) as p:
        assert p.counts()["facts"] == 12000 and p.check_integrity() == []
    rc, out, err = kn_project(capsys, "recover", roomy / "p.knproj")
    assert rc == 0 and "integrity: ok" in out and "12000 facts" in out
    assert sorted(os.listdir(roomy)) == ["p.knproj"]
    before = {name: sha(small_disk / name) for name in ("p.knproj", "p.knproj-wal")}
    rc, out, err = kn_project(capsys, "recover", path)  # still no room where it is: says so, changes nothing
    assert rc == 2 and err.count("\n") == 1 and "nothing is lost" in err and "MB free" in err
    for read_only in (False, True):  # reading needs a small index file next to a -wal: no room for that either
        with pytest.raises(store.ProjectError, match="nothing is lost: the saved changes are in p.knproj-wal"):
            open_project(path, read_only=read_only)
    assert {name: sha(small_disk / name) for name in ("p.knproj", "p.knproj-wal")} == before  # SQLite may leave
    # an empty -shm index file behind
