"""Batch and sequential editing: many edit requests -> one undoable edit (`edits.Batch`), measured.

The requests (EasyEdit's form or ours) are read and checked by `batch_requests`; `resolve_neurons` finds each
one's neurons (explicit, the project's stored set, or attribution).

Modes (`run_batch`):
* compound: every request is planned on the unedited model, all edits are applied as one, and every request is
  measured before and after, beside the batch of their random-neuron controls;
* sequential: request k is planned on the model edited by requests 1..k-1, applied, and measured (its control
  is its random-neuron edit in its place); after each step the earlier requests' first reliability prompts are
  measured again, so forgetting shows.
Both modes end with the same kind of edit: `Batch(edits)`, which applied in order is the model they leave.
Nothing here changes the model after it returns: the caller pushes `result.edit` on its `EditStack`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import edits as E
from .encoding import prompt_format, prompt_format_params
from .batch_requests import BatchError, BatchRequest, ParsedRequests, locality_prompts
from .facts import Fact, FactSet, Prompt, Relation, render_prompts
from .selection import DEFAULT_P, DEFAULT_T, Neuron
from .tasks import as_task
from .validation import check_fraction, check_int

MODES = ("compound", "sequential")


# --------------------------------------------------------------------------------------------------------
# Neurons
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeuronSource:
    t: float = DEFAULT_T
    p: float = DEFAULT_P
    params: object = None  # attribution.AttributionParams; None: the defaults

    def __post_init__(self):  # refused here, not after the first request's attribution
        check_fraction("t", self.t)
        check_fraction("p", self.p)


def resolve_neurons(lm, parsed: ParsedRequests, source: NeuronSource = NeuronSource(), project=None,
                    task=None) -> dict[int, tuple[tuple[Neuron, ...], str, tuple[str, ...] | None]]:
    """{line: (neurons, where they came from, the templates that found them)} for every request: explicit
    neurons; else the project's latest refined set of the fact made on these weights (same sha256); else
    attribution of the fact's prompts, whose refined set is stored in the project (so a rerun reuses it).

    The templates decide generality (docs/METRICS.md: measured on templates that did not find the neurons):
    attribution used every template of the fact (so none is held out); explicit neurons of an EasyEdit request
    count as found on its prompt, so its rephrases are held out, as EasyEdit measures generality; other
    explicit or stored neurons: not known (None)."""
    from .attribution import AttributionParams, attribute_fact, integration_text
    from .neurons import case_neurons, empty_neurons_fix

    task = as_task(task)
    params = source.params or AttributionParams()
    stored = _stored_sets(project, lm)
    out: dict[int, tuple[tuple[Neuron, ...], str]] = {}
    todo = [r for r in parsed.requests if r.neurons is None]
    done = 0
    for r in parsed.requests:
        task.check()
        if r.neurons is not None:
            out[r.line] = (r.neurons, "explicit", (r.main_template,) if r.main_template else None)
            continue
        found = stored(r.fact)
        if found is not None:
            out[r.line] = (found[1], f"project neuron set #{found[0]}", None)
        else:
            prompts, _ = render_prompts(r.fact, r.relation, lm.tokenizer, lm.kind)
            part = task.slice(done / len(todo), (done + 1) / len(todo))
            scores = attribute_fact(lm, prompts, params, task=part)
            found, rule = case_neurons([s.scores for s in scores], source.t, source.p)
            neurons = tuple(found)
            few = f"; {rule['text']}" if rule["rule"] != "refined" else ""  # refined: the paper's rule, as before
            how = (f"attribution ({params.method}, {integration_text(params.to_dict())}, t={source.t}, p={source.p}, "
                   f"{len(prompts)} prompts{few})")
            if not neurons:
                how += f"; none found: {empty_neurons_fix(len(prompts), source.p)}"
            if project is not None:
                project.import_factset(FactSet("batch", {r.relation.id: r.relation}, [r.fact]))
                set_id = project.add_neuron_set("refined", neurons, fact=r.fact, model=lm, note="kn edit batch",
                                                params={"t": source.t, "p": source.p, **params.to_dict(),
                                                        "selection": rule, **prompt_format_params(lm)})
                how += f", stored as project neuron set #{set_id}"
            out[r.line] = (neurons, how, tuple(p.template for p in prompts))
        done += 1
        task.progress(done / max(len(todo), 1), f"neurons of {done}/{len(todo)} requests")
    return out


def _stored_sets(project, lm):
    if project is None:
        return lambda fact: None
    model_ids = {m.id for m in project.list_models() if m.sha256 == lm.sha256}
    by_fact: dict[tuple, tuple[int, tuple[Neuron, ...]]] = {}
    facts = {f.id: (f.relation, f.subject, f.object) for f in project.list_facts()}
    for s in project.list_neuron_sets(kind="refined"):  # in id order: the latest set of a fact wins
        if s.model_id in model_ids and s.fact_id in facts:
            by_fact[facts[s.fact_id]] = (s.id, s.neurons)
    return lambda fact: by_fact.get((fact.relation, fact.subject, fact.object))


# --------------------------------------------------------------------------------------------------------
# Running a batch
# --------------------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    edit: E.Batch | None  # None when every request was left out
    control: E.Batch | None  # the requests' random-neuron controls, as one batch
    report: dict  # plain JSON: per request (and per step in sequential mode), the summary, what was left out


class _PlanningFacts:
    """The fact set as `plan_edit` sees it for one request: its control facts are never facts that this batch
    edits (in a compound batch they are edited too, so they would not control anything)."""

    def __init__(self, full: FactSet, edited: set[Fact]):
        self.name, self.relations = full.name, full.relations
        self._rest = [f for f in full.facts if f not in edited]
        self.facts: list[Fact] = self._rest

    def relation(self, rid: str) -> Relation:
        return self.relations[rid]

    def facts_of(self, rid: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == rid]

    def for_request(self, fact: Fact) -> "_PlanningFacts":
        view = object.__new__(_PlanningFacts)
        view.name, view.relations, view._rest = self.name, self.relations, self._rest
        view.facts = self._rest + [fact]
        return view


def run_batch(lm, parsed: ParsedRequests, neurons: dict, mode: str = "compound",
              *, seed: int = 0, control_facts: int = 4, forgetting_prompts: int = 1, relation_exclusion: bool = True,
              max_prompts: int | None = None, options: dict | None = None, activation_stats=None,
              measure_sizes: bool = True, label: str = "", evaluation: str = "forced", protocol: str = "kn",
              task=None) -> BatchResult:
    """Plans, applies and measures every request of `parsed` (see the module notes for the two modes) and
    leaves the model as it found it, also when cancelled (`tasks.Cancelled`) or on an error. Requests that
    cannot be planned (e.g. no neurons, an update no template can render) are left out and listed in
    report["left_out"] with their reason, as are the bad lines of `parsed`. `neurons`: `resolve_neurons`'s
    answer (a request's entry may omit the templates). `max_prompts`: measure at most this many prompts of each
    group of each request (the first ones, in template order; None: all), stated in the report, for batches
    too large to measure every template on this machine. `options`: EditRequest fields shared by every request
    (e.g. scope, factor, lambda1, lambda2, strength, to); `activation_stats`: for a suppress to the mean.
    `measure_sizes=False` leaves ‖Δa‖/‖ΔW‖ unmeasured (an activation edit's size costs a forward pass per request;
    the metrics then say "not measured"). `evaluation`: "forced" (teacher-forced `correct`) or "generate" (greedy
    generation matches the answer: `evaluation.judge_by_generation`), recorded in the report. `protocol`
    (kn_core.protocols.PROTOCOLS): besides our metrics, each request's case is scored by that protocol before,
    after and under the control (report["protocol"], report["cases"], report["summary"]["pre"|"post"|"control"])."""
    from .evaluation import EVALUATIONS
    from .protocols import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise BatchError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if mode not in MODES:
        raise BatchError(f"unknown mode {mode!r}; use compound or sequential")
    if evaluation not in EVALUATIONS:
        raise BatchError(f"unknown evaluation {evaluation!r}; use forced or generate")
    _check_settings(seed, control_facts, forgetting_prompts, max_prompts, options)
    task = as_task(task)
    left_out = [{"line": n, "reason": why} for n, why in parsed.bad]
    planning = _PlanningFacts(parsed.factset, {r.fact for r in parsed.requests})
    settings = dict(seed=seed, control_facts=control_facts, max_prompts=max_prompts, options=dict(options or {}),
                    stats=activation_stats, sizes=measure_sizes, evaluation=evaluation, protocol=protocol,
                    relation_sets=_relation_sets(parsed.requests, neurons) if relation_exclusion else {})
    runner = _compound if mode == "compound" else _sequential
    entries, steps = runner(lm, parsed.requests, neurons, planning, settings, left_out, forgetting_prompts, task)
    left_out.sort(key=lambda x: x["line"])
    edit = E.Batch(tuple(e["plan"].edit for e in entries), label) if entries else None
    control = E.Batch(tuple(e["plan"].control for e in entries), f"controls of {label}".strip()) if entries else None
    report = {"mode": mode, "evaluation": evaluation, "prompt_format": prompt_format(lm),
              "requests_read": len(parsed.requests) + len(parsed.bad), "applied": len(entries),
              "max_prompts_per_group": max_prompts, "control_facts": control_facts,
              "left_out": left_out, "requests": [_request_report(e) for e in entries],
              "summary": _summary(entries, steps), "metrics_definition": METRICS_NOTE, "protocol": protocol}
    report["summary"].update(_protocol_summary(protocol, entries))
    report["cases"] = [_case_report(protocol, e) for e in entries]
    if steps is not None:
        report["steps"] = steps
    return BatchResult(edit, control, report)


METRICS_NOTE = ("per request: kn_core.metrics.edit_metrics (docs/METRICS.md) of its edit and of its random-neuron "
                "control; summary: their means over the requests where a metric applies; 'holds' (sequential "
                "forgetting): update: o' greedy, suppress: the old answer no longer greedy, amplify: p above its "
                "value before the batch, on the request's first forgetting_prompts reliability prompts")


def _check_settings(seed, control_facts, forgetting_prompts, max_prompts, options) -> None:
    """run_batch's settings, refused in one line before any request is planned."""
    from dataclasses import fields

    from .edit_plan import EditRequest

    check_int("seed", seed, 0)
    check_int("control_facts", control_facts, 0)
    check_int("forgetting_prompts", forgetting_prompts, 1)
    if max_prompts is not None:
        check_int("max_prompts", max_prompts, 1, hint=" (or None for every prompt)")
    per_request = {"kind", "neurons", "fact", "new_object", "neuron_templates", "seed", "control_facts",
                   "control_prompts_per_fact"}  # set by run_batch itself
    shared = {f.name for f in fields(EditRequest)} - per_request
    unknown = sorted(set(options or {}) - shared)
    if unknown:
        raise BatchError(f"unknown option(s) {', '.join(map(repr, unknown))}; options are EditRequest fields "
                         f"shared by every request: {', '.join(sorted(shared))}")
    EditRequest("suppress", **(options or {}))  # their values (a NaN factor or lambda) fail here, not per request


def _relation_sets(requests, neurons) -> dict[str, dict[Fact, tuple[Neuron, ...]]]:
    out: dict[str, dict[Fact, tuple[Neuron, ...]]] = {}
    for r in requests:
        if r.line in neurons and neurons[r.line][0]:
            out.setdefault(r.fact.relation, {})[r.fact] = neurons[r.line][0]
    return out


def _plan(lm, planning: _PlanningFacts, r: BatchRequest, neurons, settings, left_out, task):
    """The request's EditPlan (groups split for EasyEdit's rephrases, plus its locality prompts), or None after
    listing why it was left out."""
    from .edit_plan import EditPlanError, EditRequest, plan_edit

    chosen, source, templates = (tuple(neurons.get(r.line, ())) + ((), "not resolved", None))[:3]
    if not chosen:
        fix = "" if "none found" in source else " found none (give explicit neurons, or attribute again with a lower t)"
        left_out.append({"line": r.line, "reason": f"no neurons: {source}{fix}"})
        return None
    try:
        plan = plan_edit(lm, planning.for_request(r.fact),
                         EditRequest(r.kind, chosen, r.fact, new_object=r.new_object, seed=settings["seed"],
                                     control_facts=settings["control_facts"], control_prompts_per_fact=1,
                                     neuron_templates=templates, **settings["options"]),
                         settings["relation_sets"].get(r.fact.relation, {}), activation_stats=settings["stats"],
                         task=task)
    except EditPlanError as exc:
        left_out.append({"line": r.line, "reason": str(exc)})
        return None
    groups, skipped = dict(plan.prompts), list(plan.skipped) + list(r.left_out)
    if settings["max_prompts"] is not None:  # aligned groups (fact / new object) keep the same first prompts
        groups = {g: ps[: settings["max_prompts"]] for g, ps in groups.items()}
    if r.locality:
        groups["locality"] = locality_prompts(lm, r.locality, skipped)
    if settings["protocol"] != "kn":
        groups.update(_protocol_groups(lm, plan, r, settings["protocol"], skipped))
    return replace(plan, prompts=groups, skipped=skipped)


PROTOCOL_PREFIX = "protocol/"  # plan groups measured only for the protocol's scores (kn_core.protocols)


def _protocol_groups(lm, plan, r: BatchRequest, protocol: str, skipped) -> dict[str, list[Prompt]]:
    """The protocol's prompt groups of the request's case (a benchmark file's case, or one made from the plan's
    own prompts), prefixed so that they never mix with the groups our metrics read."""
    from .protocols import case_from_plan, case_prompts

    case = r.case if r.case is not None else case_from_plan(plan)
    groups, left = case_prompts(lm, case, protocol)
    skipped.extend(left)
    return {PROTOCOL_PREFIX + g: ps for g, ps in groups.items()}


def _protocol_scores(plan, protocol: str, before, after, control_after) -> dict:
    """{"pre", "post", "control"}: the protocol's scores of the request (kn_core.protocols.score_case)."""
    from .protocols import score_case

    def strip(rows):
        return {g[len(PROTOCOL_PREFIX):]: v for g, v in rows.items() if g.startswith(PROTOCOL_PREFIX)}

    prompts, pre = strip(plan.prompts), strip(before)
    kind = plan.request.kind
    return {"pre": score_case(protocol, prompts, pre, None, kind),
            "post": score_case(protocol, prompts, strip(after), pre, kind),
            "control": score_case(protocol, prompts, strip(control_after), pre, kind)}


def _metrics(lm, plan, before, after, control_after, sizes: bool = True, protocol: str = "kn") -> dict:
    """edit_metrics of the request (sizes measured on the model as it is: unedited, or before the step), and
    for EasyEdit locality prompts their own "locality_prompts" entry (kept top-1 and |Δp|, as locality)."""
    from .metrics import _kept, edit_metrics, edit_size, not_applicable

    prompts = plan.prompts.get("fact", [])
    out = edit_metrics(plan, before, after, control_after=control_after,
                       size=edit_size(lm, plan.edit, prompts) if sizes else None,
                       control_size=edit_size(lm, plan.control, prompts) if sizes else None)
    for side, rows in ((out, after), (out["control"], control_after)):
        given = before.get("locality") or []
        side["locality_prompts"] = (_kept(given, rows["locality"]) if given else
                                    not_applicable("the request gives no locality prompts"))
    if protocol != "kn":
        out["protocol"] = _protocol_scores(plan, protocol, before, after, control_after)
    return out


def _compound(lm, requests, neurons, planning, settings, left_out, forgetting_prompts, task):
    from .evaluation import measure_groups

    entries = []
    for i, r in enumerate(requests):
        task.check()
        plan = _plan(lm, planning, r, neurons, settings, left_out, None)
        if plan is not None:
            entries.append({"request": r, "plan": plan, "source": neurons[r.line][1]})
        task.progress(0.1 * (i + 1) / len(requests), f"planning {i + 1}/{len(requests)}")
    if not entries:
        return entries, None
    groups = [e["plan"].prompts for e in entries]
    ev = settings["evaluation"]
    before = measure_groups(lm, groups, task.slice(0.1, 0.4), ev)
    after = _with(lm, E.Batch(tuple(e["plan"].edit for e in entries)),
                  lambda: measure_groups(lm, groups, task.slice(0.4, 0.7), ev))
    control = _with(lm, E.Batch(tuple(e["plan"].control for e in entries)),
                    lambda: measure_groups(lm, groups, task.slice(0.7, 1.0), ev))
    for e, b, a, c in zip(entries, before, after, control):
        task.check()
        e["metrics"] = _metrics(lm, e["plan"], b, a, c, settings["sizes"], settings["protocol"])
        e["control_rows"] = _control_rows(e["plan"], b, a, c)
    return entries, None


# a request's prompts of facts the batch does not edit (batch_requests and _PlanningFacts keep edited facts out)
CONTROL_GROUPS = ("relation", "other relations", "portability", "locality")


def _control_rows(plan, before: dict, after: dict, control_after: dict) -> list[dict]:
    """Per prompt of the request's other-fact controls (CONTROL_GROUPS): its answer's probability, rank and top-1
    before the batch, with it, and under the batch of random-neuron controls, as measured: the rows that the
    locality and portability metrics are means of, so a reader sees which control fact moved."""
    def measured(row: dict) -> dict:
        return {k: row[k] for k in ("prob", "rank", "top1_token", "top1_id")}

    rows = []
    for group in CONTROL_GROUPS:
        for p, b, a, c in zip(plan.prompts.get(group, []), before.get(group, []), after.get(group, []),
                              control_after.get(group, [])):
            rows.append({"group": group, "fact": {"relation": p.fact.relation, "subject": p.fact.subject,
                                                  "object": p.fact.object},
                         "prompt": p.text, "answer": p.answer, "before": measured(b), "after": measured(a),
                         "control": measured(c)})
    return rows


def _with(lm, edit, fn):
    handle = edit.apply(lm)
    try:
        return fn()
    finally:
        handle.revert()


def _sequential(lm, requests, neurons, planning, settings, left_out, forgetting_prompts, task):
    from .evaluation import measure_groups

    entries, steps, handles = [], [], []
    n = len(requests)
    try:
        for k, r in enumerate(requests):
            task.check()
            step = task.slice(k / n, (k + 1) / n)
            plan = _plan(lm, planning, r, neurons, settings, left_out, step.slice(0, 0.2))
            if plan is None:
                continue
            entry = {"request": r, "plan": plan, "source": neurons[r.line][1], "holds": []}
            ev = settings["evaluation"]
            (before,) = measure_groups(lm, [plan.prompts], step.slice(0.2, 0.4), ev)
            (control,) = _with(lm, plan.control, lambda: measure_groups(lm, [plan.prompts], step.slice(0.4, 0.6), ev))
            handles.append(plan.edit.apply(lm))
            (after,) = measure_groups(lm, [plan.prompts], step.slice(0.6, 0.8), ev)
            entry["metrics"] = _metrics(lm, plan, before, after, control, settings["sizes"], settings["protocol"])
            entry["control_rows"] = _control_rows(plan, before, after, control)
            entry["probe"] = _probe(entry, before, forgetting_prompts)
            entries.append(entry)
            steps.append(_step_report(lm, entries, step.slice(0.8, 1.0), ev))
            task.progress((k + 1) / n, f"step {k + 1}/{n}")
    finally:
        for handle in reversed(handles):
            handle.revert()
    return entries, steps


def _probe(entry, before, count: int) -> dict:
    """The prompts re-measured after every later step, and what "the edit holds" means for them."""
    kind = entry["plan"].request.kind
    group = "new object" if kind == "update" else "fact"
    prompts = entry["plan"].prompts.get(group, [])[:count]
    return {"kind": kind, "prompts": prompts, "p_before": [row["prob"] for row in before.get(group, [])[:count]]}


def _holds(probe, rows) -> float:
    if not rows:
        return float("nan")
    if probe["kind"] == "update":
        ok = [row["correct"] for row in rows]
    elif probe["kind"] == "suppress":
        ok = [not row["correct"] for row in rows]
    else:
        ok = [row["prob"] > b for row, b in zip(rows, probe["p_before"])]
    return float(np.mean(ok))


def _step_report(lm, entries, task, evaluation: str = "forced") -> dict:
    """After a sequential step: whether each edit so far still holds (the last is the one just applied)."""
    from .evaluation import measure_groups

    measured = measure_groups(lm, [{"probe": e["probe"]["prompts"]} for e in entries], task, evaluation)
    holds = []
    for e, rows in zip(entries, measured):
        value = _holds(e["probe"], rows["probe"])
        e["holds"].append([len(entries), value])
        holds.append(value)
    earlier = [h for h in holds[:-1] if np.isfinite(h)]
    return {"step": len(entries), "line": entries[-1]["request"].line, "current_holds": holds[-1],
            "earlier_hold_rate": float(np.mean(earlier)) if earlier else None, "earlier_n": len(earlier)}


def _request_report(e) -> dict:
    r, plan = e["request"], e["plan"]
    out = {"line": r.line, "kind": r.kind, "fact": {"relation": r.fact.relation, "subject": r.fact.subject,
                                                    "object": r.fact.object},
           "new_object": r.new_object, "neurons_from": e["source"], "edit": plan.edit.to_dict(),
           "control": plan.control.to_dict(), "prompts": {g: len(ps) for g, ps in plan.prompts.items()},
           "skipped": [{"what": w, "reason": why} for w, why in plan.skipped], "metrics": e["metrics"],
           "control_rows": e["control_rows"]}
    if "holds" in e:
        out["holds_after_step"] = e["holds"]  # [[step, fraction of probe prompts where the edit holds], ...]
    return out


def _summary(entries, steps) -> dict:
    """The batch's metrics in edit_metrics' shape (so metrics.metrics_lines prints them): each number is the
    mean over the requests where the metric applies ("requests" says how many; the reasons of the others are
    counted), for the edits and for their random-neuron controls."""
    from .metrics import METRIC_NAMES

    def side(ms: list[dict]) -> dict:
        out = {name: _mean_metric([m[name] for m in ms]) for name in METRIC_NAMES + ("locality_prompts",)}
        out["flip_rate"] = _mean_of([m["flip_rate"] for m in ms])
        for key in ("rank_old", "rank_new"):
            ranks = [m[key] for m in ms if m[key].get("applicable", True)]
            out[key] = ({k: _mean_of([r[k] for r in ranks]) for k in ("before", "after", "median_before",
                                                                       "median_after")} | {"n": len(ranks)}
                        if ranks else {"applicable": False, "reason": "no request has a new object"})
        sizes = [m["edit_size"] for m in ms]
        out["edit_size"] = {k: _mean_of([z.get(k) for z in sizes]) for k in ("neurons", "weight_change",
                                                                             "activation_change")}
        return out

    out: dict = {"requests": len(entries), "metrics": side([e["metrics"] for e in entries])}
    out["metrics"]["control"] = side([e["metrics"]["control"] for e in entries])
    if steps:
        first = [e["holds"][0][1] for e in entries if e["holds"] and np.isfinite(e["holds"][0][1])]
        last = [e["holds"][-1][1] for e in entries if e["holds"] and np.isfinite(e["holds"][-1][1])]
        out["forgetting"] = {"holds_right_after_own_step": _mean_of(first), "holds_at_the_end": _mean_of(last),
                             "note": "mean over requests of the fraction of probe prompts where the edit holds"}
    return out


def _protocol_summary(protocol: str, entries) -> dict:
    """{"pre", "post", "control"}: the protocol's means over the requests (kn: our metrics' rates, and their
    rates on the unedited model where a metric has one)."""
    from .protocols import summarize

    if protocol != "kn":
        scores = [e["metrics"]["protocol"] for e in entries]
        return {side: summarize(protocol, [s[side] for s in scores]) for side in ("pre", "post", "control")}
    metrics = _summary(entries, None)["metrics"]
    names = ("reliability", "generality", "locality", "portability")

    def pre(name):
        rates = [(e["metrics"][name].get("before") or {}).get("rate") for e in entries
                 if e["metrics"][name].get("applicable", True)]
        return _mean_of(rates)

    def rate(m):
        return m.get("rate") if m.get("applicable", True) else m

    return {"pre": {n: pre(n) for n in names}, "post": {n: rate(metrics[n]) for n in names},
            "control": {n: rate(metrics["control"][n]) for n in names}}


def _case_report(protocol: str, e) -> dict:
    r = e["request"]
    scores = e["metrics"].get("protocol") if protocol != "kn" else {
        "post": {k: e["metrics"][k].get("rate") for k in ("reliability", "generality", "locality")},
        "control": {k: e["metrics"]["control"][k].get("rate") for k in ("reliability", "generality", "locality")}}
    return {"line": r.line, "case_id": getattr(r.case, "case_id", None), "subject": r.fact.subject,
            "target_true": r.fact.object, "target_new": r.new_object, **(scores or {})}


def _mean_of(values) -> float | None:
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _mean_metric(metrics: list[dict]) -> dict:
    used = [m for m in metrics if m.get("applicable", True)]
    if not used:
        reasons = sorted({m.get("reason", "") for m in metrics})
        return {"applicable": False, "reason": "; ".join(reasons) or "no requests"}
    out = {k: _mean_of([m.get(k) for m in used]) for k in ("rate", "mean_prob", "mean_rank")}
    if any("mean_abs_dp" in m for m in used):
        out["mean_abs_dp"] = _mean_of([m.get("mean_abs_dp") for m in used])
    out |= {"n": sum(m["n"] for m in used), "requests": len(used)}
    broken = sum(1 for m in used if m.get("mean_prob") is None or not np.isfinite(m["mean_prob"]))
    if broken:  # e.g. a compound batch of updates that overflowed the model: its probabilities are NaN
        out["non_finite_requests"] = broken
        out["note"] = f"{broken} request(s) gave a non-finite probability (the model's output overflowed); the " \
                      "means are over the others"
    skipped = len(metrics) - len(used)
    if skipped:
        out["not_applicable_requests"] = skipped
    return out
