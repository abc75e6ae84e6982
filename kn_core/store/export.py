"""`kn project export`: a project's facts, neuron sets, runs, edits and evaluations as JSON and CSV files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .errors import ProjectError
from .project import Project, open_project
from .records import record_to_dict


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json(path: Path, data) -> None:
    _write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _csv(path: Path, header: list[str], rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def export_project(project: Project | str | os.PathLike, out_dir, with_arrays: bool = False) -> dict:
    """Writes project.json, models.json, relations.json, facts.csv, runs.json, runs.csv, neuron_sets.json,
    neuron_sets.csv (one row per neuron), edits.json, evaluations.json into `out_dir` (created if needed).
    With `with_arrays`, also arrays/run<ID>_p<K>_<name>.npy (plain .npy). Returns {file: rows written}."""
    own = not isinstance(project, Project)
    proj = open_project(project, read_only=True) if own else project
    out = Path(out_dir)
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProjectError(out, f"cannot create the export folder ({exc.strerror})",
                               "choose a writable folder with --out") from exc
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
        for summary in proj.list_runs():
            run = proj.get_run(summary.id)
            runs.append(record_to_dict(run))
            if with_arrays:
                (out / "arrays").mkdir(exist_ok=True)
                for p in run.prompts:
                    for name in p.arrays:
                        np.save(out / "arrays" / f"run{run.id}_p{p.prompt_index}_{name}.npy",
                                proj.load_array(run.id, p.prompt_index, name), allow_pickle=False)
        _json(out / "runs.json", runs)
        _csv(out / "runs.csv", ["id", "fact_id", "model_id", "method", "status", "started_at", "finished_at",
                                "elapsed_s", "n_prompts", "n_done", "params"],
             ([r["id"], r["fact_id"], r["model_id"], r["method"], r["status"], r["started_at"], r["finished_at"],
               r["elapsed_s"], r["n_prompts"], r["n_done"], json.dumps(r["params"], sort_keys=True)] for r in runs))
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
    finally:
        if own:
            proj.close()
