"""Saving and opening projects through kn_core.store. Runs in the worker thread on plain snapshots."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kn_core.attribution import PromptScores
from kn_core.facts import Fact, FactSet, Prompt, Relation

from .session import NeuronSet, Run, fact_key

GUI_SETTING = "gui.state"


def snapshot(session, edit_state: dict | None, model_info, reports: list) -> dict:
    """Everything to save, captured in the main thread (the worker never reads live GUI state)."""
    runs = [(run.fact, list(run.prompts), list(run.scores), dict(run.params), dict(run.model), run.seconds,
             run.complete) for run in session.runs.values() if run.scores]
    return {
        "factset": session.factset,
        "runs": runs,
        "sets": [NeuronSet(s.name, s.kind, list(s.neurons), s.source) for s in session.neuron_sets.values()],
        "edit_state": edit_state,
        "reports": reports,
        "model": model_info,
        "gui": {"t": session.t, "p": session.p,
                "checks": [[list(k[0]), k[1], v] for k, v in session.checks.items()]},
    }


def save_project(path: str, snap: dict, ctx=None) -> str:
    from kn_core.store import create_project

    path = str(Path(path).expanduser())
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{int(time.time() * 1000)}.saving.knproj")
    project = create_project(tmp, name=Path(path).stem)
    try:
        fs: FactSet = snap["factset"]
        project.set_setting("factset.name", fs.name)
        for relation in fs.relations.values():
            project.add_relation(relation)
        project.add_facts(fs.facts, fs.relations)
        n = max(1, len(snap["runs"]))
        for i, (fact, prompts, scores, params, model, seconds, complete) in enumerate(snap["runs"]):
            if ctx is not None:
                ctx.progress(i / n, f"saving run {i + 1}/{n}")
            run_id = project.start_run(fact=fact, prompts=prompts, params=params, model=model or None,
                                       info={"complete": complete})
            for k, ps in enumerate(scores):
                project.add_prompt_result(run_id, k, ps)
            project.finish_run(run_id, "done" if complete else "cancelled", elapsed_s=seconds)
        for s in snap["sets"]:
            fact = None
            project.add_neuron_set(s.kind if s.kind in ("coarse", "refined", "relation", "user") else "user",
                                   s.neurons, params={"source": s.source}, name=s.name, fact=fact)
        if snap["edit_state"] is not None and snap["edit_state"].get("entries"):
            state = dict(snap["edit_state"])
            state["entries"] = [dict(e, report=r) for e, r in zip(state["entries"], snap["reports"])]
            project.save_edit_history(state, model=snap["model"])
        project.set_setting(GUI_SETTING, snap["gui"])
    finally:
        project.close()
    os.replace(tmp, path)
    return path


def _prompt_from(d: dict, fact: Fact) -> Prompt:
    return Prompt(text=d.get("text", ""), answer=d.get("answer", ""), answer_ids=tuple(d.get("answer_ids", ())),
                  template=d.get("template", ""), fact=fact, kind=d.get("kind", ""))


def open_project_file(path: str, ctx=None) -> dict:
    from kn_core.store import open_project

    project = open_project(path, read_only=True)
    try:
        relations = {r.key: Relation(r.key, r.name, tuple(r.templates)) for r in project.list_relations()}
        fact_records = project.list_facts()
        facts_by_id = {f.id: Fact(f.relation, f.subject, f.object) for f in fact_records}
        name = project.get_setting("factset.name", Path(path).stem)
        factset = FactSet(name, relations, [facts_by_id[f.id] for f in fact_records])
        runs = {}
        records = project.list_runs()
        for i, rec in enumerate(records):
            if ctx is not None:
                ctx.progress(i / max(1, len(records)), f"reading run {i + 1}/{len(records)}")
            fact = facts_by_id.get(rec.fact_id)
            if fact is None:
                continue
            full = project.get_run(rec.id)
            scores = project.load_scores(rec.id, "scores")
            acts = project.load_scores(rec.id, "activations")
            prompts = [_prompt_from(p.prompt, fact) for p in full.prompts]
            results = []
            for p in full.prompts:
                if p.prompt_index not in scores:
                    break
                d = p.prompt
                results.append(PromptScores(
                    prompt=d.get("text", ""), answer=d.get("answer", ""), answer_ids=tuple(d.get("answer_ids", ())),
                    scores=scores[p.prompt_index], activations=acts.get(p.prompt_index, scores[p.prompt_index] * 0),
                    prob=p.prob if p.prob is not None else float("nan"), token_probs=[],
                    completeness=p.completeness or [], seconds=p.seconds or 0.0, params=dict(rec.params)))
            model = {}
            if rec.model_id is not None:
                for m in project.list_models():
                    if m.id == rec.model_id:
                        model = dict(m.info) or {"source": m.source, "sha256": m.sha256}
            runs[fact_key(fact)] = Run(fact=fact, prompts=prompts, scores=results, params=dict(rec.params),
                                       model=model, seconds=rec.elapsed_s or 0.0,
                                       complete=bool(rec.info.get("complete", rec.status == "done")),
                                       store_id=rec.id)
        sets = [NeuronSet(r.name or f"set {r.id}", r.kind, [tuple(n) for n in r.neurons],
                          (r.params or {}).get("source", "")) for r in project.list_neuron_sets()]
        edit_state, edit_sha = project.load_edit_history()
        gui = project.get_setting(GUI_SETTING, {}) or {}
    finally:
        project.close()
    checks = {}
    for key, template, value in gui.get("checks", []):
        checks[(tuple(key), template)] = value
    return {"factset": factset, "runs": runs, "sets": sets, "edit_state": edit_state, "edit_sha": edit_sha,
            "t": gui.get("t", 0.2), "p": gui.get("p", 0.7), "checks": checks, "path": path}
