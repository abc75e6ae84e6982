"""`kn bench`: knowledge-neuron edits on the field's benchmark cases, scored by a protocol, beside controls.

For each case of a seeded sample (`sample_cases`): the knowledge neurons of its rewrite prompt and paraphrases
(integrated gradients, cached per prompt under OUT/cache as `kn reproduce` caches them; the paper's refinement
needs >= 3 prompts, so the paraphrases are among the prompts that find the neurons: the paraphrase score is not
held out), massive-activation neurons left out as `kn neurons` leaves them out; the edit (`edit_plan.plan_edit`):
an update runs twice, with the paper's lambdas and calibrated (`calibrate_update`, on the same prompts), each
beside its random-neuron control; suppress and amplify run once beside theirs. Every condition's rows are
measured on the case's prompt groups (`protocols.case_prompts`) and scored by `protocols.score_case`; weight
edits also generate text from the generation prompts (sampled as ROME samples, top-k 5) for fluency.

Resumable: each finished case is a JSON file under OUT/cases named by the case and the run's settings, so a
killed run started again with the same arguments goes on where it stopped. The report (report.json, report.md,
report.html through `reproduce.html`) is rewritten after every case.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .encoding import text_ids
from .field_formats import EditCase, FieldFile
from .selection import DEFAULT_P, DEFAULT_T
from .tasks import as_task

EDITS = ("suppress", "amplify", "update")
GEN_TOP_K = 5  # ROME's generate_fast samples from the top 5 tokens


@dataclass(frozen=True)
class BenchSettings:
    edit: str = "update"
    protocol: str = "rome"
    cases: int = 100
    seed: int = 0
    t: float = DEFAULT_T
    p: float = DEFAULT_P
    gen_tokens: int = 40  # new tokens per generation prompt (ROME: up to 100 tokens in all)
    generation_prompts: int = 2  # per case (ROME uses all of CounterFact's, usually 10)
    keep_massive: bool = False

    def key(self, lm, params) -> str:
        data = [lm.sha256, self.edit, self.protocol, self.seed, self.t, self.p, self.gen_tokens,
                self.generation_prompts, self.keep_massive, params.to_dict()]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def sample_cases(cases: list[EditCase], n: int, seed: int) -> list[EditCase]:
    """n cases drawn without replacement with `seed` (all of them when there are fewer), in the order drawn, so
    that a run stopped early has measured a random subsample, not the first relations of the file."""
    chosen = np.random.default_rng(seed).permutation(len(cases))[:n]
    return [cases[int(i)] for i in chosen]


# --------------------------------------------------------------------------------------------------------
# PARAREL -> CounterFact-form cases
# --------------------------------------------------------------------------------------------------------

def _prefix(template: str) -> str | None:
    """The template's text before [Y] with {} for the subject (CounterFact's prompt form); None when the
    subject does not come before the object."""
    before = template.split("[Y]", 1)[0].rstrip()
    return before.replace("[X]", "{}", 1) if "[X]" in before and before.strip() != "[X]" else None


def pararel_to_counterfact(factset, per_relation: int | None = None, seed: int = 0, neighbours: int = 10,
                           max_paraphrases: int | None = None, min_prompts: int = 3) -> tuple[list[dict], list[dict]]:
    """CounterFact-form records from a fact set: per fact, the new target is another object of the relation
    (seeded), the rewrite prompt its first template whose subject comes before the object, the paraphrases its
    other such templates, the neighbourhood prompts other subjects of the relation with the same object (up to
    `neighbours`, seeded), the attribute prompts subjects whose object is the new target, the generation prompts
    the rewrite prompt and the first paraphrase. `per_relation`: a seeded sample of facts per relation;
    `max_paraphrases`: the first N other templates (CounterFact has 2); `min_prompts`: relations with fewer
    usable templates are left out (the paper's refinement needs 3 prompts to find neurons).
    Returns (records, left out with reasons)."""
    rng = np.random.default_rng(seed)
    records, left = [], []
    for rid, relation in factset.relations.items():
        prefixes = list(dict.fromkeys(p for p in map(_prefix, relation.templates) if p))
        dropped = [t for t in relation.templates if not _prefix(t)]
        if dropped:
            left.append({"relation": rid, "what": f"{len(dropped)} template(s)", "reason": "the subject does not "
                         "come before the object, so the template gives no CounterFact prompt"})
        facts = factset.facts_of(rid)
        objects = sorted({f.object for f in facts})
        prefixes = prefixes[: 1 + max_paraphrases] if max_paraphrases is not None else prefixes
        if len(prefixes) < max(min_prompts, 1) or len(objects) < 2:
            left.append({"relation": rid, "what": f"{len(facts)} fact(s)", "reason": (
                f"{len(prefixes)} usable template(s), fewer than {min_prompts} (refined neurons need that many "
                "prompts)" if len(prefixes) < max(min_prompts, 1) else "a single object: no other object to rewrite to")})
            continue
        order = rng.permutation(len(facts))
        chosen = [facts[int(i)] for i in (order[:per_relation] if per_relation else order)]
        by_object: dict[str, list[str]] = {}
        for f in facts:
            by_object.setdefault(f.object, []).append(f.subject)
        for fact in sorted(chosen, key=facts.index):
            others = [o for o in objects if o != fact.object]
            new = others[int(rng.integers(len(others)))]
            near = [s for s in by_object[fact.object] if s != fact.subject]
            near = [near[int(i)] for i in rng.permutation(len(near))[:neighbours]]
            attr = [by_object[new][int(i)] for i in rng.permutation(len(by_object[new]))[:neighbours]]
            prompt = prefixes[0]
            records.append({
                "case_id": len(records), "pararel_relation": rid,
                "requested_rewrite": {"prompt": prompt, "relation_id": rid, "subject": fact.subject,
                                      "target_new": {"str": new}, "target_true": {"str": fact.object}},
                "paraphrase_prompts": [p.format(fact.subject) for p in prefixes[1:]],
                "neighborhood_prompts": [prompt.format(s) for s in near],
                "attribute_prompts": [prompt.format(s) for s in attr],
                "generation_prompts": [p.format(fact.subject) for p in prefixes[:2]]})
    return records, left


# --------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------

def _neurons(lm, case: EditCase, params, settings: BenchSettings, cache: Path, task):
    """The case's knowledge neurons found on its rewrite prompt and paraphrases (with o), the prompts used, and the
    rule that chose them (neurons.case_neurons: the paper's refinement from 3 prompts, coarse in every prompt below)."""
    from .batch_requests import locality_prompts
    from .neurons import case_neurons, run_flags
    from .reproduce.pipeline import attribute_cached

    skipped: list = []
    prompts = locality_prompts(lm, [(t, case.target_true) for t in (case.prompt, *case.paraphrases)], skipped)
    scores = []
    for k, prompt in enumerate(prompts):
        scores.append(attribute_cached(lm, prompt, params, cache, task.slice(k / len(prompts), (k + 1) / len(prompts))))
    excluded = frozenset() if settings.keep_massive else run_flags(lm, [s.activations for s in scores]).excluded
    neurons, selection = case_neurons([s.scores for s in scores], settings.t, settings.p, exclude=excluded)
    return neurons, prompts, excluded, sum(s.cached for s in scores), selection


def _generate(lm, texts, settings: BenchSettings, seed: int) -> list[str]:
    """Sampled continuations (top-k 5, as ROME's generate_fast) of each text, the prompt included in the text
    scored, as ROME scores it. Seeded per case and condition, so reruns give the same text."""
    import torch

    out = []
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        for text in texts:
            ids = torch.tensor([text_ids(lm, "generation prompt", text)], device=lm.device)
            with torch.no_grad():
                gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=GEN_TOP_K,
                                        max_new_tokens=settings.gen_tokens, pad_token_id=lm.tokenizer.eos_token_id)
            out.append(lm.tokenizer.decode(gen[0], skip_special_tokens=True))
    finally:
        torch.random.set_rng_state(generator_state)
    return out


def _conditions(lm, case: EditCase, neurons, prompts, settings: BenchSettings, task) -> list[tuple[str, object]]:
    """(label, edit) of every condition: the edit(s) and their random-neuron controls."""
    from .edit_plan import EditRequest, plan_edit
    from .facts import Fact, FactSet, Relation

    templates = [p.text.replace(case.subject, "[X]", 1) + " [Y]" for p in prompts if case.subject in p.text]
    relation = Relation("bench-case", f"case {case.case_id}", tuple(dict.fromkeys(templates)))
    fact = Fact(relation.id, case.subject, case.target_true)
    factset = FactSet("bench", {relation.id: relation}, [fact])
    base = dict(neurons=tuple(neurons), fact=fact, seed=settings.seed, control_facts=0)
    if settings.edit != "update":
        plan = plan_edit(lm, factset, EditRequest(settings.edit, **base), task=task)
        return [(settings.edit, plan.edit), ("random neurons", plan.control)]
    out = []
    for strength in ("paper", "calibrated"):
        plan = plan_edit(lm, factset, EditRequest("update", new_object=case.target_new, strength=strength, **base),
                         task=task)
        out += [(f"update ({strength})", plan.edit), (f"random neurons ({strength} λ)", plan.control)]
        if plan.calibration is not None:
            out[-2] = (out[-2][0], plan.edit, plan.calibration)
    return out


def protocol_scores(lm, case: EditCase, protocol: str, edit, control) -> dict:
    """{"pre", "post", "control", "skipped"}: `case` scored by `protocol` on the unedited model, with `edit` and with
    its random-neuron `control` (teacher-forced rows, no generation: fluency is n/a here)."""
    from .evaluation import measure_groups, with_edits
    from .protocols import case_prompts, score_case

    groups, skipped = case_prompts(lm, case, protocol)

    def rows():
        return measure_groups(lm, [groups])[0]

    pre = rows()
    kind = edit.kind
    return {"pre": score_case(protocol, groups, pre, None, kind),
            "post": score_case(protocol, groups, with_edits(lm, [edit], rows), pre, kind),
            "control": score_case(protocol, groups, with_edits(lm, [control], rows), pre, kind),
            "skipped": [{"what": w, "reason": r} for w, r in skipped]}


def _combined(per_edit: list[list[tuple]]) -> list[tuple]:
    """One condition list for a case: a single rewrite's as it is; several rewrites' (MQuAKE) as one Batch per
    label, their calibrations listed."""
    from .edits import Batch

    if len(per_edit) == 1:
        return per_edit[0]
    out = []
    for k, (label, *_) in enumerate(per_edit[0]):
        parts = [conditions[k] for conditions in per_edit]
        calibrations = [p[2] for p in parts if len(p) > 2]
        batch = Batch(tuple(p[1] for p in parts), label)
        out.append((label, batch, calibrations) if calibrations else (label, batch))
    return out


def run_case(lm, case: EditCase, params, settings: BenchSettings, cache: Path, task=None) -> dict:
    """One case measured before the edit, after each condition, and scored by the protocol (plain JSON)."""
    from .evaluation import measure_groups, with_edits
    from .protocols import case_prompts, score_case

    task = as_task(task)
    start = time.time()
    Path(cache).mkdir(parents=True, exist_ok=True)
    edits = case.edits()  # MQuAKE: every rewrite of the case, each with its own neurons, applied together
    found = [_neurons(lm, e, params, settings, cache, task.slice(0.6 * k / len(edits), 0.6 * (k + 1) / len(edits)))
             for k, e in enumerate(edits)]
    neurons, found_on, excluded, _, selection = found[0]
    out = {"case_id": case.case_id, "subject": case.subject, "target_true": case.target_true,
           "target_new": case.target_new, "relation_id": case.relation_id, "neurons": [list(n) for n in neurons],
           "massive_left_out": [list(n) for n in sorted(excluded)], "neuron_prompts": len(found_on),
           "attribution_cached_prompts": sum(f[3] for f in found), "neuron_rule": selection["text"]}
    if len(edits) > 1:
        out["rewrites"] = [{"subject": e.subject, "target_new": e.target_new, "neurons": [list(n) for n in f[0]]}
                           for e, f in zip(edits, found)]
    empty = [k for k, f in enumerate(found) if not f[0]]
    if empty:
        k = empty[0]
        out["left_out"] = (f"no knowledge neurons{f' for rewrite {k}' if len(edits) > 1 else ''} "
                           f"({found[k][4]['text']})")
        out["seconds"] = time.time() - start
        return out
    groups, skipped = case_prompts(lm, case, settings.protocol if settings.protocol != "kn" else "rome")
    gen_texts = list(case.generation_prompts[: settings.generation_prompts])
    seed = int(hashlib.sha256(f"{settings.seed}:{case.case_id}".encode()).hexdigest()[:8], 16)

    def measured(edits, generate: bool):
        def run():
            rows = measure_groups(lm, [groups])[0]
            return rows, (_generate(lm, gen_texts, settings, seed) if generate and gen_texts else None)
        return with_edits(lm, edits, run)

    before, before_gen = measured([], settings.edit == "update")
    out["conditions"] = {"unedited": {"scores": score_case(settings.protocol, groups, before, None, settings.edit,
                                                           before_gen, case.reference_texts),
                                      "generations": before_gen}}
    conditions = _combined([_conditions(lm, e, f[0], f[1], settings, task.slice(0.6, 0.7))
                            for e, f in zip(edits, found)])
    for k, (label, edit, *calibration) in enumerate(conditions):
        task.check()
        rows, gen = measured([edit], settings.edit == "update")
        out["conditions"][label] = {"scores": score_case(settings.protocol, groups, rows, before, settings.edit, gen,
                                                         case.reference_texts),
                                    "edit": edit.to_dict(), "generations": gen,
                                    **({"calibration": calibration[0]} if calibration else {})}
        task.progress(0.7 + 0.3 * (k + 1) / len(conditions), f"case {case.case_id}: {label}")
    out["skipped_prompts"] = [{"what": w, "reason": r} for w, r in skipped]
    out["seconds"] = time.time() - start
    return out


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------

def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_bench(lm, read: FieldFile, out: Path, params, settings: BenchSettings, *, source: str = "",
              command: str = "", say=None, task=None, compute=None, cluster=None) -> dict:
    """Runs (or resumes) the benchmark into `out` and writes its report after every case; returns the report.
    `compute(cases, pending indices, cache, task)`: yields (index, `run_case`'s result) as the cases finish, e.g.
    on Ray workers (`bench_cluster.on_ray`; `cluster()` describes them in the report, as they are by then: the
    workers' count is known once they started); None: here, one after another."""
    from .bench_report import build_report, write_bench_report

    task = as_task(task)
    out = Path(out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    key = settings.key(lm, params)
    chosen = sample_cases(read.cases, settings.cases, settings.seed)
    paths = [out / "cases" / f"{hashlib.sha256(str(c.case_id).encode()).hexdigest()[:12]}-{key}.json" for c in chosen]
    started, load_start = time.time(), _load()
    results = {k: {**json.loads(p.read_text(encoding="utf-8")), "resumed": True} for k, p in enumerate(paths)
               if p.exists()}
    pending = [k for k in range(len(chosen)) if k not in results]
    computed_seconds = 0.0

    def report_now():
        report = build_report(lm, read, [results[k] for k in sorted(results)], settings, params, source=source,
                              command=command, timing={"started": started, "seconds": time.time() - started,
                                                       "computed_seconds": computed_seconds,
                                                       "load_start": load_start, "load_now": _load(),
                                                       "cases_total": len(chosen)})
        if cluster is not None:
            report["machine"]["cluster"] = cluster()
        write_bench_report(report, out)
        return report

    report = report_now()
    if compute is None:
        computed = ((k, run_case(lm, chosen[k], params, settings, out / "cache",
                                 task.slice(n / len(pending), (n + 1) / len(pending)))) for n, k in enumerate(pending))
    else:
        computed = compute(chosen, pending, out / "cache", task)
    for n, (k, result) in enumerate(computed):
        computed_seconds += result["seconds"]
        tmp = paths[k].with_suffix(".tmp")
        tmp.write_text(json.dumps(result), encoding="utf-8")
        tmp.replace(paths[k])
        results[k] = result
        case = chosen[k]
        if say:
            say(f"case {len(results)}/{len(chosen)} ({case.case_id}: {case.subject} -> {case.target_new}) done")
        report = report_now()
        task.progress((n + 1) / len(pending), f"{len(results)}/{len(chosen)} cases")
    return report
