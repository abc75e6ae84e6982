"""`kn project export`: a project's facts, neuron sets, runs, edits and evaluations as JSON and CSV files."""

from __future__ import annotations

import csv
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..jsonio import dumps
from ..validation import csv_row
from .errors import ProjectError
from .project import Project, open_project
from .records import record_to_dict
from .topscores import TopScores


# what one export writes: an existing folder holding only these (an earlier export) is replaced
_EXPORT_ENTRIES = {"project.json", "models.json", "relations.json", "facts.csv", "runs.json", "runs.csv",
                   "neuron_sets.json", "neuron_sets.csv", "edits.json", "evaluations.json", "arrays"}


def safe_name(name: str) -> str:
    """A stored name as one plain file-name part: no separators, no `..`, no control or odd characters."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name)).replace("..", "_").lstrip(".")
    return cleaned[:100] or "_"


def _json(path: Path, data) -> None:
    """Strict JSON (a stored NaN, e.g. in an evaluation report, becomes null with a note; kn_core.jsonio)."""
    path.write_text(dumps(data, indent=2) + "\n", encoding="utf-8")


def _csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(csv_row(row) for row in rows)  # fact texts starting with = + - @ stay text in a spreadsheet


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ProjectError(out, "the export target is a file, not a folder", "choose a new folder with --out")
    if out.is_dir():
        extra = sorted(e.name for e in out.iterdir() if e.name not in _EXPORT_ENTRIES)
        if extra:
            raise ProjectError(out, f"the export folder already holds other files ({', '.join(extra[:3])}"
                                    f"{', ...' if len(extra) > 3 else ''})",
                               "choose a new or empty folder with --out (an earlier export is replaced)")


def move_into_place(tmp: Path, out: Path) -> None:
    """Renames the finished temporary folder to `out`; an earlier export there is swapped out, then removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_project(project: Project | str | os.PathLike, out_dir, with_arrays: bool = False) -> dict:
    """Writes project.json, models.json, relations.json, facts.csv, runs.json, runs.csv, neuron_sets.json,
    neuron_sets.csv (one row per neuron), edits.json, evaluations.json into `out_dir` (created if needed).
    With `with_arrays`, also arrays/run<ID>_p<K>_<name>.npy (plain .npy; names cleaned by `safe_name`).
    Everything is written into a temporary folder next to `out_dir`, then renamed into place, so a failure
    (disk full, a bad file) leaves no half-written export; an earlier export in `out_dir` is replaced, a folder
    holding anything else is refused. Returns {file: rows written}."""
    own = not isinstance(project, Project)
    proj = open_project(project, read_only=True) if own else project
    out = Path(out_dir).expanduser().absolute()
    tmp = out.with_name(f".{out.name}.exporting-{os.getpid()}")
    try:
        _check_target(out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            written = _write_all(proj, tmp, with_arrays)
            move_into_place(tmp, out)
        except OSError as exc:
            raise ProjectError(out, f"cannot write the export ({exc.strerror or exc}); nothing was left half-written",
                               "choose a writable folder with room with --out") from exc
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own:
            proj.close()


def _write_all(proj: Project, out: Path, with_arrays: bool) -> dict[str, int]:
    written: dict[str, int] = {}
    info = {**proj.info(), "counts": proj.counts()}
    _json(out / "project.json", info)
    written["project.json"] = 1
    models = [record_to_dict(m) for m in proj.list_models()]
    _json(out / "models.json", models)
    written["models.json"] = len(models)
    relations = [record_to_dict(r) for r in proj.list_relations()]
    _json(out / "relations.json", relations)
    written["relations.json"] = len(relations)
    facts = proj.list_facts()
    _csv(out / "facts.csv", ["id", "relation", "subject", "object"],
         ([f.id, f.relation, f.subject, f.object] for f in facts))
    written["facts.csv"] = len(facts)
    runs = []
    used: set[str] = set()
    for summary in proj.list_runs():
        run = proj.get_run(summary.id)
        runs.append(record_to_dict(run))
        if with_arrays:
            (out / "arrays").mkdir(exist_ok=True)
            for p in run.prompts:
                for name in p.arrays:
                    stem = f"run{run.id}_p{p.prompt_index}_{safe_name(name)}"
                    file, k = f"{stem}.npy", 1
                    while file in used:  # two names that clean to the same text
                        k += 1
                        file = f"{stem}-{k}.npy"
                    used.add(file)
                    stored = proj.load_stored(run.id, p.prompt_index, name)
                    if isinstance(stored, TopScores):  # indices into the flattened shape, values, what was kept
                        np.savez(out / "arrays" / file.replace(".npy", ".top.npz"), shape=np.array(stored.shape),
                                 indices=stored.indices, values=stored.values,
                                 bound=stored.bound, floor=stored.floor, guard=stored.guard)
                    else:
                        np.save(out / "arrays" / file, stored, allow_pickle=False)
    _json(out / "runs.json", runs)
    _csv(out / "runs.csv", ["id", "fact_id", "model_id", "method", "status", "started_at", "finished_at",
                            "elapsed_s", "n_prompts", "n_done", "params"],
         ([r["id"], r["fact_id"], r["model_id"], r["method"], r["status"], r["started_at"], r["finished_at"],
           r["elapsed_s"], r["n_prompts"], r["n_done"], dumps(r["params"], sort_keys=True)] for r in runs))
    written["runs.json"] = len(runs)
    sets = proj.list_neuron_sets()
    _json(out / "neuron_sets.json", [record_to_dict(s) for s in sets])
    _csv(out / "neuron_sets.csv", ["set_id", "name", "kind", "fact_id", "relation_id", "layer", "neuron"],
         ([s.id, s.name, s.kind, s.fact_id, s.relation_id, layer, neuron] for s in sets
          for layer, neuron in s.neurons))
    written["neuron_sets.json"] = len(sets)
    state, sha = proj.load_edit_history()
    _json(out / "edits.json", {"model_sha256": sha, "state": state, "rows": proj.list_edits()})
    written["edits.json"] = len(state["entries"])
    evals = [record_to_dict(e) for e in proj.list_evaluations()]
    _json(out / "evaluations.json", evals)
    written["evaluations.json"] = len(evals)
    return written
