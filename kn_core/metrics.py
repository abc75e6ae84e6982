"""The field's edit metrics (EasyEdit/KnowEdit, ROME/MEMIT): reliability, generality, locality, portability,
ranks of the old and new object, the top-1 flip rate and the size of the edit, each beside the same numbers
for the random-neuron control. Formulas, prompts and the names in other tools: docs/METRICS.md.

    plan = edit_plan.plan_edit(lm, factset, request)
    result = measure_edit(lm, plan)          # runs everything: before, after, control, sizes
    result["metrics"]["reliability"]["rate"], result["metrics"]["control"]["reliability"]["rate"]

or, from measurements a caller already has (`edit_plan.measure_plan` before, after and under the control):

    edit_metrics(plan, before, after, control_after=control_after,
                 size=edit_size(lm, plan.edit, plan.prompts["fact"]))

A metric that cannot be computed is {"applicable": False, "reason": ...}, never a number or a silent gap.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from . import edits as E
from .validation import check_int

METRIC_NAMES = ("reliability", "generality", "locality", "portability")


def not_applicable(reason: str) -> dict:
    return {"applicable": False, "reason": reason}


def applicable(metric) -> bool:
    return isinstance(metric, dict) and metric.get("applicable", True)


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else None


def _summary(success: Sequence[bool], rows: Sequence[dict]) -> dict:
    """rate of `success`, with the mean probability and mean rank of the scored answer in `rows`."""
    return {"rate": _mean(success), "mean_prob": _mean(r["prob"] for r in rows),
            "mean_rank": _mean(r["rank"] for r in rows), "n": len(rows)}


def _target_success(kind: str, before: list[dict], after: list[dict]) -> list[bool]:
    """Per prompt, whether the edit reached its target (the rows score the target: o' for an update, the old
    answer o otherwise). update: o' is the greedy answer at every answer token; suppress/erase: o is no
    longer; amplify: P(o) rose."""
    if kind == "update":
        return [a["correct"] for a in after]
    if kind == "amplify":
        return [a["prob"] > b["prob"] for b, a in zip(before, after)]
    return [not a["correct"] for a in after]


def _target_metric(kind: str, before: list[dict], after: list[dict]) -> dict:
    out = _summary(_target_success(kind, before, after), after)
    # the unedited model on the same prompts, so a rate can be read against where it started
    out["before"] = _summary(_target_success(kind, before, before), before)
    if kind == "amplify":
        out["before"]["rate"] = None  # "P(o) rose" has no meaning before the edit
    return out


def _group(measured: dict, name: str) -> list[dict]:
    return list(measured.get(name) or [])


def _reliability(plan, before: dict, after: dict, generality: bool = False) -> dict:
    kind = plan.edit.kind
    prompts, target = ("held-out", "held-out new object") if generality else ("fact", "new object")
    group = target if kind == "update" else prompts
    rows_before, rows_after = _group(before, group), _group(after, group)
    if not rows_before:
        if not generality:
            return not_applicable("the plan has no prompts of the edited fact")
        if plan.request.neuron_templates is None:
            return not_applicable("which templates found the neurons is not known, so no paraphrase is held out "
                                  "(give EditRequest.neuron_templates; kn edit --hold-out)")
        return not_applicable("every template of the fact that renders was used to find the neurons; find them "
                              "on fewer templates to hold one out (kn edit --hold-out 1)")
    if len(rows_after) != len(rows_before):
        raise ValueError(f"the {group!r} group has {len(rows_before)} prompts before the edit but "
                         f"{len(rows_after)} after; measure both with the same plan")
    return _target_metric(kind, rows_before, rows_after)


def _locality(before: dict, after: dict) -> dict:
    """Other facts (same relation, other relations) keep their top-1 first token; mean |Δp| of their answer."""
    parts = {}
    for name, label in (("relation", "same relation"), ("other relations", "other relations")):
        rb, ra = _group(before, name), _group(after, name)
        if rb:
            parts[label] = _kept(rb, ra)
    if not parts:
        return not_applicable("the plan has no prompts of other facts (control_facts = 0, or the fact set has "
                              "no other facts)")
    rb = _group(before, "relation") + _group(before, "other relations")
    ra = _group(after, "relation") + _group(after, "other relations")
    return _kept(rb, ra) | {"groups": parts}


def _kept(rb: list[dict], ra: list[dict]) -> dict:
    out = _summary([b["top1_id"] == a["top1_id"] for b, a in zip(rb, ra)], ra)
    out["mean_abs_dp"] = _mean(abs(a["prob"] - b["prob"]) for b, a in zip(rb, ra))
    out["before"] = _summary([True] * len(rb), rb)
    return out


def _portability(plan, before: dict, after: dict) -> dict:
    if plan.edit.kind != "update":
        return not_applicable("portability asks whether facts about the new object still hold; only an update "
                              "has a new object")
    rb, ra = _group(before, "portability"), _group(after, "portability")
    if not rb:
        return not_applicable(f"the fact set has no fact whose subject is the new object "
                              f"{plan.request.new_object!r} (or control_facts = 0)")
    out = _summary([a["correct"] for a in ra], ra)
    out["mean_abs_dp"] = _mean(abs(a["prob"] - b["prob"]) for b, a in zip(rb, ra))
    out["before"] = _summary([b["correct"] for b in rb], rb)
    return out


def _ranks(rows_before: list[dict], rows_after: list[dict]) -> dict:
    rb, ra = [r["rank"] for r in rows_before], [r["rank"] for r in rows_after]
    return {"before": _mean(rb), "after": _mean(ra), "median_before": float(np.median(rb)) if rb else None,
            "median_after": float(np.median(ra)) if ra else None, "n": len(rb)}


def _flip_rate(before: dict, after: dict) -> float | None:
    from .evaluation import flip_rate

    rb, ra = _group(before, "fact"), _group(after, "fact")
    return flip_rate(rb, ra) if rb and ra else None


def _one(plan, edit, before: dict, after: dict, size: dict | None) -> dict:
    generality = _reliability(plan, before, after, generality=True)
    return {"reliability": _reliability(plan, before, after), "generality": generality,
            "locality": _locality(before, after), "portability": _portability(plan, before, after),
            "flip_rate": _flip_rate(before, after),
            "rank_old": _ranks(_group(before, "fact"), _group(after, "fact")),
            "rank_new": (_ranks(_group(before, "new object"), _group(after, "new object"))
                         if plan.edit.kind == "update" else not_applicable("only an update has a new object")),
            "edit_size": size if size is not None else _unmeasured_size(edit)}


def _unmeasured_size(edit) -> dict:
    return {"neurons": len(edit.neurons), "weight_change": None, "activation_change": None,
            "note": "not measured (pass size=metrics.edit_size(lm, edit, prompts))"}


def edit_metrics(plan, before: dict, after: dict, *, control_after: dict | None = None, edit=None,
                 size: dict | None = None, control_size: dict | None = None) -> dict:
    """The metrics of `plan`'s edit from `edit_plan.measure_plan` results: `before` (unedited), `after` (with the
    edit) and `control_after` (with `plan.control` instead). `edit`: the edit that was applied when it is not
    `plan.edit` (e.g. one of a batch); `size`/`control_size`: `edit_size(...)` of the edit and the control
    (without them only the number of neurons is given). Keys: see docs/METRICS.md."""
    edit = edit if edit is not None else plan.edit
    out = _one(plan, edit, before, after, size)
    out["kind"] = edit.kind
    out["control"] = (_one(plan, plan.control, before, control_after, control_size) if control_after is not None
                      else not_applicable("the random-neuron control was not measured"))
    return out


def edit_size(lm, edit, prompts: Sequence = ()) -> dict:
    """How much an edit changes the model, measured on the model as it is (call it unedited):
    weight edits: ‖ΔW‖, the Frobenius norm of the change of the edited value vectors (apply, read, revert);
    activation edits: the mean over `prompts` (the fact's) of ‖Δa‖, the L2 norm of the change of the edited
    neurons' activations at the answer position (for a multi-token answer, their mean over its positions)."""
    import torch

    out = {"neurons": len(edit.neurons), "weight_change": None, "activation_change": None}
    if not edit.neurons:
        return out | {"weight_change" if edit.is_weight_edit else "activation_change": 0.0}
    if edit.is_weight_edit:
        def vectors():
            return torch.cat([lm.layout.value_vectors(layer, idx).double().cpu()
                              for layer, idx in E._by_layer(edit.neurons).items()])
        old = vectors()
        handle = edit.apply(lm)
        try:
            new = vectors()
        finally:
            handle.revert()
        return out | {"weight_change": float((new - old).norm())}
    if not prompts:
        return out | {"note": "activation change not measured (no prompts)"}
    from .evaluation import neuron_activations

    acts = neuron_activations(lm, edit.neurons, prompts).astype(np.float64)  # (prompts, neurons)
    if isinstance(edit, E.Suppress):
        target = np.broadcast_to(np.asarray(edit.means, dtype=np.float64), acts.shape) if edit.to == "mean" \
            else np.zeros_like(acts)
    elif isinstance(edit, E.Amplify):
        target = acts * edit.factor
    else:
        raise ValueError(f"no size rule for an activation edit of kind {edit.kind!r}")
    return out | {"activation_change": float(np.linalg.norm(target - acts, axis=1).mean())}


MODEL_STATES = ("before", "after", "control_after")  # unedited, with the plan's edit, with its random control


def measure_edit(lm, plan, task=None, evaluation: str = "forced", states: Sequence[str] = MODEL_STATES) -> dict:
    """Measures `plan` on the model as it is now (before its edit): every group in each of `states` ("before":
    as it is; "after": with `plan.edit`; "control_after": with `plan.control`; `edit_plan.measure_plan` rows),
    and the sizes of both edits ("size", "control_size", `edit_size`). With all three states, "metrics" is
    `edit_metrics(...)` of them; a caller that applies the edit itself (the GUI's undoable command) measures
    "before" and "control_after" here and the edit's state with `measure_plan` after applying it. The task's
    progress runs over the measurements; cancel raises `tasks.Cancelled` with nothing applied. `evaluation`:
    "forced" or "generate" (`edit_plan.measure_plan`)."""
    from .edit_plan import measure_plan
    from .evaluation import with_edits
    from .tasks import as_task

    unknown = sorted(set(states) - set(MODEL_STATES))
    if unknown or not states:
        raise ValueError(f"states must be some of {', '.join(MODEL_STATES)}, not {list(states)!r}")
    task = as_task(task)
    edits = {"before": [], "after": [plan.edit], "control_after": [plan.control]}
    share = 0.9 / len(states)
    out = {}
    for k, state in enumerate(states):
        part = task.slice(k * share, (k + 1) * share)
        out[state] = with_edits(lm, edits[state], lambda: measure_plan(lm, plan, task=part, evaluation=evaluation))
    task.check()
    task.progress(0.9, "measuring the size of the edit and of its control")
    prompts = plan.prompts.get("fact", [])
    out["size"], out["control_size"] = edit_size(lm, plan.edit, prompts), edit_size(lm, plan.control, prompts)
    task.progress(1.0, "metrics measured")
    if set(states) == set(MODEL_STATES):
        out["metrics"] = edit_metrics(plan, out["before"], out["after"], control_after=out["control_after"],
                                      size=out["size"], control_size=out["control_size"])
    return out


# --------------------------------------------------------------------------------------------------------
# Reading the metrics (CLI text, reproduction tables, the GUI's strip share these)
# --------------------------------------------------------------------------------------------------------

def format_value(value, kind: str = "rate") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "rate":
        return f"{100 * value:.0f}%"
    if kind == "rank":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if kind == "prob":
        return f"{value:.3g}"
    return f"{value:.3g}"


def metric_text(metric: dict) -> str:
    """'80% (p 0.41, rank 1.6, n 5)' or 'n/a: why'."""
    if not applicable(metric):
        return f"n/a: {metric['reason']}"
    text = (f"{format_value(metric['rate'])} (p {format_value(metric['mean_prob'], 'prob')}, "
            f"rank {format_value(metric['mean_rank'], 'rank')}")
    if "mean_abs_dp" in metric:
        text += f", |Δp| {format_value(metric['mean_abs_dp'], 'prob')}"
    return text + f", n {metric['n']})"


def size_text(size: dict) -> str:
    parts = [f"{size['neurons']} neurons"]
    if size.get("weight_change") is not None:
        parts.append(f"‖ΔW‖ {size['weight_change']:.3g}")
    if size.get("activation_change") is not None:
        parts.append(f"‖Δa‖ {size['activation_change']:.3g}")
    return ", ".join(parts)


def metrics_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, the edit's value, the random-neuron control's value) as text, one row per metric."""
    control = metrics.get("control") if applicable(metrics.get("control")) else None
    rows = [(name, metric_text(metrics[name]), metric_text(control[name]) if control else "not measured")
            for name in METRIC_NAMES]
    rows.append(("top-1 flip rate", format_value(metrics["flip_rate"]),
                 format_value(control["flip_rate"]) if control else "not measured"))
    for key, label in (("rank_old", "rank of the old object"), ("rank_new", "rank of the new object")):
        if applicable(metrics[key]):
            rows.append((label, _rank_text(metrics[key]), _rank_text(control[key]) if control else "not measured"))
    rows.append(("edit size", size_text(metrics["edit_size"]),
                 size_text(control["edit_size"]) if control else "not measured"))
    return rows


def metrics_lines(metrics: dict) -> list[str]:
    """Text lines: each metric for the edit beside the random-neuron control."""
    rows = metrics_rows(metrics)
    width = max(len(r[0]) for r in rows)
    return [f"  {name:<{width}}  {edit}   " + ("[the same for the random control]" if ctl == edit and edit.startswith("n/a")
                                              else f"[random neurons: {ctl}]") for name, edit, ctl in rows]


def _rank_text(ranks: dict) -> str:
    return (f"mean {format_value(ranks['before'], 'rank')} -> {format_value(ranks['after'], 'rank')} "
            f"(median {format_value(ranks['median_before'], 'rank')} -> {format_value(ranks['median_after'], 'rank')})")


# --------------------------------------------------------------------------------------------------------
# Held-out templates (generality)
# --------------------------------------------------------------------------------------------------------

MIN_FINDING_PROMPTS = 3  # refined neurons must be coarse in >= max(p x n, 3) prompts (neurons.refine_threshold)


def held_out_templates(templates: Sequence[str], n: int, seed: int = 0) -> tuple[str, ...]:
    """`n` of `templates` (distinct, in their order) drawn with `seed`: the paraphrases kept away from finding
    the neurons so that generality is measured on wordings the neurons never saw. Refuses (ValueError, one
    line) when fewer than MIN_FINDING_PROMPTS templates would remain, since refined neurons then cannot exist."""
    templates = list(dict.fromkeys(templates))
    check_int("held-out templates", n, 0)
    check_int("seed", seed, 0)
    if n == 0:
        return ()
    if len(templates) - n < MIN_FINDING_PROMPTS:
        raise ValueError(f"only {len(templates)} templates render; holding out {n} leaves fewer than "
                         f"{MIN_FINDING_PROMPTS} to find neurons with (hold out 0: generality is then not measured)")
    picked = set(np.random.default_rng(seed).choice(len(templates), size=n, replace=False).tolist())
    return tuple(t for i, t in enumerate(templates) if i in picked)


# --------------------------------------------------------------------------------------------------------
# The thesis checks (Niu et al., ICLR 2024): does an edit carry over to the symmetric query and to synonyms?
# --------------------------------------------------------------------------------------------------------

def reverse_prompts(lm, factset, fact, subject: str, causal_templates: str = "prefix") -> tuple[list, str | None]:
    """The relation's templates read backwards: [X] and [Y] swapped, `subject` (an object of the relation) in the
    subject slot and the fact's subject as the answer ("[Y] is the capital of [X]." -> "Rome is the capital of"
    -> France). Only templates that put [Y] before [X] give a causal prompt; with none, the reason."""
    from .facts import Fact, Relation, render_prompts

    relation = factset.relation(fact.relation)
    swapped = tuple(t.replace("[X]", "\0").replace("[Y]", "[X]").replace("\0", "[Y]") for t in relation.templates)
    prompts, skipped = render_prompts(Fact(fact.relation, subject, fact.subject),
                                      Relation(relation.id, relation.name, swapped), lm.tokenizer, lm.kind,
                                      causal_templates)
    if prompts:
        return prompts, None
    return [], (f"no template of {fact.relation} reads backwards for a {lm.kind} model (a reverse query needs "
                f"[Y] before [X], with [X] where the model predicts)" if skipped else "the relation has no templates")


def symmetry_metric(lm, factset, plan, task=None) -> dict:
    """Bijective symmetry of an update s: o -> o' (Niu et al. 2024): on reverse prompts with o' as their subject
    ("Rome is the capital of"), the share where s is the top-1 answer before the edit, after it and under the
    random-neuron control; beside it, how often the unedited model answers the reverse query with the old object
    ("Paris is the capital of" -> France): if it never does, no edit can be expected to carry over."""
    from .evaluation import answer_probabilities, with_edits

    request = plan.request
    if plan.edit.kind != "update":
        return not_applicable("symmetry asks whether the new object now leads back to the subject; only an update "
                              "has a new object")
    causal = request.causal_templates
    new, reason = reverse_prompts(lm, factset, request.fact, request.new_object, causal)
    if reason:
        return not_applicable(reason)
    old, _ = reverse_prompts(lm, factset, request.fact, request.fact.object, causal)

    def rate(rows):
        return _summary([r["correct"] for r in rows], rows)

    out = rate(with_edits(lm, [plan.edit], lambda: answer_probabilities(lm, new)))
    out["before"] = rate(answer_probabilities(lm, new))
    out["control"] = rate(with_edits(lm, [plan.control], lambda: answer_probabilities(lm, new)))
    out["reverse_known"] = rate(answer_probabilities(lm, old)) if old else not_applicable("no reverse prompt of o")
    out["prompts"] = [p.text for p in new]
    return out


def synonymy_metric(metrics: dict) -> dict:
    """Synonymy (Niu et al. 2024): the edit on wordings it was not found on. Held-out paraphrases are the
    generality metric (edit and control, from `edit_metrics`); aliases are n/a: facts carry none (PARAREL has
    none, and the fact-set format has no alias field)."""
    control = metrics.get("control") if applicable(metrics.get("control")) else {}
    return {"paraphrases": {"edit": metrics["generality"], "control": control.get("generality")},
            "aliases": not_applicable("facts carry no aliases of their subject or object (PARAREL has none)")}
