"""The paper's experiments (Dai et al. 2022) over facts whose knowledge neurons are known, always beside
controls: neuron statistics, suppress/amplify, update, erase and activation by prompt. Each takes
`task: Task | None` (progress and cancel, see `kn_core.tasks`) and leaves the model exactly as it found it.
Probabilities and perplexities come from `evaluation`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import edits as _edits
from .edit_plan import (CALIBRATION_RANGE, calibrate_update, erase_neurons, make_update, negatively_active,
                        random_neurons, shared_rule_note)
from .evaluation import answer_perplexity, answer_probabilities, flip_rate, ratio, ratio_from_log10, with_edits
from .tasks import Task, as_task

# --------------------------------------------------------------------------------------------------------
# Neuron statistics
# --------------------------------------------------------------------------------------------------------

def neuron_statistics(fact_neurons: Sequence[Sequence[tuple[int, int]]], relations: Sequence[str], layers: int) -> dict:
    """Neurons per fact, their layer histogram, and the mean number of neurons shared by two facts of the same
    relation vs two facts of different relations (all pairs)."""
    sets = [set(map(tuple, n)) for n in fact_neurons]
    counts = [len(s) for s in sets]
    hist = [0] * layers
    for s in sets:
        for l, _ in s:
            hist[l] += 1
    intra, inter = [], []
    for a in range(len(sets)):
        for b in range(a + 1, len(sets)):
            (intra if relations[a] == relations[b] else inter).append(len(sets[a] & sets[b]))
    total = sum(counts)
    return {
        "refined_total": total, "layer0_share": hist[0] / total if total and layers else None,
        "layer0_share_interval": wilson_interval(hist[0], total) if total and layers else None,
        "layer0_in_every_fact": _layer0_in_every_fact(sets, relations),
        "facts": len(sets),
        "mean_neurons_per_fact": float(np.mean(counts)) if counts else float("nan"),
        "median_neurons_per_fact": float(np.median(counts)) if counts else float("nan"),
        "facts_without_neurons": int(sum(c == 0 for c in counts)),
        "layer_histogram": hist,
        "shared_intra_relation": float(np.mean(intra)) if intra else float("nan"),
        "shared_inter_relation": float(np.mean(inter)) if inter else float("nan"),
        "pairs_intra": len(intra), "pairs_inter": len(inter),
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> list[float]:
    """The Wilson score interval of a share k / n (95% by default; Wilson 1927): the shares p0 that a score
    test of k in n at p0 does not reject. Unlike k / n +- z * se it stays in [0, 1] and is not empty at k = 0,
    which matters at the few neurons a reproduction refines. Neurons of one fact are not independent draws, so
    for neuron shares the interval is if anything too narrow."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def _layer0_in_every_fact(sets: list[set], relations: Sequence[str]) -> list[dict]:
    """Layer-0 neurons refined for every fact of a relation that has at least two facts: a neuron of the
    template's wording, not of any fact (issue #21)."""
    out = []
    for rel in dict.fromkeys(relations):
        facts = [s for s, r in zip(sets, relations) if r == rel]
        if len(facts) < 2:
            continue
        common = set.intersection(*facts)
        out += [{"relation": rel, "neuron": [0, n[1]], "facts": len(facts)} for n in sorted(common) if n[0] == 0]
    return out


# --------------------------------------------------------------------------------------------------------
# Known and unknown facts
# --------------------------------------------------------------------------------------------------------

KNOWN_RULE = ("known: the model's greedy answer is the fact's answer (every answer token top-1, teacher-forced) on "
              "more than half of the fact's prompts, and the answer is not part of the subject's name (LAMA-UHN)")

# LAMA-UHN's first filter (Poerner, Waltinger & Schuetze 2020, "E-BERT", Findings of EMNLP): a triple whose answer
# is a case-insensitive substring of the subject's name can be answered by reading the name, not only by recall.
NAME_NOTE = ("the answer is part of the subject's name (LAMA-UHN, Poerner et al. 2020): the model can answer by "
             "reading the name, so answering is no evidence that it knows the fact")


# One line wherever a fact's neurons are shown and the model does not know the fact (docs/SPECIFICITY.md)
NOT_KNOWN_NOTE = ("its neurons push the answer's type from the template, not this fact (template-like by "
                  "construction)")


def is_known(accuracy: float) -> bool:
    """The answer is the model's top-1 on more than half of the fact's prompts (the first half of KNOWN_RULE; the
    paper's update takes such "correctly answered" facts)."""
    return accuracy > 0.5


def answer_in_name(fact) -> bool:
    """LAMA-UHN's filter: the fact's answer is a case-insensitive substring of its subject (NAME_NOTE)."""
    answer = str(fact.object).strip().casefold()
    return bool(answer) and answer in str(fact.subject).casefold()


def knows(fact, accuracy: float) -> bool:
    """KNOWN_RULE: answered top-1 on more than half of its prompts, and not answerable from the subject's name."""
    return is_known(accuracy) and not answer_in_name(fact)


class KnownVerdict(NamedTuple):
    label: str  # "known", "not known", "not counted as known" or "not checked": a table cell
    lead: str   # what a sentence about the fact says ("" when there is nothing to warn of)
    why: str    # NAME_NOTE or NOT_KNOWN_NOTE ("" with no lead)


def known_verdict(answer_in_name: bool, known: bool | None) -> KnownVerdict:
    """How every front end names a fact's status: "not counted as known" when its answer is in its subject's
    name (whatever the model answers), "not known" when the checks say so, else "known" ("not checked" when
    `known` is None)."""
    if answer_in_name:
        return KnownVerdict("not counted as known", "not counted as known", NAME_NOTE)
    if known is None:
        return KnownVerdict("not checked", "", "")
    if known:
        return KnownVerdict("known", "", "")
    return KnownVerdict("not known", "the model does not know this fact", NOT_KNOWN_NOTE)


def fact_answers(lm, facts_prompts: Sequence[tuple[object, Sequence]], batch_size: int = 32,
                 task: Task | None = None) -> list[dict]:
    """Per (fact, prompts): mean p(answer), median and best rank of its first token, the share of prompts where
    it is top-1 and whether the fact is known (KNOWN_RULE); one batched forward pass over all prompts."""
    prompts = [p for _, ps in facts_prompts for p in ps]
    rows = answer_probabilities(lm, prompts, batch_size, task=task) if prompts else []
    out, at = [], 0
    for fact, ps in facts_prompts:
        chunk, at = rows[at:at + len(ps)], at + len(ps)
        accuracy = float(np.mean([r["correct"] for r in chunk])) if chunk else float("nan")
        out.append({"relation": fact.relation, "subject": fact.subject, "object": fact.object,
                    "prob": float(np.mean([r["prob"] for r in chunk])) if chunk else float("nan"),
                    "rank_median": float(np.median([r["rank"] for r in chunk])) if chunk else float("nan"),
                    "rank_best": int(min(r["rank"] for r in chunk)) if chunk else None,
                    "top1_share": accuracy, "answer_in_name": answer_in_name(fact),
                    "known": bool(chunk) and knows(fact, accuracy)})
    return out


def fact_label(relation: str, subject: str) -> str:
    """"relation:subject", the label `known_by_label`, `split_by_known` and the reports key facts by."""
    return f"{relation}:{subject}"


def known_by_label(answers: Sequence[dict] | None) -> dict[str, bool]:
    """{fact_label: known} of `fact_answers` rows; empty for none."""
    return {fact_label(a["relation"], a["subject"]): a["known"] for a in answers or ()}


def split_by_known(rows: Sequence[dict], known: Mapping[str, bool], keys: Sequence[str],
                   fact_key: str = "fact") -> dict:
    """Means of `keys` over rows of known and of unknown facts (`known`: {fact label: bool}); a fact missing
    from `known` counts as neither, and each side says how many facts it holds."""
    out = {}
    for side, want in (("known", True), ("unknown", False)):
        picked = [r for r in rows if known.get(r[fact_key]) is want]
        out[side] = {"facts": len(picked), **{k: _mean_ignoring_nan([r.get(k) for r in picked]) for k in keys}}
    return out


# --------------------------------------------------------------------------------------------------------
# The paper's experiments, over facts whose knowledge neurons are known
# --------------------------------------------------------------------------------------------------------

@dataclass
class FactNeurons:
    """One fact of an experiment: its prompts, refined knowledge neurons, the activation baseline's refined
    neurons and (optionally) each prompt's activations [layers, neurons] at the answer position."""
    fact: object
    prompts: list
    neurons: list
    baseline_neurons: list
    activations: list | None = None

    @property
    def relation(self) -> str:
        return self.fact.relation


def _sample(items: list, k: int, rng: np.random.Generator) -> list:
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]


def _without(records: Sequence[FactNeurons], exclude) -> list[FactNeurons]:
    """The records with the `exclude`d neurons (e.g. `NeuronFlags.excluded`: massive/unspecific) taken out of
    their knowledge and baseline sets."""
    exclude = set(map(tuple, exclude))
    if not exclude:
        return list(records)
    return [replace(r, neurons=[n for n in r.neurons if tuple(n) not in exclude],
                    baseline_neurons=[n for n in r.baseline_neurons if tuple(n) not in exclude]) for r in records]


AMPLIFY_MEANING = ("activation x factor of the signed activation: a negative activation becomes more negative, so "
                   "the neuron's contribution (activation x value vector) grows in the direction it already pushes")


def _add(acc: dict, slot, before: Sequence[dict], after: Sequence[dict]) -> None:
    """Pools one fact's rows of one prompt group into `acc[slot]` (`_pool` reads it)."""
    a = acc.setdefault(slot, {"before": 0.0, "after": 0.0, "rows_before": [], "rows_after": [], "n": 0})
    for b, x in zip(before, after):
        a["before"] += b["prob"]
        a["after"] += x["prob"]
    a["rows_before"] += before
    a["rows_after"] += after
    a["n"] += len(before)


def _pool(acc: dict) -> dict:
    rc = (acc["after"] - acc["before"]) / acc["before"] if acc["before"] > 0 else float("nan")
    return {"relative_change": rc, "flip_rate": flip_rate(acc["rows_before"], acc["rows_after"]), "n_prompts": acc["n"]}


def suppress_amplify_experiment(lm, records: Sequence[FactNeurons], factor: float = 2.0, seed: int = 0,
                                control_prompts: int = 20, batch_size: int = 32, exclude=(),
                                activation_stats=None, known: Mapping[str, bool] | None = None,
                                task: Task | None = None) -> dict:
    """Suppress (activation -> 0) and amplify (x factor, see AMPLIFY_MEANING) each fact's knowledge neurons at
    the answer position. `exclude`: neurons never edited (flagged massive/unspecific; also kept out of the
    random control). `activation_stats` (`kn_core.neurons.ActivationStats`) adds "suppress_mean": mean
    ablation, each neuron set to its mean activation instead of 0.

    Per relation: mean(Δp)/mean(p) pooled over the prompts of its facts, for three groups of prompts (the
    fact's own; `control_prompts` sampled from other facts of the same relation; as many from other
    relations) and three neuron sets (knowledge neurons; the activation baseline's neurons; as many random
    neurons from the same layers, seeded). Facts without knowledge neurons are left out (counted); a fact
    whose baseline set is empty contributes Δp = 0 to the baseline. `average` averages relations."""
    task = as_task(task)
    rng = np.random.default_rng(seed)
    records = _without(records, exclude)
    all_prompts = [p for r in records for p in r.prompts]
    key = {id(p): i for i, p in enumerate(all_prompts)}
    base = answer_probabilities(lm, all_prompts, batch_size)
    methods, groups = ("knowledge", "baseline", "random"), ("own", "same_relation", "other_relations")
    ops = ("suppress", "amplify") + (("suppress_mean",) if activation_stats is not None else ())

    def make(op, neurons):
        if op == "amplify":
            return _edits.Amplify(neurons, factor)
        if op == "suppress_mean":
            return _edits.Suppress(neurons, "answer", "mean", tuple(float(activation_stats.mean[n]) for n in neurons))
        return _edits.Suppress(neurons)

    acc: dict = {}
    used = [r for r in records if r.neurons]
    skipped = [f"{r.fact.relation}:{r.fact.subject}" for r in records if not r.neurons]
    for n_done, (i, rec) in enumerate((i, r) for i, r in enumerate(records) if r.neurons):
        task.check()
        same = [p for r in records if r.relation == rec.relation and r is not rec for p in r.prompts]
        other = [p for r in records if r.relation != rec.relation for p in r.prompts]
        sets = {"own": list(rec.prompts), "same_relation": _sample(same, control_prompts, rng),
                "other_relations": _sample(other, control_prompts, rng)}
        prompts = [p for g in groups for p in sets[g]]
        neuron_sets = {"knowledge": rec.neurons, "baseline": rec.baseline_neurons,
                       "random": random_neurons(lm, rec.neurons, seed=seed * 1_000_003 + i, exclude=exclude)}
        before = [base[key[id(p)]] for p in prompts]
        for method in methods:
            for op in ops:
                neurons = tuple(map(tuple, neuron_sets[method]))
                if neurons:
                    edit = make(op, neurons)
                    after = with_edits(lm, [edit], lambda: answer_probabilities(lm, prompts, batch_size))
                else:
                    after = before
                at = 0
                for g in groups:
                    n = len(sets[g])
                    side = {True: "known", False: "unknown"}.get((known or {}).get(f"{rec.relation}:{rec.fact.subject}"))
                    for slot in ((rec.relation, method, op, g),) + (((side, method, op, g),) if side else ()):
                        _add(acc, slot, before[at:at + n], after[at:at + n])
                    at += n
        task.progress((n_done + 1) / max(len(used), 1), f"{rec.fact.relation}:{rec.fact.subject}")
    relations = sorted({r.relation for r in used})
    per_relation = {rel: {m: {op: {g: _pool(acc[(rel, m, op, g)]) for g in groups} for op in ops} for m in methods}
                    | {"facts": sum(r.relation == rel for r in used)} for rel in relations}
    average = {m: {op: {g: _mean_ignoring_nan([per_relation[rel][m][op][g]["relative_change"] for rel in relations])
                        for g in groups} for op in ops} for m in methods}
    flips = {m: {op: {g: _mean_ignoring_nan([per_relation[rel][m][op][g]["flip_rate"] for rel in relations])
                      for g in groups} for op in ops} for m in methods}
    # known / unknown facts (`known`: {"relation:subject": bool}, KNOWN_RULE): pooled over the facts of each side
    by_known = {side: {"facts": sum(known.get(f"{r.relation}:{r.fact.subject}") is (side == "known") for r in used),
                       **{m: {op: {g: _pool(acc[(side, m, op, g)]) for g in groups} for op in ops} for m in methods}}
                for side in ("known", "unknown") if known and (side, methods[0], ops[0], groups[0]) in acc}
    return {"factor": factor, "amplify_meaning": AMPLIFY_MEANING, "control_prompts": control_prompts, "seed": seed,
            "by_known": by_known,
            "excluded_neurons": len(set(map(tuple, exclude))), "per_relation": per_relation, "average": average,
            "average_flip_rate": flips, "facts_used": len(used), "facts_without_neurons": skipped}


def _counterfactual_prompts(lm, factset, fact, new_object: str, templates: Sequence[str]) -> dict:
    from .facts import Fact, render_prompts

    relation = factset.relation(fact.relation)
    prompts, _ = render_prompts(Fact(fact.relation, fact.subject, new_object), relation, lm.tokenizer, lm.kind)
    return {p.template: p for p in prompts if p.template in templates}


def update_experiment(lm, records: Sequence[FactNeurons], factset, seed: int = 0, facts_per_relation: int = 10,
                      lambda1: float = 1.0, lambda2: float = 8.0, fraction: float = 0.1,
                      control_prompts: int = 20, batch_size: int = 32, embedding: str | None = None,
                      exclude=(), calibrated: bool = True, task: Task | None = None) -> dict:
    """The paper's update <s, r, o> -> <s, r, o'> on up to `facts_per_relation` correctly answered facts per
    relation (o' a random other object of the relation, seeded), beside random neurons from the same layers.

    Arms per fact: "knowledge" (the paper's edit), "random" (the same edit on random neurons), with the
    prompts' activations "sign_aware" (reversed on negatively active neurons), and with `calibrated`
    "calibrated" (sign-aware, lambdas scaled by the smallest s at which o' wins on the fact's prompts, see
    `edit_plan.calibrate_update`) beside "calibrated_random" (random neurons at the same scale).
    Per arm, on the fact's prompts: change rate (top-1 no longer the old top-1), success rate (o' greedy at
    every answer token), top-5 rate; on prompts of other facts of the same relation (intra) and of other
    relations (inter): answer perplexity before and after, summarised as ratios (`update_summary`)."""
    task = as_task(task)
    rng = np.random.default_rng(seed + 17)
    records = _without(records, exclude)
    by_relation: dict[str, list[FactNeurons]] = {}
    for r in records:
        by_relation.setdefault(r.relation, []).append(r)
    candidates, skipped = _update_candidates(lm, by_relation, factset, facts_per_relation, fraction, lambda1,
                                             lambda2, embedding, batch_size, rng)
    rows = []
    for n_done, (rec, update, (new_object, cf)) in enumerate(candidates):
        task.check()
        same = _sample([p for r in by_relation[rec.relation] if r is not rec for p in r.prompts], control_prompts, rng)
        other = _sample([p for r in records if r.relation != rec.relation for p in r.prompts], control_prompts, rng)
        rows.append(_update_row(lm, rec, update, new_object, cf, same, other, seed * 7919 + n_done, exclude,
                                calibrated, batch_size, task.slice(n_done / len(candidates), (n_done + 1) / len(candidates))))
        task.progress((n_done + 1) / max(len(candidates), 1), rows[-1]["fact"])
    arms = ("knowledge", "random", "sign_aware") + (("calibrated", "calibrated_random") if calibrated else ())
    shared_rule = {rel: shared_rule_note(len(recs) - 1, fraction) or "applied" for rel, recs in by_relation.items()}
    return {"lambda1": lambda1, "lambda2": lambda2, "exclusion_fraction": fraction, "shared_rule": shared_rule,
            "left_out_by_shared_rule": sum("shared by" in x["reason"] for x in skipped),
            "embedding": embedding or _edits.default_embedding(lm), "multi_token": _edits.default_multi_token(lm),
            "calibration_range": list(CALIBRATION_RANGE) if calibrated else None,
            "facts": rows, "skipped": skipped,
            **{arm: update_summary([r for r in rows if arm in r], arm) for arm in arms}}


def _update_candidates(lm, by_relation, factset, facts_per_relation, fraction, lambda1, lambda2, embedding,
                       batch_size, rng):
    """Per relation, up to `facts_per_relation` facts that the model answers, with an update (o' not chosen
    yet) and o' with its prompts; the others skipped with a reason."""
    candidates, skipped = [], []
    for rel, recs in by_relation.items():
        picked = 0
        for rec in recs:
            if picked >= facts_per_relation:
                break
            label = f"{rel}:{rec.fact.subject}"
            if not rec.neurons:
                skipped.append({"fact": label, "reason": "no knowledge neurons"})
                continue
            before = answer_probabilities(lm, rec.prompts, batch_size)
            if not is_known(float(np.mean([b["correct"] for b in before]))):
                skipped.append({"fact": label, "reason": "not known (the answer is top-1 on at most half of its "
                                                         "prompts)"})
                continue
            others_sets = [r.neurons for r in recs if r is not rec]
            update = make_update(lm, rec.neurons, rec.prompts[0].answer_ids, (), others_sets, fraction, lambda1,
                                 lambda2, embedding)
            if not update.neurons:
                skipped.append({"fact": label, "reason": f"all its neurons are shared by >{fraction:.0%} of the "
                                                         f"relation's {len(others_sets)} other facts"})
                continue
            others = [o for o in dict.fromkeys(r.fact.object for r in recs) if o != rec.fact.object]
            rng.shuffle(others)
            chosen = None
            for o in others:
                cf = _counterfactual_prompts(lm, factset, rec.fact, o, [p.template for p in rec.prompts])
                if cf and all(cf.get(p.template) is None or cf[p.template].answer_ids[0] != p.answer_ids[0] for p in rec.prompts):
                    chosen = (o, cf)
                    break
            if chosen is None:
                skipped.append({"fact": label, "reason": "no other object of the relation to move to"})
                continue
            picked += 1
            candidates.append((rec, update, chosen))
    return candidates, skipped


def _update_row(lm, rec, update, new_object, cf, same, other, seed, exclude, calibrated, batch_size, task) -> dict:
    """One updated fact: every arm applied in turn and measured, the model restored after each."""
    own = [p for p in rec.prompts if p.template in cf]
    new_prompts = [cf[p.template] for p in own]
    update = _edits.Update(update.neurons, own[0].answer_ids, new_prompts[0].answer_ids, update.lambda1,
                           update.lambda2, update.embedding, update.multi_token, update.excluded)
    before_own = answer_probabilities(lm, own, batch_size, top_k=5)
    ppl_before = {"intra": answer_perplexity(lm, same, batch_size) if same else float("nan"),
                  "inter": answer_perplexity(lm, other, batch_size) if other else float("nan")}
    row = {"fact": f"{rec.relation}:{rec.fact.subject}", "object": rec.fact.object, "new_object": new_object,
           "neurons": [list(n) for n in update.neurons], "excluded": [list(n) for n in update.excluded]}
    random_set = tuple(random_neurons(lm, update.neurons, seed=seed, exclude=exclude))
    arms = [("knowledge", update), ("random", replace(update, neurons=random_set, excluded=()))]
    flipped = negatively_active(update.neurons, rec.activations) if rec.activations else None
    if flipped is not None:  # ours, beyond the paper: the edit reversed on negatively active neurons
        row["flipped"] = [list(n) for n in flipped]
        arms.append(("sign_aware", replace(update, flipped=flipped)))
    extra: dict[str, dict] = {}
    if calibrated:
        if flipped is None:
            from .evaluation import neuron_activations

            mean = neuron_activations(lm, update.neurons, rec.prompts).mean(axis=0)
            flipped = tuple(n for n, m in zip(update.neurons, mean) if m < 0)
        edit, info = calibrate_update(lm, replace(update, flipped=flipped), new_prompts, task=task)
        row["calibration"] = info
        extra = {"calibrated": {"scale": info["scale"], "reached": float(info["reached"])},
                 "calibrated_random": {"scale": info["scale"]}}
        arms += [("calibrated", edit), ("calibrated_random", replace(edit, neurons=random_set, excluded=(),
                                                                        flipped=()))]
    for name, edit in arms:
        def measure():
            after_own = answer_probabilities(lm, own, batch_size, top_k=5)
            after_new = answer_probabilities(lm, new_prompts, batch_size, top_k=5)
            return after_own, after_new, {
                "intra": answer_perplexity(lm, same, batch_size) if same else float("nan"),
                "inter": answer_perplexity(lm, other, batch_size) if other else float("nan")}
        after_own, after_new, ppl_after = with_edits(lm, [edit], measure)
        row[name] = {
            "change_rate": flip_rate(before_own, after_own),
            "success_rate": float(np.mean([a["correct"] for a in after_new])),
            "top5_rate": float(np.mean([a["in_top_k"] for a in after_new])),
            "p_old_before": float(np.mean([b["prob"] for b in before_own])),
            "p_old_after": float(np.mean([a["prob"] for a in after_own])),
            "p_new_after": float(np.mean([a["prob"] for a in after_new])),
            "ppl_intra_before": ppl_before["intra"], "ppl_intra_after": ppl_after["intra"],
            "ppl_inter_before": ppl_before["inter"], "ppl_inter_after": ppl_after["inter"],
            **extra.get(name, {}),
        }
    return row


def update_summary(rows: list[dict], name: str) -> dict:
    """Means over updated facts of one arm, and the perplexity changes as ratios after/before per fact
    ({"ratio", "log10", "text"}: median and geometric mean over facts; "x1.2e26", never a 30-digit
    difference). A calibrated arm also gives its median scale and the share of facts where o' won."""
    if not rows:
        return {}
    vals = [r[name] for r in rows]
    out = {k: _mean_ignoring_nan([v[k] for v in vals]) for k in vals[0] if not k.startswith("ppl_")}
    if "scale" in out:
        out["scale"] = float(np.median([v["scale"] for v in vals]))
    if "reached" in out:
        out["reached_rate"] = out.pop("reached")
    for kind in ("intra", "inter"):
        logs = [ratio(v[f"ppl_{kind}_before"], v[f"ppl_{kind}_after"])["log10"] for v in vals]
        logs = [x for x in logs if x is not None]
        out[f"ppl_{kind}_ratio_median"] = ratio_from_log10(float(np.median(logs)) if logs else None)
        out[f"ppl_{kind}_ratio_geomean"] = ratio_from_log10(float(np.mean(logs)) if logs else None)
    return out


def erase_experiment(lm, records: Sequence[FactNeurons], k: int = 20, fill: str = "zero", seed: int = 0,
                     control_prompts: int = 40, batch_size: int = 32, exclude=(), task: Task | None = None) -> dict:
    """Erase each relation (its k most frequent knowledge neurons' value vectors -> zero or [UNK]); accuracy
    and answer perplexity on its prompts and on `control_prompts` sampled from other relations, beside the
    same number of random neurons from the same layers. Perplexity changes also as ratios after/before
    ({"ratio", "log10", "text"}). `exclude`: neurons never erased (flagged massive/unspecific: erasing a
    massive neuron breaks every relation, which says nothing about the erased one)."""
    task = as_task(task)
    rng = np.random.default_rng(seed + 29)
    records = _without(records, exclude)
    relations = sorted({r.relation for r in records})
    out = {}
    for n_done, rel in enumerate(relations):
        task.check()
        recs = [r for r in records if r.relation == rel]
        neurons = erase_neurons([r.neurons for r in recs], k)
        if not neurons:
            out[rel] = {"skipped": "no knowledge neurons"}
            continue
        own = [p for r in recs for p in r.prompts]
        other = _sample([p for r in records if r.relation != rel for p in r.prompts], control_prompts, rng)
        emb = _edits.default_embedding(lm)

        def measure():
            a_own = answer_probabilities(lm, own, batch_size)
            a_other = answer_probabilities(lm, other, batch_size) if other else []
            return {"accuracy": float(np.mean([x["correct"] for x in a_own])),
                    "perplexity": answer_perplexity(lm, own, batch_size),
                    "other_accuracy": float(np.mean([x["correct"] for x in a_other])) if a_other else float("nan"),
                    "other_perplexity": answer_perplexity(lm, other, batch_size) if other else float("nan")}

        def with_ratios(after):
            return after | {"perplexity_ratio": ratio(before["perplexity"], after["perplexity"]),
                            "other_perplexity_ratio": ratio(before["other_perplexity"], after["other_perplexity"])}

        before = measure()
        random_set = random_neurons(lm, neurons, seed=seed * 104729 + n_done, exclude=exclude)
        out[rel] = {"neurons": [list(n) for n in neurons], "before": before,
                    "knowledge": with_ratios(with_edits(lm, [_edits.Erase(tuple(neurons), fill, emb)], measure)),
                    "random": with_ratios(with_edits(lm, [_edits.Erase(tuple(random_set), fill, emb)], measure))}
        if len(neurons) < k:
            out[rel]["fewer_neurons"] = f"only {len(neurons)} distinct knowledge neurons in {len(recs)} facts"
        task.progress((n_done + 1) / len(relations), rel)
    return {"k": k, "fill": fill, "excluded_neurons": len(set(map(tuple, exclude))), "per_relation": out}


def activation_by_prompt(lm, records: Sequence[FactNeurons], factset, prompts_per_group: int = 20,
                         corpus: Sequence[str] | None = None, seed: int = 0, batch_size: int = 32,
                         task: Task | None = None) -> dict:
    """The paper's activation-by-prompt comparison: a fact's knowledge neurons' mean activation on prompts
    that express the fact (its own prompts), that only share its subject (other relations' templates filled
    with the same subject), and random prompts (the same templates of the other relations filled with other
    subjects), plus an optional `corpus` of sentences (e.g. one per line of a user's text file; the activation
    is averaged over a sentence's tokens).

    Subject-only and random prompts are matched template for template: both are drawn from the same (relation,
    template) pairs with the same seeded sample, so the two groups differ only in the subject. (Until issue #21
    the random group was the run's other facts' prompts: other templates than the subject-only group's, so the
    comparison measured the template sets as much as the subject.)

    Direction: each neuron's activation is multiplied by the direction that raises the answer. A refined
    neuron has Attr = w x (integrated gradient) > 0, so that direction is the sign of its activation w on the
    fact's prompts; without this, the negative activations of SwiGLU/GELU neurons cancel the positive ones
    and the comparison says nothing. Up to `prompts_per_group` prompts per group and fact (seeded sample).
    Returns the means over facts ("expressing", "subject_only", "random", "corpus") and "per_fact"."""
    from .evaluation import neuron_activations

    task = as_task(task)
    rng = np.random.default_rng(seed + 41)
    groups = ("expressing", "subject_only", "random") + (("corpus",) if corpus else ())
    per_fact = []
    used = [r for r in records if r.neurons]
    for n_done, rec in enumerate(used):
        task.check()
        neurons = [tuple(n) for n in rec.neurons]
        pairs = _matched_prompts(lm, rec, factset, rng)
        picked = _sample(list(range(len(pairs))), prompts_per_group, rng)
        items = {"expressing": list(rec.prompts), "subject_only": [pairs[i][0] for i in picked],
                 "random": [pairs[i][1] for i in picked]}
        if corpus:
            items["corpus"] = list(corpus)
        own = neuron_activations(lm, neurons, items["expressing"], batch_size=batch_size)
        direction = np.where(own.mean(axis=0) < 0, -1.0, 1.0)
        row = {"fact": f"{rec.relation}:{rec.fact.subject}", "direction": direction.astype(int).tolist()}
        for g in groups:
            if not items[g]:
                row[g] = float("nan")
                continue
            acts = own if g == "expressing" else neuron_activations(
                lm, neurons, items[g], position="mean" if g == "corpus" else "answer", batch_size=batch_size)
            row[g] = float((acts * direction).mean())
            row[f"n_{g}"] = len(items[g])
        per_fact.append(row)
        task.progress((n_done + 1) / max(len(used), 1), row["fact"])
    means = {g: _mean_ignoring_nan([r[g] for r in per_fact]) for g in groups}
    return {**means, "facts": len(per_fact), "prompts_per_group": prompts_per_group,
            "direction": "activation x sign of the neuron's activation on the fact's prompts (the sign that "
                         "raises the answer, as Attr > 0)",
            "random_prompts": "the subject-only prompts' templates filled with another subject of that relation "
                              "(matched template for template)", "per_fact": per_fact}


def _matched_prompts(lm, rec: FactNeurons, factset, rng: np.random.Generator) -> list[tuple]:
    """(subject-only prompt, random prompt) pairs on the same template of each other relation: the fact's
    subject, and a seeded random other subject of that relation."""
    from .facts import Fact, render_prompts

    pairs = []
    for rid, relation in factset.relations.items():
        if rid == rec.relation:
            continue
        facts = factset.facts_of(rid)
        known = [f for f in facts if f.subject == rec.fact.subject]
        others = [f for f in facts if f.subject != rec.fact.subject]
        if not others:
            continue
        mine = known[0] if known else Fact(rid, rec.fact.subject, others[0].object)
        other = others[int(rng.integers(len(others)))]
        theirs = {p.template: p for p in render_prompts(other, relation, lm.tokenizer, lm.kind)[0]}
        pairs += [(p, theirs[p.template]) for p in render_prompts(mine, relation, lm.tokenizer, lm.kind)[0]
                  if p.template in theirs]
    return pairs


def _mean_ignoring_nan(values) -> float:
    """np.nanmean without its warning: NaN (which the reports print as n/a) when no value is a number, e.g. a
    relation without a measurable fact."""
    numbers = [float(v) for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(numbers)) if numbers else float("nan")
