"""The reproduction's edit-metrics section: every fact's edits (suppress, amplify, update as in the paper and
calibrated) measured with the field's metrics (kn_core.metrics, docs/METRICS.md), each beside its random-neuron
control, on neurons found with one template per fact held out (for generality).

The neurons are found again from the run's cached attribution scores (no new attribution): the fact's prompts
minus the held-out template, the relation's adapted p, flagged neurons excluded as in the other sections.
"""

from __future__ import annotations

import zlib

import numpy as np

from .. import experiments as ex
from ..edit_plan import EditPlanError, EditRequest, plan_edit, shared_rule_note
from ..metrics import (METRIC_NAMES, applicable, held_out_templates, measure_edit, symmetry_metric,
                       synonymy_metric)
from ..neurons import refined_neurons
from ..tasks import as_task

KINDS = ("suppress", "amplify", "update (paper)", "update (calibrated)")
HOLD_OUT = 1  # templates per fact kept away from finding the neurons
EXCLUSION_FRACTION = EditRequest.exclusion_fraction  # the update's shared-neuron rule (the paper's 10%)


def _neurons(fact, prompts, scores, t: float, p: float, exclude, seed: int):
    """(templates that found the neurons, refined neurons, held-out templates or the reason there are none)."""
    templates = [q.template for q in prompts]
    try:
        held = held_out_templates(templates, HOLD_OUT, seed)
    except ValueError as exc:
        held = str(exc)
    kept = [i for i, q in enumerate(prompts) if isinstance(held, str) or q.template not in held]
    neurons = refined_neurons([scores[i].scores for i in kept], t, p, exclude=exclude)
    return tuple(dict.fromkeys(prompts[i].template for i in kept)), [tuple(n) for n in neurons], held


def _request(kind: str, fact, neurons, templates, new_object, exclude, seed: int,
             causal_templates: str) -> EditRequest:
    base = dict(neuron_templates=templates, exclude=tuple(exclude), seed=seed, causal_templates=causal_templates)
    if kind == "suppress":
        return EditRequest("suppress", tuple(neurons), fact, **base)
    if kind == "amplify":
        return EditRequest("amplify", tuple(neurons), fact, factor=2.0, **base)
    strength = "calibrated" if "calibrated" in kind else "paper"
    return EditRequest("update", tuple(neurons), fact, new_object=new_object, strength=strength, **base)


def _new_objects(factset, fact, seed: int) -> list[str]:
    """Other objects of the fact's relation in a seeded order (o' candidates: the first the plan accepts)."""
    objects = sorted({f.object for f in factset.facts_of(fact.relation)} - {fact.object})
    order = np.random.default_rng([seed, zlib.crc32(fact.subject.encode())]).permutation(len(objects))
    return [objects[i] for i in order]


def edit_metrics_experiment(lm, factset, chosen: dict, ig: dict, adapted: dict, t: float, exclude, stats,
                            seed: int = 0, task=None, causal_templates: str = "prefix", template=None) -> dict:
    """{"facts": [{relation, subject, object, neurons, held_out, new_object, kinds: {kind: metrics}}],
    "summary": {kind: {metric: {"edit", "control", "facts"}}}, "skipped": [{what, reason}]}. The edits are
    judged on prompts rendered with the `causal_templates` the chosen facts' prompts were rendered with.
    `template`: {fact: its neurons the subject control flagged}, taken out of its refined set (a neuron that only
    becomes refined once a template is held out was not controlled and stays)."""
    task = as_task(task)
    found, skipped = {}, []
    template = template or {}
    for rid, facts in chosen.items():
        for fact, prompts in facts:
            held_templates, neurons, held = _neurons(fact, prompts, ig[fact], t, adapted[rid]["p"], exclude, seed)
            drop = template.get(fact, frozenset())
            found[fact] = (held_templates, [n for n in neurons if n not in drop], held)
    out_facts = []
    total = max(len(found), 1)
    for done, (fact, (templates, neurons, held)) in enumerate(found.items()):
        task.check()
        label = f"{fact.relation} {fact.subject} -> {fact.object}"
        if not neurons:
            skipped.append({"what": label, "reason": "no refined neurons on the templates left after holding one out"})
            continue
        sets = {f: n for f, (_, n, _) in found.items() if f.relation == fact.relation and f != fact}
        entry = {"relation": fact.relation, "subject": fact.subject, "object": fact.object,
                 "neurons": [list(n) for n in neurons],
                 "held_out": list(held) if not isinstance(held, str) else [], "kinds": {}}
        if isinstance(held, str):
            entry["held_out_note"] = held
        sub = task.slice(done / total, (done + 1) / total)
        for k, kind in enumerate(KINDS):
            kind_task = sub.slice(k / len(KINDS), (k + 1) / len(KINDS))
            try:
                plan = _plan(lm, factset, kind, fact, neurons, templates, sets, exclude, stats, seed, kind_task,
                             causal_templates)
            except EditPlanError as exc:
                skipped.append({"what": f"{kind} of {label}", "reason": str(exc)})
                continue
            if plan.request.kind == "update":
                entry["new_object"] = plan.request.new_object
            entry["kinds"][kind] = metrics = measure_edit(lm, plan, task=kind_task)["metrics"]
            if plan.request.kind == "update":
                entry.setdefault("thesis", {})[kind] = {"symmetry": symmetry_metric(lm, factset, plan),
                                                        "synonymy": synonymy_metric(metrics)}
        out_facts.append(entry)
    shared = [x for x in skipped if x["what"].startswith("update") and "shared by more than" in x["reason"]]
    relations = {f.relation for f in found}
    return {"hold_out": HOLD_OUT, "facts": out_facts, "summary": summarize(out_facts), "skipped": skipped,
            "thesis": thesis_summary(out_facts),
            "updates_asked": sum(k.startswith("update") for k in KINDS) * len(out_facts),
            "updates_left_out_by_shared_rule": len(shared),
            "shared_rule": {rid: shared_rule_note(sum(f.relation == rid for f in found) - 1, EXCLUSION_FRACTION)
                            or "applied" for rid in sorted(relations)}}


def _plan(lm, factset, kind, fact, neurons, templates, sets, exclude, stats, seed, task, causal_templates):
    """The plan of one kind; an update tries o' candidates until one renders with a different first token."""
    candidates = _new_objects(factset, fact, seed)[:5] if kind.startswith("update") else [None]
    error = None
    for new_object in candidates:
        try:
            request = _request(kind, fact, neurons, templates, new_object, exclude, seed, causal_templates)
            return plan_edit(lm, factset, request, sets, activation_stats=stats, task=task)
        except EditPlanError as exc:
            error = exc
    raise error if error is not None else EditPlanError("the relation has no other object to update to")


def summarize(facts: list[dict]) -> dict:
    """Per kind and metric: the mean over facts of the edit's and the control's rate (locality also its mean
    |Δp|), and how many facts it applied to."""
    out = {}
    for kind in KINDS:
        rows = [f["kinds"][kind] for f in facts if kind in f["kinds"]]
        if not rows:
            continue
        out[kind] = {name: _mean_of(rows, name) for name in METRIC_NAMES}
        out[kind]["flip_rate"] = {"edit": _mean([r["flip_rate"] for r in rows]),
                                  "control": _mean([r["control"]["flip_rate"] for r in rows]), "facts": len(rows)}
        size = "weight_change" if kind.startswith("update") else "activation_change"
        out[kind]["edit_size"] = {"edit": _mean([r["edit_size"][size] for r in rows]),
                                  "control": _mean([r["control"]["edit_size"][size] for r in rows]),
                                  "facts": len(rows), "measure": size}
    return out


def thesis_summary(facts: list[dict]) -> dict:
    """Per update kind, symmetry (Niu et al. 2024) as means over facts where it applies: the rate after the edit,
    before it, under the random control, and how often the unedited model answers the reverse query with the
    old object; the reasons where it does not apply. Synonymy by paraphrase is the generality row."""
    out = {}
    for kind in (k for k in KINDS if k.startswith("update")):
        rows = [f["thesis"][kind]["symmetry"] for f in facts if kind in f.get("thesis", {})]
        done = [r for r in rows if applicable(r)]
        known = [r["reverse_known"] for r in done if applicable(r["reverse_known"])]
        out[kind] = {"facts": len(done), "of": len(rows), "edit": _mean([r["rate"] for r in done]),
                     "before": _mean([r["before"]["rate"] for r in done]),
                     "control": _mean([r["control"]["rate"] for r in done]),
                     "reverse_known": _mean([r["rate"] for r in known]),
                     "not_applicable": sorted({r["reason"] for r in rows if not applicable(r)})}
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _mean_of(rows: list[dict], name: str) -> dict:
    edit = [r[name] for r in rows if applicable(r[name])]
    control = [r["control"][name] for r in rows if applicable(r["control"][name])]
    out = {"edit": _mean([m["rate"] for m in edit]), "control": _mean([m["rate"] for m in control]),
           "facts": len(edit)}
    if name == "locality":
        out["edit_abs_dp"] = _mean([m["mean_abs_dp"] for m in edit])
        out["control_abs_dp"] = _mean([m["mean_abs_dp"] for m in control])
    if not edit:
        reasons = sorted({r[name]["reason"] for r in rows if not applicable(r[name])})
        out["reason"] = reasons[0] + (f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else "")
    return out


def metrics_markdown(report: dict) -> list[str]:
    """The report's section: one row per edit kind, each metric as 'edit (random control)'."""
    section = report.get("edit_metrics")
    if not section:
        return []
    lines = ["## Edit metrics (reliability, generality, locality, portability)", "",
             f"Each fact's neurons found again without {section['hold_out']} held-out template (generality is "
             "measured on it); rates are means over facts, each as *edit (random-neuron control)*. Definitions: "
             "docs/METRICS.md.", "",
             "| edit | facts | reliability | generality | locality | locality mean abs Δp | portability | top-1 flips "
             "| edit size |", "|---|---|---|---|---|---|---|---|---|"]

    def pair(m, key_edit="edit", key_control="control", rate=True):
        if m.get(key_edit) is None:
            return "n/a"
        fmt = (lambda v: f"{100 * v:.0f}%") if rate else (lambda v: f"{v:.3g}")
        control = m.get(key_control)
        return f"{fmt(m[key_edit])} ({fmt(control) if control is not None else 'n/a'})"

    known = ex.known_by_label(report.get("fact_answers"))
    groups = [("", section["summary"])]
    if known:  # known facts first; unknown facts apart (their neurons are template-like by construction)
        groups = [(f", {label}", summarize([f for f in section["facts"]
                                            if known.get(ex.fact_label(f["relation"], f["subject"])) is side]))
                  for side, label in ((True, "known facts"), (False, "facts the model does not know"))]
    lines += [f"| every edit{suffix} | 0 | | | | | | | |" for suffix, summary in groups if not summary]
    for suffix, kind, s in ((suffix, kind, s) for suffix, summary in groups for kind, s in summary.items()):
        size = s["edit_size"]
        lines.append(f"| {kind}{suffix} | {s['reliability']['facts']} | {pair(s['reliability'])} | "
                     f"{pair(s['generality'])} | "
                     f"{pair(s['locality'])} | {pair(s['locality'], 'edit_abs_dp', 'control_abs_dp', False)} | "
                     f"{pair(s['portability'])} | {pair(s['flip_rate'])} | "
                     f"{'‖ΔW‖' if size['measure'] == 'weight_change' else '‖Δa‖'} {pair(size, rate=False)} |")
    notes = {f"{kind} {name}: {s[name]['reason']}" for kind, s in section["summary"].items() for name in METRIC_NAMES
             if s[name].get("reason")}
    lines += [""] + [f"- n/a: {n}" for n in sorted(notes)]
    for kind, t in (section.get("thesis") or {}).items():
        pct = (lambda v: "n/a" if v is None else f"{100 * v:.0f}%")
        lines.append(f"- symmetry (Niu et al. 2024), {kind}: the reverse query with o' as subject gives s on "
                     f"{pct(t['edit'])} of prompts after the edit (before {pct(t['before'])}, random control "
                     f"{pct(t['control'])}; the unedited model answers the reverse query with o on "
                     f"{pct(t['reverse_known'])}), {t['facts']} of {t['of']} facts"
                     + (f"; n/a: {'; '.join(t['not_applicable'])}" if t["not_applicable"] else "")
                     + ". Synonymy: held-out paraphrases are the generality column; aliases n/a (facts carry none).")
    if "updates_asked" in section:
        lines.append(f"- updates left out by the shared-neuron rule: {section['updates_left_out_by_shared_rule']} of "
                     f"{section['updates_asked']}")
        lines += [f"- {rid}: {note}" for rid, note in section.get("shared_rule", {}).items() if note != "applied"]
    if section["skipped"]:
        lines += [f"- left out: {s['what']}: {s['reason']}" for s in section["skipped"]]
    return lines + [""]
