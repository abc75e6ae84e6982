"""The reproduction's pipeline: select facts, attribute them (cached), find knowledge neurons, run the paper's
experiments with controls. The report (markdown, JSON, figures) is written by ``report.py``.

1. Selection (``select_facts``): per relation, a seeded random order of its facts. Knowledge neurons are claimed
   only for facts the model knows (ROME's causal tracing likewise studies only facts the model predicts
   correctly): with ``select="known"`` the facts are screened in that order, ``SCREEN_BATCH`` per batched
   forward on their first ``check_prompts`` (3) prompts, until ``facts_per_relation`` known facts are found or
   ``screen_cap`` facts are screened; a fact passing the screen is judged on all its prompts (``ex.is_known``,
   the report's criterion). Too few known: filled with the best-answered unknown facts, said per relation.
   ``select="random"`` takes the first facts with at least ``min_prompts`` usable prompts. Every template, fact
   and relation that is left out keeps its reason.
2. Attribution of every prompt, cached under OUT/cache per prompt, so an interrupted run resumes where it
   stopped; the activation baseline likewise.
3. Refined neurons per fact with p adapted per relation, as in the paper.
4. Neuron statistics, activation by prompt, suppress/amplify, update and erase, each beside its controls.
5. The field's edit metrics per edit kind beside the random control (``metrics_section``, docs/METRICS.md).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import evaluation as ev
from .. import experiments as ex
from ..degeneracy import DegeneracyParams, degeneracy_experiment
from .localisation import localisation_experiment
from .metrics_section import edit_metrics_experiment
from ..encoding import prompt_format, prompt_format_params
from .specificity_section import apply_control, control_part, run_subject_control
from ..facts import CAUSAL_TEMPLATES, render_prompts
from ..selection import DEFAULT_P, DEFAULT_T
from ..syntax import syntax_experiment
from ..tasks import Cancelled, Task, as_task
from ..jsonio import dumps, write_text_atomic
from .report import PAPER, render_markdown, write_html, write_report

MIN_PROMPTS = 3  # refinement keeps neurons coarse in at least max(p * n, 3) prompts
# The known-fact screen: facts per batched forward, and the most facts screened per relation. 256 facts x 3
# prompts cost ~40 s on the default model (0.15 s per fact measured: one thread, load 1.3), about what
# attributing one fact costs; a relation with fewer than 4 known facts in 256 (1.6%) gets unknown ones to fill.
SCREEN_BATCH = 32
SCREEN_CAP = 256
SELECT_MODES = ("known", "random")


def _say(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _versions() -> dict:
    from ..store import library_versions

    return {**library_versions(), "platform": platform.platform()}


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------------
# Fact selection
# --------------------------------------------------------------------------------------------------------

@dataclass
class FactSelection:
    """The chosen facts with their prompts, what was checked per relation, and everything left out."""
    chosen: dict = field(default_factory=dict)        # relation -> [(fact, prompts)]
    relations: dict = field(default_factory=dict)     # relation -> summary (facts, checked, chosen, templates)
    left_out: dict = field(default_factory=lambda: {"relations": [], "templates": [], "facts": []})
    checks_cached: int = 0  # relations whose known-fact check was read from the cache (computed by an earlier run)


def _relation_rng(seed: int, rid: str) -> np.random.Generator:
    # Seeded per relation, so a relation's sample does not depend on which other relations run beside it.
    return np.random.default_rng([seed, zlib.crc32(rid.encode("utf-8"))])


def _known_scores(lm, rid, candidates, check_prompts: int | None, cache: Path | None,
                  task: Task) -> tuple[list[tuple[float, float]], bool]:
    """(accuracy, mean probability) of each candidate fact over its first ``check_prompts`` prompts (all of them
    with None), cached per batch of candidates; and whether they came from the cache."""
    candidates = [(fact, ps[:check_prompts]) for fact, ps in candidates]
    prompts = [p for _, ps in candidates for p in ps]
    path = None
    if cache is not None:
        how = [[p.text, list(p.answer_ids)] for p in prompts] + ([["chat"]] if prompt_format(lm) == "chat" else [])
        path = cache / f"select-{_key(lm.sha256, rid, how)}.json"
        if path.exists():
            rows = json.loads(path.read_text())
            return [tuple(r) for r in rows], True
    probs = ev.answer_probabilities(lm, prompts, batch_size=32, task=task)
    rows, at = [], 0
    for _, ps in candidates:
        chunk = probs[at:at + len(ps)]
        at += len(ps)
        rows.append((float(np.mean([r["correct"] for r in chunk])), float(np.mean([r["prob"] for r in chunk]))))
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        tmp.replace(path)
    return rows, False


def _usable_facts(lm, factset, rid, sel: FactSelection, seed, min_prompts, prompts_per_fact, causal_templates,
                  template_reasons: dict, counts: Counter):
    """The relation's facts in the seeded order with at least ``min_prompts`` prompts, rendered lazily (a fact
    with fewer is left out with its reason); ``counts["rendered"]`` and ``template_reasons`` record what was seen."""
    relation, facts = factset.relation(rid), factset.facts_of(rid)
    for k in _relation_rng(seed, rid).permutation(len(facts)):
        fact = facts[k]
        prompts, skipped = render_prompts(fact, relation, lm.tokenizer, lm.kind, causal_templates)
        counts["rendered"] += 1
        for s in skipped:
            template_reasons.setdefault(s.template, Counter())[s.reason] += 1
        if prompts_per_fact:
            prompts = prompts[:prompts_per_fact]
        if len(prompts) >= min_prompts:
            yield fact, prompts
        else:
            sel.left_out["facts"].append({
                "relation": rid, "subject": fact.subject, "object": fact.object,
                "reason": f"{len(prompts)} usable prompt(s); refinement needs at least {min_prompts}"})


def _screen_known(lm, rid, usable, facts_per_relation, check_prompts, cap, cache, task, sel: FactSelection):
    """Screens usable facts in the seeded order, ``SCREEN_BATCH`` at a time (one batched forward over their first
    ``check_prompts`` prompts), until ``facts_per_relation`` known facts are found or ``cap`` facts are screened.
    A fact that passes the screen is judged on all its prompts (``ex.is_known``, the report's criterion), so a
    chosen "known" fact is known in the facts table too. Returns (screened [(fact, prompts, (acc, p), known)],
    whether the relation's usable facts ran out)."""
    screened, known, exhausted = [], 0, False
    while known < facts_per_relation and len(screened) < cap:
        batch = []
        for item in usable:
            batch.append(item)
            if len(batch) >= min(SCREEN_BATCH, cap - len(screened)):
                break
        if not batch:
            exhausted = True
            break
        scores, cached = _known_scores(lm, rid, batch, check_prompts, cache, task)
        sel.checks_cached += cached
        passed = [k for k, (acc, _) in enumerate(scores) if ex.knows(batch[k][0], acc)]
        confirmed = {}
        if passed:
            full, cached = _known_scores(lm, rid, [batch[k] for k in passed], None, cache, task)
            sel.checks_cached += cached
            confirmed = {k: ex.knows(batch[k][0], acc) for k, (acc, _) in zip(passed, full)}
        for k, (fact, prompts) in enumerate(batch):
            screened.append((fact, prompts, scores[k], confirmed.get(k, False)))
            known += confirmed.get(k, False)
    return screened, exhausted


def _choose_known(rid, screened, facts_per_relation, check_prompts, sel: FactSelection) -> tuple[list, int]:
    """The first ``facts_per_relation`` known facts in the seeded order, filled with the best-answered unknown
    ones when too few are known; every screened fact not chosen is left out with its reason."""
    known = [k for k, s in enumerate(screened) if s[3]][:facts_per_relation]
    unknown = sorted((k for k, s in enumerate(screened) if not s[3]),  # answerable from the name: filled last
                     key=lambda k: (ex.answer_in_name(screened[k][0]), -screened[k][2][0], -screened[k][2][1], k))
    fill = unknown[:facts_per_relation - len(known)]
    for k, (fact, prompts, (acc, prob), is_known) in enumerate(screened):
        if k in known or k in fill:
            continue
        reason = (f"known, but the {facts_per_relation} known facts before it in the seeded order were chosen"
                  if is_known else
                  f"not known: top-1 on {round(acc * min(check_prompts, len(prompts)))} of its first "
                  f"{min(check_prompts, len(prompts))} prompts (mean p {prob:.3g})"
                  + (f"; answered less well than the {len(fill)} unknown fact(s) chosen to fill" if fill else ""))
        if ex.answer_in_name(fact):
            reason = (f"not counted as known: {ex.NAME_NOTE}"
                      + ("; facts whose answer is not in the name fill first" if fill else ""))
        elif not is_known and ex.is_known(acc):
            reason = (f"not known: top-1 on more than half of its first {check_prompts} prompts but not of all "
                      f"{len(prompts)}" + (f"; answered less well than the {len(fill)} unknown fact(s) chosen "
                                           f"to fill" if fill else ""))
        sel.left_out["facts"].append({"relation": rid, "subject": fact.subject, "object": fact.object,
                                      "reason": reason})
    return [screened[k][:2] for k in known + fill], len(known)


def _select_relation(lm, factset, rid, sel: FactSelection, facts_per_relation, select, seed, min_prompts,
                     prompts_per_fact, causal_templates, screen_cap, check_prompts, cache, task) -> None:
    relation, facts = factset.relation(rid), factset.facts_of(rid)
    template_reasons: dict[str, Counter] = {}
    counts = Counter(rendered=0)
    usable = _usable_facts(lm, factset, rid, sel, seed, min_prompts, prompts_per_fact, causal_templates,
                           template_reasons, counts)
    summary = {"facts": len(facts), "checked": 0, "chosen": 0, "templates": len(relation.templates)}
    sel.relations[rid] = summary
    if select == "known":
        screened, exhausted = _screen_known(lm, rid, usable, facts_per_relation, check_prompts, screen_cap, cache,
                                            task, sel)
        chosen, n_known = _choose_known(rid, screened, facts_per_relation, check_prompts, sel)
        summary.update(checked=len(screened), known_found=sum(s[3] for s in screened), chosen_known=n_known,
                       screen_cap=screen_cap, answer_in_name=sum(ex.answer_in_name(s[0]) for s in screened))
        if chosen and n_known < facts_per_relation:
            where = ("every usable fact of the relation" if exhausted else
                     f"the cap of {screen_cap} screened facts" if len(screened) >= screen_cap else "")
            found = f"only {n_known} known fact(s)" if n_known else "no known fact"
            summary["note"] = (f"{found} among the {len(screened)} screened ({where}); "
                               f"filled with {len(chosen) - n_known} fact(s) the model does not know, the best "
                               f"answered first")
    else:
        chosen = [item for _, item in zip(range(facts_per_relation), usable)]
    for template, reasons in template_reasons.items():
        for reason, n in reasons.items():
            sel.left_out["templates"].append({"relation": rid, "template": template, "reason": reason,
                                              "facts": n, "of_facts": counts["rendered"]})
    summary.update(rendered=counts["rendered"],
                   templates_used_by_every_fact=len(relation.templates) - len(template_reasons))
    if not chosen:
        reason = (f"the relation has no facts" if not facts else
                  f"none of the {counts['rendered']} facts has {min_prompts} usable prompts for a {lm.kind} "
                  f"model (templates left out are listed with their reasons)")
        sel.left_out["relations"].append({"relation": rid, "reason": reason})
        summary["prompts_per_fact"] = []
        return
    sel.chosen[rid] = chosen
    summary["chosen"] = len(chosen)
    summary["prompts_per_fact"] = [len(ps) for _, ps in chosen]
    if summary["chosen"] < facts_per_relation and "note" not in summary:
        summary["note"] = (f"only {summary['chosen']} of the {facts_per_relation} facts asked for have "
                           f"{min_prompts} usable prompts")


def select_facts(lm, factset, relations, facts_per_relation: int, select: str = "known", seed: int = 0,
                 min_prompts: int = MIN_PROMPTS, prompts_per_fact: int | None = None,
                 causal_templates: str = "prefix", screen_cap: int = SCREEN_CAP, check_prompts: int = 3,
                 cache: Path | None = None, task: Task | None = None) -> FactSelection:
    """Chooses up to ``facts_per_relation`` facts per relation (see the module notes); nothing is dropped
    without a reason in ``FactSelection.left_out``. ``select="known"`` screens at most ``screen_cap`` facts per
    relation in a seeded order, each on its first ``check_prompts`` prompts, stopping once enough are known."""
    if select not in SELECT_MODES:
        raise ValueError(f"unknown select {select!r}; use 'known' or 'random'")
    task = as_task(task)
    sel = FactSelection()
    for n, rid in enumerate(relations):
        task.check()
        task.progress(n / max(len(relations), 1), f"selecting facts: {rid} ({n + 1}/{len(relations)})")
        _select_relation(lm, factset, rid, sel, facts_per_relation, select, seed, min_prompts, prompts_per_fact,
                         causal_templates, screen_cap, check_prompts, cache,
                         task.slice(n / len(relations), (n + 1) / len(relations)))
    task.progress(1.0, "facts selected")
    return sel


# --------------------------------------------------------------------------------------------------------
# Attribution with a cache
# --------------------------------------------------------------------------------------------------------
# Why this cache is not the runner's resumable driver (`runner.attribute_factset`, which resumes per fact in a
# project): the reproduction needs what a project does not keep, every prompt's full [layers, neurons] scores and
# activations under two parameter sets (IG and the activation baseline), and it resumes per prompt, keyed by
# (weights sha256, prompt, answer, scoring parameters), so a rerun that selects other facts or prompts reuses
# every prompt it shares, and the subject control and localisation read the same cache (`attribute_cached`).
# Both drive the same computation (`attribution.attribute`).

@dataclass
class _Scores:
    scores: np.ndarray
    activations: np.ndarray
    prob: float
    cached: bool = False  # read from the cache: computed by an earlier run


def attribute_cached(lm, prompt, params, cache: Path | None, task: Task | None = None) -> _Scores:
    """One prompt's attribution, read from ``cache`` when an earlier (possibly interrupted) run computed it."""
    from ..attribution import attribute

    scoring = {k: v for k, v in params.to_dict().items() if k != "share_prompts"}  # sharing never changes scores
    scoring |= prompt_format_params(lm)  # chat-rendered prompts are other inputs (plain: the keys of earlier runs)
    key = hashlib.sha256(json.dumps([lm.sha256, prompt.text, list(prompt.answer_ids), scoring],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as data:
            return _Scores(data["scores"], data["activations"], float(data["prob"]), cached=True)
    # relay: cancelled with the run; the run reports its own progress per prompt
    result = attribute(lm, prompt, params, task=task.relay() if task is not None else None)
    out = _Scores(result.scores, result.activations, result.prob)
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, scores=out.scores, activations=out.activations, prob=np.float64(out.prob))
        tmp.replace(path)
    return out


def _attribute_all(lm, chosen: dict, params, base_params, cache: Path, task: Task,
                   counts: dict) -> tuple[dict, dict]:
    """Every chosen prompt's attribution and activation baseline. Facts go round-robin over the relations (the
    best-known fact of each relation first), so a run stopped early has covered every relation alike."""
    total = max(sum(len(ps) for facts in chosen.values() for _, ps in facts), 1)
    order = [(rid, facts[k]) for k in range(max(map(len, chosen.values()), default=0))
             for rid, facts in chosen.items() if k < len(facts)]
    ig, base, done = {}, {}, 0
    counts.update(prompts=total, done=0)
    for rid, (fact, prompts) in order:
        ig[fact], base[fact] = [], []
        for prompt in prompts:
            task.check()
            ig[fact].append(attribute_cached(lm, prompt, params, cache, task))
            base[fact].append(attribute_cached(lm, prompt, base_params, cache, task))
            done += 1
            counts["done"] = done
            task.progress(done / total, f"attribution: {rid} {fact.subject} ({done}/{total} prompts)")
    return ig, base


# --------------------------------------------------------------------------------------------------------
# Knowledge neurons
# --------------------------------------------------------------------------------------------------------

def _knowledge_neurons(chosen: dict, ig: dict, base: dict, t: float, p: float, exclude=()) -> tuple[list, dict]:
    """Refined neurons per fact (p adapted per relation), never one of ``exclude``; also for the baseline."""
    from ..neurons import adapt_p, refined_neurons

    records, adapted = [], {}
    for rid, facts in chosen.items():
        a = adapt_p([[s.scores for s in ig[f]] for f, _ in facts], t=t, p=p, exclude=exclude)
        b = adapt_p([[s.scores for s in base[f]] for f, _ in facts], t=0.5, p=p, exclude=exclude)
        adapted[rid] = {"p": a.p, "mean_neurons": a.mean_neurons, "history": a.history,
                        "baseline_p": b.p, "baseline_mean_neurons": b.mean_neurons}
        for fact, prompts in facts:
            records.append(ex.FactNeurons(
                fact, prompts, refined_neurons([s.scores for s in ig[fact]], t, a.p, exclude=exclude),
                refined_neurons([s.scores for s in base[fact]], 0.5, b.p, exclude=exclude),
                [s.activations for s in ig[fact]]))
    return records, adapted


def _flags(lm, chosen: dict, ig: dict, t: float, task: Task):
    """Massive and unspecific neurons of this run and the activation statistics they rest on (the run's prompts
    plus the built-in neutral sentences); the statistics also give the means for mean-ablation."""
    from ..neurons import run_stats, scored_flags

    stats = run_stats(lm, [s.activations for facts in chosen.values() for f, _ in facts for s in ig[f]], task)
    scores = {rid: [[s.scores for s in ig[f]] for f, _ in facts] for rid, facts in chosen.items()}
    return scored_flags(stats, scores, t), stats


def _neuron_summary(records, adapted, flags, layers: int) -> dict:
    stats = ex.neuron_statistics([r.neurons for r in records], [r.relation for r in records], layers)
    flagged = [n for r in records for n in r.neurons if flags.of(n)]
    return {**stats, "flagged_among_refined": len(flagged), "refined_total": sum(len(r.neurons) for r in records),
            "adapted_p": {rid: a["p"] for rid, a in adapted.items()}}


def knowledge_neurons(lm, chosen: dict, ig: dict, base: dict, t: float, p: float, keep_massive: bool,
                      task: Task) -> tuple[list, dict]:
    """The records the experiments use (flagged neurons excluded unless ``keep_massive``) and the report's
    neuron sections, with the main numbers both ways (flagged neurons excluded and kept)."""
    flags, stats = _flags(lm, chosen, ig, t, task)
    excluded, adapted_x = _knowledge_neurons(chosen, ig, base, t, p, flags.excluded)
    kept, adapted_k = _knowledge_neurons(chosen, ig, base, t, p)
    records, adapted = (kept, adapted_k) if keep_massive else (excluded, adapted_x)
    layers = lm.layout.layers
    part = {
        "flags": {**flags.to_dict(), "excluded_from_neurons": not keep_massive},
        "adapted_p": adapted,
        "facts_detail": [
            {"relation": r.relation, "subject": r.fact.subject, "object": r.fact.object, "prompts": len(r.prompts),
             "prob": float(np.mean([s.prob for s in ig[r.fact]])),
             "neurons": [list(n) for n in r.neurons], "baseline_neurons": [list(n) for n in r.baseline_neurons],
             "flagged_neurons_when_kept": [list(n) for n in k.neurons if flags.of(n)],
             # an MoE model's neurons are [layer, index in the layer's flattened experts]: name each one's expert
             **({"neurons_named": [lm.layout.neuron_dict(l, i) for l, i in r.neurons]}
                if lm.layout.experts is not None else {})}
            for r, k in zip(records, kept)],
        "neuron_statistics": ex.neuron_statistics([r.neurons for r in records], [r.relation for r in records], layers),
        "baseline_neuron_statistics": ex.neuron_statistics([r.baseline_neurons for r in records],
                                                           [r.relation for r in records], layers),
        "both_ways": {"flagged_excluded": _neuron_summary(excluded, adapted_x, flags, layers),
                      "flagged_kept": _neuron_summary(kept, adapted_k, flags, layers)},
    }
    return records, {"part": part, "flags": flags, "stats": stats}


def _subject_control(report, phases, lm, factset, records, params, cache, seed, causal_templates, answers,
                     keep_template) -> tuple[list, dict]:
    """Runs the subject control on every record (a phase), writes report["subject_control"] and marks the
    facts' template neurons in "facts_detail"; returns the records the experiments use and {fact: template}."""
    controls = phases.run("subject_control", lambda sub: run_subject_control(
        lm, factset, records, params, cache, seed, causal_templates, sub))
    controlled = apply_control(records, controls)
    report["subject_control"] = control_part(records, controlled, controls, answers, lm.layout.layers)
    for detail, control, kept in zip(report["facts_detail"], controls, controlled):
        detail["template_neurons"] = [list(n) for n in sorted(control.template)]
        detail["neurons"] = [list(n) for n in (control.candidates if keep_template else kept.neurons)]
    template = {r.fact: c.template for r, c in zip(records, controls)}
    if not keep_template:
        report["neuron_statistics"] = report["subject_control"]["with_control"]["all"]
    return (records if keep_template else controlled), template


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------

def default_relations(factset, n: int = 3) -> list[str]:
    preferred = [r for r in ("P36", "P37", "P30", "P19", "P103", "P1412") if r in factset.relations]
    rest = [r for r in factset.relations if r not in preferred]
    return (preferred + rest)[:n]


def resolve_relations(factset, relations) -> list[str]:
    """The relation ids to run: ``None`` -> a default three, ``"all"`` -> every relation of the fact set."""
    from ..runner import select_relations

    return default_relations(factset) if relations is None else select_relations(factset, relations)


@dataclass
class _Phases:
    """Each phase reports into its own slice of the task's bar and records its time."""
    task: Task
    say: object
    timings: dict
    bounds: dict

    def run(self, name: str, fn):
        start, end = self.bounds[name]
        self.say(f"[reproduce] {name}")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(self.task.slice(start, end))
        finally:  # also for a phase that was stopped: the partial report says how long it ran
            self.timings[name] = time.perf_counter() - t0
            # CPU seconds beside wall seconds: on a shared machine the wall time says more about the neighbours
            self.timings[f"{name}_cpu"] = time.process_time() - c0


def _new_report(lm, factset, relations, params, base_params, timings: dict, parameters: dict,
                command: str | None = None) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {
        "status": "running", "model": lm.describe(), "facts": factset.name, "relations": relations,
        "parameters": {**parameters, "baseline_t": 0.5, "attribution": params.to_dict(),
                       "baseline_attribution": base_params.to_dict(), "suppress_scope": "answer",
                       "amplify_factor": 2.0, "update": {"lambda1": 1.0, "lambda2": 8.0, "exclusion_fraction": 0.1}},
        "versions": _versions(), "paper": PAPER, "timings": timings,
        "provenance": {"started": started, "command": command},
    }


def run_reproduce(lm, factset, out: Path, relations=None, facts_per_relation: int = 10, seed: int = 0,
                  steps: int = 20, prompts_per_fact: int | None = None, select: str = "known",
                  control_prompts: int = 20, t: float = DEFAULT_T, p: float = DEFAULT_P, erase_k: int = 20,
                  erase_fill: str = "zero", *, causal_templates: str = "prefix", screen_cap: int = SCREEN_CAP,
                  check_prompts: int = 3, keep_massive: bool = False, say=_say, task: Task | None = None,
                  command: str | None = None, quadrature: str = "riemann", tolerance: float = 0.01,
                  trace: bool = False, subject_control: bool = True, keep_template: bool = False) -> dict:
    # long: the phases read top to bottom, each saving the partial report (the phases are already helpers)
    """Runs the reproduction and writes OUT/report.json, report.md and figures; returns the report. (One
    function on purpose: the phases read top to bottom, each saving the partial report.)
    Massive/unspecific neurons (kn_core.neurons) are kept out of refined and relation-level neurons unless
    ``keep_massive``; the neuron numbers are reported both ways. With ``subject_control`` (the default) each
    fact's refined neurons get the subject-specificity control (kn_core.specificity) and its template neurons
    are taken out unless ``keep_template``; the neuron numbers are reported with and without it. A
    cancelled or failed run leaves a partial report.json (status "interrupted ...") and its cache, from which
    the next run with the same arguments resumes. ``command``: how the run was started, for the provenance.
    ``trace``: add the localisation-vs-editing section (causal tracing of every fact; ``localisation.py``)."""
    from ..attribution import AttributionParams

    if causal_templates not in CAUSAL_TEMPLATES:
        raise ValueError(f"unknown causal_templates {causal_templates!r}; use 'prefix' or 'end-only'")
    if select not in SELECT_MODES:
        raise ValueError(f"unknown select {select!r}; use 'known' or 'random'")
    relations = resolve_relations(factset, relations)
    task = as_task(task)
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    params = AttributionParams(steps=steps, seed=seed, quadrature=quadrature, tolerance=tolerance)
    base_params = AttributionParams(method="activation", seed=seed)
    report = _new_report(lm, factset, relations, params, base_params, timings, {
        "facts_per_relation": facts_per_relation, "seed": seed, "select": select, "screen_cap": screen_cap,
        "check_prompts": check_prompts, "min_prompts": MIN_PROMPTS,
        "causal_templates": causal_templates if lm.kind == "causal" else None, "prompt_format": prompt_format(lm),
        "prompts_per_fact": prompts_per_fact, "control_prompts": control_prompts, "t": t, "p_start": p,
        "erase": {"k": erase_k, "fill": erase_fill}, "keep_massive": keep_massive, "trace": trace,
        "subject_control": subject_control, "keep_template": keep_template}, command)

    def save():
        timings["total"] = time.perf_counter() - started
        write_text_atomic(out / "report.json", dumps(report, indent=2))  # never a truncated report.json

    phases = _Phases(task, say, timings, {"select": (0.0, 0.05), "attribution": (0.05, 0.5), "neurons": (0.5, 0.51),
                                          "answers": (0.51, 0.52), "subject_control": (0.52, 0.6),
                                          "activation_by_prompt": (0.6, 0.63), "update": (0.63, 0.68),
                                          "edit_metrics": (0.68, 0.78), "syntax": (0.78, 0.8),
                                          "suppress_amplify": (0.8, 0.9), "erase": (0.9, 0.93),
                                          "degeneracy": (0.93, 1.0)})
    if trace:  # the optional last phase takes the end of the bar (never moving it backwards)
        phases.bounds.update(degeneracy=(0.93, 0.98), localisation=(0.98, 1.0))
    try:
        sel = phases.run("select", lambda sub: select_facts(
            lm, factset, relations, facts_per_relation, select, seed, MIN_PROMPTS, prompts_per_fact,
            causal_templates, screen_cap, check_prompts, cache, sub))
        report["selection"] = sel.relations
        report["left_out"] = sel.left_out
        save()
        chosen = sel.chosen
        n_facts = sum(len(v) for v in chosen.values())
        say(f"[reproduce] attributing {n_facts} facts, "
            f"{sum(len(ps) for v in chosen.values() for _, ps in v)} prompts ({params.steps} steps, "
            f"{params.quadrature}; cached in {cache})")
        report["attribution_progress"] = counts = {}
        ig, base = phases.run("attribution", lambda sub: _attribute_all(lm, chosen, params, base_params, cache, sub,
                                                                         counts))
        # a time per fact only where this run computed every prompt: cached ones took an earlier run's time
        cached = sum(scores.cached for per_fact in ig.values() for scores in per_fact)
        timings["attribution_per_fact"] = timings["attribution"] / max(n_facts, 1) if not cached else None
        timings["attribution_cached_prompts"] = cached
        timings["select_cached_relations"] = sel.checks_cached
        records, neurons = phases.run("neurons", lambda sub: knowledge_neurons(
            lm, chosen, ig, base, t, p, keep_massive, sub))
        report.update(neurons["part"])
        exclude = () if keep_massive else neurons["flags"].excluded  # also keeps the random controls off them
        report["fact_answers"] = answers = phases.run("answers", lambda sub: ex.fact_answers(
            lm, [(r.fact, r.prompts) for r in records], task=sub))
        template: dict = {}
        if subject_control:
            records, template = _subject_control(report, phases, lm, factset, records, params, cache, seed,
                                                 causal_templates, answers, keep_template)
        save()
        report["activation_by_prompt"] = phases.run("activation_by_prompt", lambda sub: ex.activation_by_prompt(
            lm, records, factset, seed=seed, task=sub))
        save()
        report["update"] = phases.run("update", lambda sub: ex.update_experiment(
            lm, records, factset, seed=seed, facts_per_relation=10, control_prompts=control_prompts,
            exclude=exclude, task=sub))
        save()
        report["edit_metrics"] = phases.run("edit_metrics", lambda sub: edit_metrics_experiment(
            lm, factset, chosen, ig, report["adapted_p"], t, exclude, neurons["stats"], seed, sub, causal_templates,
            {} if keep_template else template))
        save()
        report["syntax"] = phases.run("syntax", lambda sub: syntax_experiment(
            lm, lambda prompt: attribute_cached(lm, prompt, params, cache, sub), t, p, exclude, task=sub))
        save()
        report["suppress_amplify"] = phases.run("suppress_amplify", lambda sub: ex.suppress_amplify_experiment(
            lm, records, seed=seed, control_prompts=control_prompts, exclude=exclude,
            activation_stats=neurons["stats"], known=ex.known_by_label(answers),
            task=sub))
        save()
        report["erase"] = phases.run("erase", lambda sub: ex.erase_experiment(
            lm, records, k=erase_k, fill=erase_fill, seed=seed, control_prompts=2 * control_prompts,
            exclude=exclude, task=sub))
        save()
        report["degeneracy"] = phases.run("degeneracy", lambda sub: degeneracy_experiment(
            lm, records, DegeneracyParams(seed=seed), {f: sum(s.scores for s in ig[f]) for f in ig}, exclude, sub))
        save()
        if trace:
            report["localisation"] = phases.run("localisation", lambda sub: localisation_experiment(
                lm, records, ig, exclude, seed, sub))
            save()
        report["status"] = "done"
    except BaseException as exc:  # Cancelled / KeyboardInterrupt / an error: keep what is done, then re-raise
        report["status"] = f"interrupted ({type(exc).__name__}); run again with the same arguments to resume"
        save()
        write_text_atomic(out / "report.md", render_markdown(report))  # how far it got, readable
        write_html(report, out)
        say(f"[reproduce] stopped; partial report in {out / 'report.md'}; run again to resume from {cache}")
        raise
    say("[reproduce] figures and report.md")
    save()
    write_report(report, out)
    timings["total"] = time.perf_counter() - started
    say(f"[reproduce] done in {timings['total']:.0f} s: {out / 'report.md'} and {out / 'report.html'}")
    return report


__all__ = ["Cancelled", "FactSelection", "attribute_cached", "default_relations", "resolve_relations",
           "run_reproduce", "select_facts"]
