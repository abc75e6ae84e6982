"""The project store: round trips, crash safety (kill -9), schema versions and every bad-input case."""

from __future__ import annotations

import argparse
import hashlib
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
    ProjectDiskFullError,
    ProjectExistsError,
    ProjectLockedError,
    ProjectNotFoundError,
    ProjectReadOnlyError,
    ProjectVersionError,
    create_project,
    open_or_create_project,
    open_project,
)
from kn_core.store import migrations, schema
from kn_core.cli.project import add_commands as add_project_commands

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("store_child.py")
SHAPE = (30, 1536)
MODEL = {"source": "default", "sha256": "a" * 64, "dtype": "float32", "family": "llama", "kind": "causal",
         "layers": 30, "neurons": 1536}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rand(seed, shape=SHAPE, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def facts_module():
    from kn_core import facts

    return facts


@pytest.fixture(autouse=True)
def no_fsync_per_commit(monkeypatch):
    # Power-loss durability (fsync per commit) costs ~10 ms a commit and is not what these tests check; the
    # kill -9 test's child keeps the default FULL.
    monkeypatch.setattr(store.database, "SYNCHRONOUS", "NORMAL")


@pytest.fixture
def proj_path(tmp_path):
    return tmp_path / "study.knproj"


def filled_project(path) -> dict:
    """Writes one of everything; returns what was written, for comparison."""
    facts = facts_module()
    rel = facts.Relation("P36", "capital of", ("The capital of [X] is [Y].", "[X]'s capital city is [Y]."))
    rel2 = facts.Relation("P19", "born in", ("[X] was born in [Y].",))
    fs = facts.FactSet("mini", {"P36": rel, "P19": rel2},
                       [facts.Fact("P36", "France", "Paris"), facts.Fact("P36", "Japan", "Tokyo"),
                        facts.Fact("P19", "Marie Curie", "Warsaw")])
    written = {"arrays": {}}
    with create_project(path, name="Study") as p:
        fact_ids = p.import_factset(fs)
        written["fact_ids"] = fact_ids
        model_id = p.add_model(MODEL)
        prompts = [{"text": "The capital of France is", "answer": " Paris", "answer_ids": [7042],
                    "template": rel.templates[0], "kind": "causal"},
                   {"text": "France's capital city is", "answer": " Paris", "answer_ids": [7042],
                    "template": rel.templates[1], "kind": "causal"}]
        params = {"steps": 20, "rule": "right", "method": "ig", "multi_token": "mean"}
        run = p.start_run(fact=fact_ids[0], prompts=prompts, params=params, model=model_id, device="cpu")
        for k in range(2):
            s, a = rand(k), rand(10 + k)
            written["arrays"][(run, k, "scores")] = s
            written["arrays"][(run, k, "activations")] = a
            p.add_prompt_result(run, k, scores=s, activations=a, prob=0.77 - k / 10, seconds=1.5,
                                completeness=[{"layer": 29, "sum": 0.5, "target": 0.52}])
        p.finish_run(run, elapsed_s=3.25)
        run16 = p.start_run(fact=fact_ids[1], prompts=["Japan's capital is"], params=params, model=MODEL)
        s16 = rand(99)
        p.add_prompt_result(run16, 0, scores=s16, float16=True)
        written["arrays"][(run16, 0, "scores")] = s16.astype(np.float16)
        p.finish_run(run16, "cancelled")
        written["runs"] = (run, run16)
        written["sets"] = [
            p.add_neuron_set("coarse", [(28, 5), (29, 100)], {"t": 0.2}, fact=fact_ids[0], run_ids=[run],
                             prompt_index=0, model=model_id),
            p.add_neuron_set("refined", [(29, 100)], {"t": 0.2, "p": 0.7}, fact=fact_ids[0], run_ids=[run]),
            p.add_neuron_set("relation", [(29, 100), (27, 3)], {"fraction": 0.1}, relation="P36"),
            p.add_neuron_set("user", np.array([[1, 2]]), name="my pick", note="hand-made"),
        ]
        state = {"version": 1, "cursor": 2, "entries": [
            {"edit": {"kind": "suppress", "neurons": [[29, 100]], "scope": "answer"}, "enabled": True},
            {"edit": {"kind": "amplify", "neurons": [[28, 5]], "scope": "all", "factor": 2.0}, "enabled": False},
            {"edit": {"kind": "erase", "neurons": [[27, 3]], "fill": "zero", "embedding": "input"}, "enabled": True},
        ]}
        p.save_edit_history(state, model=MODEL)
        written["state"] = state
        report = {"relations": {"P36": {"before": 0.77, "after": 0.5, "delta_pct": -35.1, "flipped": 1}},
                  "control": {"delta_pct": -0.3}}
        written["eval"] = p.add_evaluation("suppress", report, params={"scope": "answer"}, model=model_id,
                                           elapsed_s=2.0)
        written["report"] = report
        p.set_setting("view.threshold", {"t": 0.25})
    return written


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_everything(proj_path):
    w = filled_project(proj_path)
    assert sorted(os.listdir(proj_path.parent)) == [proj_path.name]  # closed = one self-contained file
    with open_project(proj_path) as p:
        assert p.info()["name"] == "Study" and p.info()["schema_version"] == schema.SCHEMA_VERSION
        rels = {r.key: r for r in p.list_relations()}
        assert rels["P36"].templates == ("The capital of [X] is [Y].", "[X]'s capital city is [Y].")
        assert rels["P19"].name == "born in"
        facts = p.list_facts()
        assert [(f.relation, f.subject, f.object) for f in facts] == [
            ("P36", "France", "Paris"), ("P36", "Japan", "Tokyo"), ("P19", "Marie Curie", "Warsaw")]
        assert [f.id for f in p.list_facts("P36")] == w["fact_ids"][:2] and p.list_facts("P99") == []
        assert p.list_runs(fact={"relation": "P99", "subject": "x", "object": "y"}) == []
        assert [r.id for r in p.list_runs(fact=w["fact_ids"][0])] == [w["runs"][0]]
        [m] = p.list_models()
        assert (m.source, m.sha256, m.dtype, m.layers, m.neurons) == ("default", "a" * 64, "float32", 30, 1536)
        run, run16 = w["runs"]
        r = p.get_run(run)
        assert (r.status, r.fact_id, r.model_id, r.device, r.elapsed_s, r.n_prompts, r.n_done) == \
            ("done", w["fact_ids"][0], m.id, "cpu", 3.25, 2, 2)
        assert r.params == {"steps": 20, "rule": "right", "method": "ig", "multi_token": "mean"}
        assert r.library_versions["numpy"] == np.__version__ and r.started_at <= r.finished_at
        assert r.prompts[0].prompt["answer_ids"] == [7042] and r.prompts[1].prob == pytest.approx(0.67)
        assert r.prompts[0].completeness == [{"layer": 29, "sum": 0.5, "target": 0.52}]
        assert r.prompts[0].arrays == ("scores", "activations")
        assert p.get_run(run16).status == "cancelled"
        for (rid, k, name), expected in w["arrays"].items():
            got = p.load_array(rid, k, name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert got.tobytes() == expected.tobytes()  # bitwise
        assert set(p.load_scores(run)) == {0, 1}
        sets = p.list_neuron_sets()
        assert [s.kind for s in sets] == ["coarse", "refined", "relation", "user"]
        assert sets[0].neurons == ((28, 5), (29, 100)) and sets[0].params == {"t": 0.2}
        assert sets[0].run_ids == (run,) and sets[0].prompt_index == 0 and sets[0].model_id == m.id
        assert sets[2].relation_id == rels["P36"].id and sets[3].note == "hand-made"
        assert [s.id for s in p.list_neuron_sets(kind="refined")] == [w["sets"][1]]
        state, model_sha = p.load_edit_history()
        assert state == w["state"] and model_sha == "a" * 64
        assert [e["applied"] for e in p.list_edits()] == [True, True, False]
        ev = p.get_evaluation(w["eval"])
        assert ev.report == w["report"] and ev.kind == "suppress" and ev.model_id == m.id
        assert p.get_setting("view.threshold") == {"t": 0.25} and p.get_setting("nope", 3) == 3
        c = p.counts()
        assert (c["facts"], c["runs"], c["score_arrays"], c["neuron_sets"], c["edits"], c["evaluations"]) == \
            (3, 2, 5, 4, 3, 1)
        assert p.check_integrity() == []


def test_facts_are_idempotent_and_runs_accept_dataclasses(proj_path):
    facts = facts_module()
    with create_project(proj_path) as p:
        f = facts.Fact("P36", "France", "Paris")
        assert p.add_fact(f) == p.add_fact({"relation": "P36", "subject": "France", "object": "Paris"})
        assert p.add_facts([f, facts.Fact("P36", "Peru", "Lima"), f]) == [1, 2, 1]
        assert p.find_fact("P36", "Peru", "Lima") == 2 and p.find_fact("P1", "a", "b") is None
        prompt = facts.Prompt("The capital of France is", " Paris", (7042,), "The capital of [X] is [Y].", f,
                              "causal")

        class Params:
            def to_dict(self):
                return {"steps": 4, "method": "activation"}

        class Result:  # shaped like attribution.PromptScores
            scores, activations, prob, completeness, seconds = rand(1), rand(2), 0.3, [], 0.1

        with p.recording_run(fact=f, prompts=[prompt], params=Params(), model=MODEL) as rec:
            rec.add(0, Result())
        [run] = p.list_runs()
        assert run.method == "activation" and run.status == "done" and run.n_done == 1
        assert p.get_run(run.id).prompts[0].prompt == {"text": "The capital of France is", "answer": " Paris",
                                                       "answer_ids": [7042],
                                                       "template": "The capital of [X] is [Y].", "kind": "causal"}
        with pytest.raises(RuntimeError):
            with p.recording_run(fact=f, prompts=["x"], params={}, model=MODEL):
                raise RuntimeError("boom")
        assert p.list_runs(status="failed")[0].error == "RuntimeError: boom"
        with pytest.raises(ProjectDataError, match="no run with id 99"):
            p.add_prompt_result(99, 0, scores=rand(0))
        p.delete_run(run.id)
        assert [r.status for r in p.list_runs()] == ["failed"]


def test_completed_runs_are_what_a_resumed_attribution_skips(proj_path):
    params = {"steps": 20, "method": "ig", "t": 0.2}
    with create_project(proj_path) as p:
        f1, f2, f3, f4 = p.add_facts([{"relation": "P1", "subject": s, "object": "o"} for s in "abcd"])

        def run(fact, prompts=2, done=2, status="done", model=MODEL, run_params=params):
            rid = p.start_run(fact=fact, prompts=["x"] * prompts, params=run_params, model=model)
            for k in range(done):
                p.add_prompt_result(rid, k, scores=rand(k, (2, 3)))
            p.finish_run(rid, status)
            return rid

        run(f1)
        latest = run(f1)
        run(f2, done=1)  # "done" but a prompt never stored: not complete
        run(f3, status="cancelled")
        run(f4, run_params={**params, "steps": 50})
        other = run(f4, model={**MODEL, "sha256": "b" * 64})
        assert p.completed_runs(MODEL, params) == {f1: latest}
        assert p.completed_runs({**MODEL, "source": "elsewhere"}, params) == {f1: latest}  # same weights
        assert p.completed_runs({**MODEL, "dtype": "bfloat16"}, params) == {}
        assert p.completed_runs({**MODEL, "sha256": "b" * 64}, params) == {f4: other}
        assert p.completed_runs({"source": "default", "dtype": "float32"}, params) == {}  # unknown weights
        assert p.completed_runs(1, {**params, "steps": 50}) == {f4: 5}
        assert p.completed_runs(99, params) == {}
    before = sha(proj_path)
    with open_project(proj_path, read_only=True) as p:
        assert p.completed_runs(MODEL, params) == {f1: latest}
    assert sha(proj_path) == before


def test_atomic_commits_everything_inside_once_or_nothing(proj_path):
    """`Project.atomic`: the saves inside commit together (once, nested blocks included, reads inside seeing them)
    or, on an exception (a rejected save among them too), none of them."""
    from sqlalchemy import event

    with create_project(proj_path) as p:
        fact = p.add_fact({"relation": "P1", "subject": "a", "object": "o"})
        commits = []
        event.listen(p._db._engine, "commit", lambda conn: commits.append(1))
        with p.atomic("storing a fact"):
            run = p.start_run(fact=fact, prompts=["x", "y"], params={"steps": 2}, model=MODEL)
            with p.atomic("nested"):
                p.add_prompt_result(run, 0, scores=rand(0, (2, 3)))
            p.add_prompt_result(run, 1, scores=rand(1, (2, 3)))
            p.finish_run(run)
            assert p.get_run(run).n_done == 2  # a read inside sees the block's saves
            p.add_neuron_set("refined", [(1, 2)], fact=fact, run_ids=[run])
        assert len(commits) == 1
        with pytest.raises(RuntimeError, match="stop"):
            with p.atomic("storing another"):
                p.start_run(fact=fact, prompts=["x"], params={"steps": 2}, model=MODEL)
                p.add_neuron_set("user", [(0, 0)])
                raise RuntimeError("stop")
        with pytest.raises(ProjectDataError, match="no run with id 99"):
            with p.atomic("storing a third"):
                p.add_neuron_set("user", [(0, 1)])
                p.add_prompt_result(99, 0, scores=rand(2, (2, 3)))
        assert [(r.id, r.status, r.n_done) for r in p.list_runs()] == [(run, "done", 2)]
        assert [s.kind for s in p.list_neuron_sets()] == ["refined"]
        p.add_neuron_set("user", [(0, 2)])  # the project goes on saving after a rolled-back block
    with open_project(proj_path, read_only=True) as p:
        assert [s.kind for s in p.list_neuron_sets()] == ["refined", "user"] and p.check_integrity() == []


def test_edit_history_applies_only_to_the_same_weights(proj_path):
    with create_project(proj_path) as p:
        assert p.edit_history_applies("b" * 64)  # nothing saved: nothing to refuse
        p.save_edit_history([{"kind": "suppress", "neurons": [(1, 2)], "params": {"scope": "answer"}}],
                            model=MODEL)
    with open_project(proj_path) as p:
        state, model_sha = p.load_edit_history()
        assert model_sha == "a" * 64 and state["cursor"] == 1
        assert state["entries"][0]["edit"] == {"kind": "suppress", "neurons": [[1, 2]], "scope": "answer"}
        ok = p.edit_history_applies("a" * 64)
        assert ok and ok.ok
        check = p.edit_history_applies("b" * 64)
        assert not check and "kept but not applied" in check.reason
        assert p.load_edit_history()[0] == state  # the history is kept


def test_edit_stack_state_round_trips(proj_path):
    from kn_core import edits
    state = {"version": 1, "cursor": 1, "entries": [
        {"edit": {"kind": "suppress", "neurons": [[0, 1]], "scope": "answer"}, "enabled": True},
        {"edit": {"kind": "amplify", "neurons": [[0, 2]], "scope": "answer", "factor": 2.0}, "enabled": True}]}
    with create_project(proj_path) as p:
        p.save_edit_history(state, model=MODEL)
    with open_project(proj_path, read_only=True) as p:
        loaded, _ = p.load_edit_history()
    assert loaded == state
    for entry in loaded["entries"]:
        assert edits.edit_from_dict(entry["edit"]).to_dict() == entry["edit"]


def test_read_only_open_refuses_writes_and_cli(proj_path, tmp_path, capsys):
    filled_project(proj_path)
    before = sha(proj_path)
    with open_project(proj_path, read_only=True) as p:
        assert p.counts()["facts"] == 3
        with pytest.raises(ProjectReadOnlyError, match="opened read-only"):
            p.add_fact({"relation": "P1", "subject": "a", "object": "b"})
    parser = argparse.ArgumentParser(prog="kn")
    add_project_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["project", "info", str(proj_path), "--json", "--check"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["counts"]["runs"] == 2
    assert doc["counts"]["facts"] == 3 and doc["integrity"] == ["ok"]
    out = tmp_path / "export"
    args = parser.parse_args(["project", "export", str(proj_path), "--out", str(out), "--json", "--arrays"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["written"]["facts.csv"] == 3
    assert (out / "facts.csv").read_text().splitlines()[1] == "1,P36,France,Paris"
    runs = json.loads((out / "runs.json").read_text())
    assert runs[0]["params"]["steps"] == 20 and runs[0]["prompts"][0]["prob"] == pytest.approx(0.77)
    assert json.loads((out / "edits.json").read_text())["state"]["cursor"] == 2
    assert "29,100" in (out / "neuron_sets.csv").read_text()
    assert np.array_equal(np.load(out / "arrays" / "run1_p0_scores.npy"), rand(0))
    args = parser.parse_args(["project", "info", str(tmp_path / "missing.knproj"), "--json"])
    assert args.func(args) == 2
    assert "no such project file" in json.loads(capsys.readouterr().out)["error"]
    assert sha(proj_path) == before  # info and export never write


def test_open_or_create(proj_path):
    with open_or_create_project(proj_path) as p:
        p.add_fact({"relation": "P1", "subject": "a", "object": "b"})
    with open_or_create_project(proj_path) as p:
        assert len(p.list_facts()) == 1
    with pytest.raises(ProjectExistsError, match=str(proj_path)):
        create_project(proj_path)


# ------------------------------------------------------------------------------------------ crash safety


def test_kill_9_mid_run_loses_nothing_committed(proj_path):
    child = subprocess.Popen([sys.executable, str(CHILD), "attribute", str(proj_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
    committed = -1
    try:
        deadline = time.monotonic() + 30
        while committed < 4 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("committed"):
                committed = int(line.split()[1])
        assert committed >= 4, child.stderr.read()
        child.send_signal(signal.SIGKILL)  # mid-run: no close, no finish_run, maybe mid-transaction
    finally:
        child.kill()
        child.wait()
    assert Path(str(proj_path) + "-wal").exists()  # it really died with an open WAL
    sys.path.insert(0, str(CHILD.parent))
    try:
        import store_child
    finally:
        sys.path.remove(str(CHILD.parent))
    with open_project(proj_path) as p:
        run1, run2 = p.list_runs()
        assert run1.status == "done" and run1.n_done == 5
        for k in range(5):
            assert p.load_array(run1.id, k).tobytes() == store_child.scores(1, k).tobytes()
            assert np.array_equal(p.load_array(run1.id, k, "activations"), store_child.scores(1, k) * 2)
        assert run2.status == "interrupted" and "process stopped" in run2.error
        assert committed + 1 <= run2.n_done <= committed + 2  # everything reported committed is there
        for k, arr in p.load_scores(run2.id).items():
            assert arr.tobytes() == store_child.scores(2, k).tobytes()
        assert p.check_integrity() == []
    with open_project(proj_path, read_only=True) as p:
        assert [r.status for r in p.list_runs()] == ["done", "interrupted"]


# ------------------------------------------------------------------------------------------ schema versions


def test_older_project_is_backed_up_then_upgraded(proj_path, monkeypatch):
    filled_project(proj_path)
    original = sha(proj_path)

    def add_tags(conn):
        conn.exec_driver_sql("CREATE TABLE tags (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
        conn.exec_driver_sql("ALTER TABLE facts ADD COLUMN note TEXT DEFAULT ''")

    monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(migrations.MIGRATIONS, 1, ("tags table; facts.note", add_tags))
    with pytest.raises(ProjectVersionError, match="older version"):
        open_project(proj_path, read_only=True)
    with open_project(proj_path) as p:
        assert p.info()["schema_version"] == 2
        assert [m["version"] for m in p.info()["migrations"]] == [1, 2]
        assert len(p.list_facts()) == 3 and p.get_run(1).status == "done"
    [backup] = [f for f in proj_path.parent.iterdir() if ".v1-backup-" in f.name]
    con = sqlite3.connect(backup)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM facts").fetchone()[0] == 3
    con.close()
    assert sha(proj_path) != original


def test_failed_upgrade_leaves_the_file_as_it_was(proj_path, monkeypatch):
    filled_project(proj_path)

    def broken(conn):
        conn.exec_driver_sql("CREATE TABLE tags (id INTEGER PRIMARY KEY)")
        raise RuntimeError("step bug")

    monkeypatch.setattr(schema, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(migrations.MIGRATIONS, 1, ("broken", broken))
    with pytest.raises(store.ProjectError, match="left as it was"):
        open_project(proj_path)
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    with open_project(proj_path) as p:  # still a valid v1 project, without the half-made table
        assert p.info()["schema_version"] == 1 and p.check_integrity() == []
        tables = {r[0] for r in p._con.execute("SELECT name FROM sqlite_master")}
        assert "tags" not in tables


def test_newer_schema_is_refused_untouched(proj_path):
    filled_project(proj_path)
    con = sqlite3.connect(proj_path)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    before = sha(proj_path)
    for read_only in (False, True):
        with pytest.raises(ProjectVersionError) as err:
            open_project(proj_path, read_only=read_only)
        assert str(proj_path) in str(err.value) and "newer version" in str(err.value)
        assert "update the app" in str(err.value)
    assert sha(proj_path) == before


# ------------------------------------------------------------------------------------------ bad input


def assert_refused(path, error, match, read_only=False):
    existed = Path(path).is_file()
    before = sha(path) if existed else None
    with pytest.raises(error, match=match) as err:
        open_project(path, read_only=read_only)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and ";" in message  # names the file and the fix
    if existed:
        assert sha(path) == before
    return message


def test_missing_file_and_folder(tmp_path):
    assert_refused(tmp_path / "nope.knproj", ProjectNotFoundError, "no such project file")
    assert_refused(tmp_path, ProjectNotFoundError, "is a folder")


def test_not_a_sqlite_file(tmp_path):
    text = tmp_path / "notes.knproj"
    text.write_text("this is not a database\n" * 20)
    assert_refused(text, NotAProjectError, "not a SQLite file")
    empty = tmp_path / "empty.knproj"
    empty.write_bytes(b"")
    assert_refused(empty, NotAProjectError, "not a SQLite file")


def test_sqlite_file_that_is_not_a_project(tmp_path):
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE stuff (x)")
    con.execute("INSERT INTO stuff VALUES (1)")
    con.commit()
    con.close()
    assert_refused(other, NotAProjectError, "not a Knowledge Neuron Studio project")
    assert_refused(other, NotAProjectError, "not a Knowledge Neuron Studio project", read_only=True)


def test_truncated_project(proj_path):
    filled_project(proj_path)
    data = proj_path.read_bytes()
    proj_path.write_bytes(data[: len(data) // 2])
    assert_refused(proj_path, CorruptProjectError, "truncated")
    proj_path.write_bytes(data[:60])
    assert_refused(proj_path, CorruptProjectError, "header is damaged")


def test_corrupted_project(proj_path):
    filled_project(proj_path)
    data = bytearray(proj_path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[100:page] = b"\xa5" * (page - 100)  # page 1 below the header: the schema table
    proj_path.write_bytes(bytes(data))
    assert_refused(proj_path, CorruptProjectError, "damaged")


def test_corrupted_score_array_is_reported_not_returned(proj_path):
    filled_project(proj_path)
    with open_project(proj_path) as p:
        blob = p._con.execute("SELECT data FROM score_arrays WHERE run_id = 1 AND prompt_index = 0 "
                              "AND name = 'scores'").fetchone()[0]
    data = bytearray(proj_path.read_bytes())
    at = data.find(blob[1000:1064])
    assert at > 0
    data[at + 10] ^= 0xFF
    proj_path.write_bytes(bytes(data))
    with open_project(proj_path) as p:
        with pytest.raises(CorruptProjectError, match=r"run 1 prompt 0 scores: .*CRC-32") as err:
            p.load_array(1, 0)
        assert str(proj_path) in str(err.value)
        assert p.load_array(1, 1).tobytes() == rand(1).tobytes()  # the rest is fine
        assert any("run 1 prompt 0 scores" in problem for problem in p.check_integrity())


def test_locked_by_another_process(proj_path):
    filled_project(proj_path)
    child = subprocess.Popen([sys.executable, str(CHILD), "hold", str(proj_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout.readline().strip() == "open", child.stderr.read()
        message = assert_refused(proj_path, ProjectLockedError, "open in another process")
        assert "close it there" in message
        with open_project(proj_path, read_only=True) as reader:  # a reader reads the holder's last commit
            assert len(reader.list_facts()) == 3 and reader.info()["read_while_written"]
    finally:
        child.kill()
        child.wait()
    with open_project(proj_path) as p:  # the lock died with its holder
        assert len(p.list_facts()) == 3


def test_locked_within_one_process(proj_path):
    filled_project(proj_path)
    with open_project(proj_path):
        with pytest.raises(ProjectLockedError):
            open_project(proj_path)


def test_read_only_location(tmp_path):
    folder = tmp_path / "cdrom"
    folder.mkdir()
    path = folder / "p.knproj"
    with create_project(path) as p:
        p.add_fact({"relation": "P1", "subject": "a", "object": "b"})
    before = sha(path)
    folder.chmod(0o555)
    path.chmod(0o444)
    try:
        if os.geteuid() != 0:
            msg = assert_refused(path, ProjectReadOnlyError, "read-only")
            assert "writable folder" in msg
            with open_project(path, read_only=True) as p:
                assert len(p.list_facts()) == 1
            with pytest.raises(ProjectReadOnlyError, match="cannot create"):
                create_project(folder / "new.knproj")
        else:  # root ignores permissions: ask as an unprivileged user
            tmp_path.chmod(0o755)
            try:
                result = subprocess.run([sys.executable, str(CHILD), "try_open", str(path)], capture_output=True,
                                        text=True, env=child_env(), preexec_fn=lambda: os.setuid(65534), cwd="/")
            except OSError:  # this Python lives where the unprivileged user cannot reach it
                result = None
            if result is not None and result.returncode == 0:
                out = json.loads(result.stdout)
                assert out["False"]["type"] == "ProjectReadOnlyError" and str(path) in out["False"]["message"]
                assert "writable folder" in out["False"]["message"]
                assert out["True"] == {"ok": True, "facts": 1}
            else:  # emulate what os.access says to an ordinary user; the rest is the real code path
                real_access = os.access
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode))
                    msg = assert_refused(path, ProjectReadOnlyError, "read-only")
                    assert "writable folder" in msg
                    with pytest.raises(ProjectReadOnlyError, match="cannot create"):
                        create_project(folder / "new.knproj")
                with open_project(path, read_only=True) as p:
                    assert len(p.list_facts()) == 1
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert sha(path) == before
    assert sorted(os.listdir(folder)) == ["p.knproj"]


def test_disk_full_rolls_back_and_keeps_the_project(proj_path):
    filled_project(proj_path)
    with open_project(proj_path) as p:
        run = p.start_run(fact=1, prompts=["a", "b"], params={}, model=MODEL)
        p.add_prompt_result(run, 0, scores=rand(5))
        pages = p._con.execute("PRAGMA page_count").fetchone()[0]
        p._con.execute(f"PRAGMA max_page_count = {pages + 2}")  # the drive fills up (SQLITE_FULL)
        with pytest.raises(ProjectDiskFullError) as err:
            p.add_prompt_result(run, 1, scores=rand(6), activations=rand(7))
        assert str(proj_path) in str(err.value) and "free space" in str(err.value)
        assert p.get_run(run).n_done == 1  # nothing of the failed transaction is left
        p._con.execute("PRAGMA max_page_count = 1073741823")
        p.add_prompt_result(run, 1, scores=rand(6))  # space again: carries on
        p.finish_run(run)
    with open_project(proj_path) as p:
        assert p.get_run(run).n_done == 2 and p.load_array(run, 1).tobytes() == rand(6).tobytes()
        assert p.check_integrity() == []


def test_create_refuses_missing_folder_and_leaves_no_temp_files(tmp_path):
    with pytest.raises(ProjectNotFoundError, match="folder does not exist"):
        create_project(tmp_path / "no" / "p.knproj")
    assert list(tmp_path.iterdir()) == []


def test_closed_project_cannot_be_used(proj_path):
    p = create_project(proj_path)
    p.close()
    with pytest.raises(store.ProjectClosedError):
        p.list_facts()
