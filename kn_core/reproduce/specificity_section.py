"""The reproduction's subject-specificity control (kn_core.specificity, docs/SPECIFICITY.md) and its known /
unknown facts: running the control on every fact's refined neurons (the control prompts' scores cached like the
attribution's, so a resumed run reads them back), the neuron numbers with and without it, split by known and
unknown facts, and the report's sections for both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import experiments as ex
from ..specificity import LayerScores, attribute_layers, control_summary, riemann_params, subject_control
from ..tasks import Task


def cached_scorer(lm, params, cache: Path | None, task: Task):
    """`subject_control`'s `score(prompt, layers)`: `attribute_layers`, read from `cache` when a run computed it."""
    scoring = {k: v for k, v in params.to_dict().items() if k != "share_prompts"}

    def score(prompt, layers) -> LayerScores:
        key = hashlib.sha256(json.dumps(["layers", lm.sha256, prompt.text, list(prompt.answer_ids), list(layers),
                                         scoring], sort_keys=True).encode()).hexdigest()[:24]
        path = cache / f"control-{key}.npz" if cache is not None else None
        if path is not None and path.exists():
            with np.load(path) as data:
                return LayerScores(tuple(int(x) for x in data["layers"]), data["scores"], data["normalized"],
                                   [float(x) for x in data["token_probs"]])
        result = attribute_layers(lm, prompt, layers, params, task.relay())
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, layers=np.array(result.layers), scores=result.scores,
                                normalized=result.normalized, token_probs=np.array(result.token_probs))
            tmp.replace(path)
        return result
    return score


def run_subject_control(lm, factset, records, params, cache: Path | None, seed: int, causal_templates: str,
                        task: Task) -> list:
    """Every record's subject control on its refined neurons (massive/unspecific already out). A non-Riemann
    quadrature is controlled with the paper's Riemann sum (the control compares two scores of the same kind)."""
    params = riemann_params(params)  # before the cache key: the scores cached are the Riemann sum's
    score = cached_scorer(lm, params, cache, task)
    out = []
    for n, rec in enumerate(records):
        task.check()
        out.append(subject_control(lm, factset, rec.fact, rec.prompts, rec.neurons, params, seed=seed,
                                   causal_templates=causal_templates, score=score,
                                   task=task.slice(n / len(records), (n + 1) / len(records))))
    return out


def apply_control(records, controls) -> list:
    """The records with each fact's template neurons taken out of its refined set."""
    from ..neurons import without_template

    return [replace(r, neurons=without_template(r.neurons, c.template)) for r, c in zip(records, controls)]


def _label(rec) -> str:
    return ex.fact_label(rec.relation, rec.fact.subject)


UNKNOWN = "neurons of facts the model does not know (template-like by construction)"  # or answers from the name


def neurons_by_known(report: dict) -> dict | None:
    """The neuron statistics of the neurons the experiments use (facts_detail), for known and unknown facts
    apart; None before the answers are measured."""
    known, detail = ex.known_by_label(report.get("fact_answers")), report.get("facts_detail") or []
    if not known or not detail:
        return None
    out = {}
    for side in (True, False):
        part = [d for d in detail if known.get(ex.fact_label(d["relation"], d["subject"])) is side]
        out["known" if side else "unknown"] = ex.neuron_statistics(
            [[tuple(n) for n in d["neurons"]] for d in part], [d["relation"] for d in part],
            report["model"]["layers"]) if part else {"facts": 0}
    return out


def by_known_markdown(report: dict) -> list[str]:
    """The headline neuron numbers of known facts, and beside them (never mixed in) those of unknown facts."""
    split = neurons_by_known(report)
    if split is None:
        return []
    k, u = split["known"], split["unknown"]

    def cell(s, fn):
        return fn(s) if s.get("facts") else "-"

    rows = [("facts", lambda s: str(s["facts"])),
            ("mean refined neurons per fact", lambda s: _n(s["mean_neurons_per_fact"])),
            ("facts without neurons", lambda s: str(s["facts_without_neurons"])),
            ("shared neurons, same relation", lambda s: _n(s["shared_intra_relation"])),
            ("shared neurons, different relations", lambda s: _n(s["shared_inter_relation"])),
            ("refined neurons in layer 0", lambda s: _layer0(s)[0]),
            ("layer-0 neurons refined for every fact of a relation", lambda s: _layer0(s)[1]),
            ("per layer", lambda s: ", ".join(f"L{l}: {c}" for l, c in enumerate(s["layer_histogram"]) if c)
             or "none")]
    lines = ["### Known facts (the headline) and facts the model does not know", "",
             f"{ex.KNOWN_RULE}. The neurons the experiments use; a fact the model does not know has neurons that "
             "push the answer's type from the template, and one whose answer is part of its subject's name can be "
             "answered by reading the name, so both are counted apart.", "",
             f"| | known facts | {UNKNOWN} |", "|---|---|---|"]
    lines.append(f"| facts | {k.get('facts', 0)} | {u.get('facts', 0)} |")
    lines += [f"| {name} | {cell(k, fn)} | {cell(u, fn)} |" for name, fn in rows[1:]]
    return lines + [""]


def control_part(records, controlled, controls, answers: list[dict], layers: int) -> dict:
    """The report's "subject_control": the rule and what it used, per fact, and the neuron numbers without and
    with the control, for all facts and for known / unknown facts apart."""
    known = ex.known_by_label(answers)

    def both(recs):
        out = {"all": ex.neuron_statistics([r.neurons for r in recs], [r.relation for r in recs], layers)}
        for side in (True, False):
            part = [r for r in recs if known.get(_label(r)) is side]
            out["known" if side else "unknown"] = ex.neuron_statistics(
                [r.neurons for r in part], [r.relation for r in part], layers) if part else {"facts": 0}
        return out

    return {**control_summary(controls), "per_fact": [c.to_dict() for c in controls],
            "without_control": both(records), "with_control": both(controlled)}


# --------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------

def _n(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) and x == x else "n/a"


def _layer0(s: dict) -> tuple[str, str]:
    """(refined neurons in layer 0 as "n of total (share; Wilson 95% interval)", the layer-0 neurons refined for every fact of a
    relation)."""
    total = s.get("refined_total", 0)
    interval = ex.wilson_interval(s["layer_histogram"][0], total) if total else None
    ci = f"; 95% CI {100 * interval[0]:.0f}-{100 * interval[1]:.0f}%" if interval else ""
    share = f"{s['layer_histogram'][0]} of {total} ({100 * s['layer0_share']:.1f}%{ci})" if total else "0 of 0"
    every = ", ".join(f"{e['relation']} L0#{e['neuron'][1]}" for e in s.get("layer0_in_every_fact", []))
    return share, every or "none"


def facts_markdown(report: dict) -> list[str]:
    """One row per chosen fact: p and rank of its answer, known or not, its refined neurons (after the
    control) and the ones the control flagged."""
    answers = report.get("fact_answers")
    if not answers:
        return []
    control = {(c["relation"], c["subject"]): c for c in (report.get("subject_control") or {}).get("per_fact", [])}
    detail = {(d["relation"], d["subject"]): d for d in report.get("facts_detail", [])}
    lines = ["## Facts", "", f"{ex.KNOWN_RULE}. p: mean p(answer) over the fact's prompts; rank: median rank of "
             "the answer's first token (1 = top-1). Refined: the neurons the experiments use.", "",
             "| relation | subject -> object | p | rank (median, best) | top-1 on | known | refined | template-flagged |",
             "|---|---|---|---|---|---|---|---|"]
    for a in answers:
        key = (a["relation"], a["subject"])
        c, d = control.get(key), detail.get(key)
        flagged = ("not controlled: " + c["reason"]) if c and not c["controlled"] else (
            ", ".join(f"L{l}#{i}" for l, i in c["template"]) or "none") if c else "-"
        refined = ", ".join(f"L{l}#{i}" for l, i in d["neurons"]) if d else "-"
        lines.append(f"| {a['relation']} | {a['subject']} -> {a['object']} | {_n(a['prob'], '{:.3g}')} | "
                     f"{_n(a['rank_median'], '{:g}')}, {a['rank_best']} | {_n(100 * a['top1_share'], '{:.0f}')}% | "
                     f"{_known_cell(a)} | {refined or 'none'} | {flagged} |")
    n_known = sum(a["known"] for a in answers)
    named = sum(bool(a.get("answer_in_name")) for a in answers)
    return lines + ["", f"Known: {n_known} of {len(answers)} facts."
                    + (f" Answer in the subject's name: {named} ({ex.NAME_NOTE})." if named else ""), ""]


def _known_cell(answer: dict) -> str:
    label = ex.known_verdict(bool(answer.get("answer_in_name")), answer["known"]).label
    return {"known": "yes", "not known": "**no**"}.get(label, "**no** (answer in the subject's name)")


def specificity_markdown(report: dict) -> list[str]:
    sc = report.get("subject_control")
    if not sc:
        return []
    kept = report.get("parameters", {}).get("keep_template")
    lines = ["## Subject specificity (knowledge, not templates)", "",
             "Rule (docs/SPECIFICITY.md, with every change made after a run and the data it was then measured "
             f"on): {sc['rule']}. "
             f"{sc['controlled']} of {sc['facts']} facts controlled with {sc['control_subjects']} control subjects "
             f"and {sc['control_prompts']} control prompts ({report.get('timings', {}).get('subject_control', 0):.0f} s); "
             f"{sc['template']} of "
             f"{sc['candidates']} candidate neurons flagged template, "
             + ("**kept** (`--keep-template`)." if kept else "**taken out** of the facts' refined sets (the default; "
                                                             "`--keep-template` keeps them)."), ""]
    if sc["not_controlled"]:
        lines += ["Not controlled (their neurons keep their place):", ""]
        lines += [f"- {x['relation']} {x['subject']}: {x['reason']}" for x in sc["not_controlled"]] + [""]
    lines += ["| | facts | mean refined per fact | shared, same relation | shared, other relations | in layer 0 | "
              "layer-0 neurons refined for every fact of a relation |", "|---|---|---|---|---|---|---|"]
    for name, key in (("without the control", "without_control"), ("with the control", "with_control")):
        for side, label in (("known", "known facts"), ("unknown", UNKNOWN),
                            ("all", "all facts, known and unknown together")):
            s = sc[key][side]
            if not s.get("facts"):
                lines.append(f"| {name}, {label} | 0 | | | | | |")
                continue
            share, every = _layer0(s)
            lines.append(f"| {name}, {label} | {s['facts']} | {_n(s['mean_neurons_per_fact'])} | "
                         f"{_n(s['shared_intra_relation'])} | {_n(s['shared_inter_relation'])} | {share} | {every} |")
    return lines + [""]


def syntax_markdown(report: dict) -> list[str]:
    """Syntax neurons beside knowledge neurons (kn_core.syntax)."""
    sx = report.get("syntax")
    if not sx:
        return []
    lines = ["## Syntax neurons (Niu et al., ICLR 2024)", "", f"Items: {sx['source']}.", ""]
    dropped = [f"- {x['item']}" + (f" {x['prompt']!r}" if x.get("prompt") else "") + f": {x['reason']}"
               for x in sx.get("left_out", [])]
    if dropped:
        lines += ["Left out:", "", *dropped, ""]
    if not sx.get("applicable"):
        return lines + [f"n/a: {sx['reason']}", ""]
    st, kn = sx["statistics"], report.get("neuron_statistics") or {}

    def layers(hist):
        return ", ".join(f"L{l}: {c}" for l, c in enumerate(hist or []) if c) or "none"

    lines += [f"Each item is attributed as a fact is (its sentences as prompts, the grammatical next word as the "
              f"answer; p adapted over the items: {sx['p']:.2f}); the neurons the experiments' facts use are beside "
              "them.", "",
              "| | items or facts | mean refined neurons | in layer 0 | layers |", "|---|---|---|---|---|",
              f"| syntax items | {st['facts']} | {_n(st['mean_neurons_per_fact'])} | {_layer0(st)[0]} | "
              f"{layers(st['layer_histogram'])} |"]
    before = ((report.get("subject_control") or {}).get("without_control") or {}).get("all")
    rows = [("facts before the subject control (items have no subject to swap)", before)] if before else []
    rows.append(("facts (knowledge neurons the experiments use)", kn))
    for label, stats in rows:
        if stats.get("facts"):
            lines.append(f"| {label} | {stats['facts']} | {_n(stats['mean_neurons_per_fact'])} | "
                         f"{_layer0(stats)[0]} | {layers(stats['layer_histogram'])} |")
    lines += ["", "| item | refined neurons | shared with its minimal-pair partner | model prefers the grammatical "
              "form | p(grammatical) |", "|---|---|---|---|---|"]
    for r in sx["items"]:
        lines.append(f"| {r['id']} | {', '.join(f'L{l}#{i}' for l, i in r['refined']) or 'none'} | "
                     f"{', '.join(f'L{l}#{i}' for l, i in r['shared_with_pair']) or 'none'} | "
                     f"{_n(100 * r['prefers_grammatical'], '{:.0f}')}% of {r['prompts']} | "
                     f"{_n(r['p_grammatical'], '{:.3g}')} |")
    return lines + [""]
