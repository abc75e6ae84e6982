"""The paper's experiments (Dai et al. 2022) over facts whose knowledge neurons are known, always beside
controls: neuron statistics, suppress/amplify, update, erase and activation by prompt. Each takes
`task: Task | None` (progress and cancel, see `kn_core.tasks`) and leaves the model exactly as it found it.
Probabilities and perplexities come from `evaluation`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import edits as _edits
from .evaluation import answer_perplexity, answer_probabilities, with_edits
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
    return {
        "facts": len(sets),
        "mean_neurons_per_fact": float(np.mean(counts)) if counts else float("nan"),
        "median_neurons_per_fact": float(np.median(counts)) if counts else float("nan"),
        "facts_without_neurons": int(sum(c == 0 for c in counts)),
        "layer_histogram": hist,
        "shared_intra_relation": float(np.mean(intra)) if intra else float("nan"),
        "shared_inter_relation": float(np.mean(inter)) if inter else float("nan"),
        "pairs_intra": len(intra), "pairs_inter": len(inter),
    }


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


def _pool(acc: dict) -> dict:
    rc = (acc["after"] - acc["before"]) / acc["before"] if acc["before"] > 0 else float("nan")
    return {"relative_change": rc, "flip_rate": acc["flips"] / acc["n"] if acc["n"] else float("nan"),
            "n_prompts": acc["n"]}


def suppress_amplify_experiment(lm, records: Sequence[FactNeurons], factor: float = 2.0, seed: int = 0,
                                control_prompts: int = 20, batch_size: int = 32, task: Task | None = None) -> dict:
    """Suppress (activation -> 0) and amplify (x factor) each fact's knowledge neurons at the answer position.

    Per relation: mean(Δp)/mean(p) pooled over the prompts of its facts, for three groups of prompts (the
    fact's own; `control_prompts` sampled from other facts of the same relation; as many from other
    relations) and three neuron sets (knowledge neurons; the activation baseline's neurons; as many random
    neurons from the same layers, seeded). Facts without knowledge neurons are left out (counted); a fact
    whose baseline set is empty contributes Δp = 0 to the baseline. `average` averages relations."""
    task = as_task(task)
    rng = np.random.default_rng(seed)
    all_prompts = [p for r in records for p in r.prompts]
    key = {id(p): i for i, p in enumerate(all_prompts)}
    base = answer_probabilities(lm, all_prompts, batch_size)
    methods, ops, groups = ("knowledge", "baseline", "random"), ("suppress", "amplify"), ("own", "same_relation", "other_relations")
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
                       "random": _edits.random_neurons(lm, rec.neurons, seed=seed * 1_000_003 + i)}
        before = [base[key[id(p)]] for p in prompts]
        for method in methods:
            for op in ops:
                neurons = neuron_sets[method]
                if neurons:
                    edit = _edits.Suppress(tuple(neurons)) if op == "suppress" else _edits.Amplify(tuple(neurons), factor)
                    after = with_edits(lm, [edit], lambda: answer_probabilities(lm, prompts, batch_size))
                else:
                    after = before
                at = 0
                for g in groups:
                    n = len(sets[g])
                    a = acc.setdefault((rec.relation, method, op, g), {"before": 0.0, "after": 0.0, "flips": 0, "n": 0})
                    for b, x in zip(before[at:at + n], after[at:at + n]):
                        a["before"] += b["prob"]
                        a["after"] += x["prob"]
                        a["flips"] += int(b["top1_id"] != x["top1_id"])
                        a["n"] += 1
                    at += n
        task.progress((n_done + 1) / max(len(used), 1), f"{rec.fact.relation}:{rec.fact.subject}")
    relations = sorted({r.relation for r in used})
    per_relation = {rel: {m: {op: {g: _pool(acc[(rel, m, op, g)]) for g in groups} for op in ops} for m in methods}
                    | {"facts": sum(r.relation == rel for r in used)} for rel in relations}
    average = {m: {op: {g: float(np.nanmean([per_relation[rel][m][op][g]["relative_change"] for rel in relations]))
                        if relations else float("nan") for g in groups} for op in ops} for m in methods}
    flips = {m: {op: {g: float(np.nanmean([per_relation[rel][m][op][g]["flip_rate"] for rel in relations]))
                      if relations else float("nan") for g in groups} for op in ops} for m in methods}
    return {"factor": factor, "control_prompts": control_prompts, "seed": seed, "per_relation": per_relation,
            "average": average, "average_flip_rate": flips, "facts_used": len(used),
            "facts_without_neurons": skipped}


def _counterfactual_prompts(lm, factset, fact, new_object: str, templates: Sequence[str]) -> dict:
    from .facts import Fact, render_prompts

    relation = factset.relation(fact.relation)
    prompts, _ = render_prompts(Fact(fact.relation, fact.subject, new_object), relation, lm.tokenizer, lm.kind)
    return {p.template: p for p in prompts if p.template in templates}


def update_experiment(lm, records: Sequence[FactNeurons], factset, seed: int = 0, facts_per_relation: int = 10,
                      lambda1: float = 1.0, lambda2: float = 8.0, fraction: float = 0.1,
                      control_prompts: int = 20, batch_size: int = 32, embedding: str | None = None,
                      task: Task | None = None) -> dict:
    """The paper's update <s, r, o> -> <s, r, o'> on up to `facts_per_relation` correctly answered facts per
    relation (o' a random other object of the relation, seeded), beside random neurons from the same layers.

    Per fact, on its own prompts: change rate (top-1 no longer the old top-1), success rate (o' is the greedy
    answer at every answer token), top-5 rate (o''s first token in the top 5); on prompts of other facts of
    the same relation (intra) and of other relations (inter): answer perplexity before and after."""
    task = as_task(task)
    rng = np.random.default_rng(seed + 17)
    by_relation: dict[str, list[FactNeurons]] = {}
    for r in records:
        by_relation.setdefault(r.relation, []).append(r)

    rows, skipped = [], []
    candidates = []
    for rel, recs in by_relation.items():
        picked = 0
        for rec in recs:
            if picked >= facts_per_relation:
                break
            before = answer_probabilities(lm, rec.prompts, batch_size)
            if not rec.neurons or np.mean([b["correct"] for b in before]) < 0.5:
                skipped.append({"fact": f"{rel}:{rec.fact.subject}", "reason": "not answered correctly" if rec.neurons else "no knowledge neurons"})
                continue
            others_sets = [r.neurons for r in recs if r is not rec]
            update = _edits.make_update(lm, rec.neurons, rec.prompts[0].answer_ids, (), others_sets, fraction,
                                        lambda1, lambda2, embedding)
            if not update.neurons:
                skipped.append({"fact": f"{rel}:{rec.fact.subject}", "reason": "all its neurons are shared by >10% of the relation's facts"})
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
                skipped.append({"fact": f"{rel}:{rec.fact.subject}", "reason": "no other object of the relation to move to"})
                continue
            picked += 1
            candidates.append((rec, update, before, chosen))
    for n_done, (rec, update, before, (new_object, cf)) in enumerate(candidates):
        task.check()
        own = [p for p in rec.prompts if p.template in cf]
        new_prompts = [cf[p.template] for p in own]
        update = _edits.Update(update.neurons, own[0].answer_ids, new_prompts[0].answer_ids, update.lambda1,
                               update.lambda2, update.embedding, update.multi_token, update.excluded)
        same = _sample([p for r in by_relation[rec.relation] if r is not rec for p in r.prompts], control_prompts, rng)
        other = _sample([p for r in records if r.relation != rec.relation for p in r.prompts], control_prompts, rng)
        before_own = answer_probabilities(lm, own, batch_size, top_k=5)
        ppl_before = {"intra": answer_perplexity(lm, same, batch_size) if same else float("nan"),
                      "inter": answer_perplexity(lm, other, batch_size) if other else float("nan")}
        row = {"fact": f"{rec.relation}:{rec.fact.subject}", "object": rec.fact.object, "new_object": new_object,
               "neurons": [list(n) for n in update.neurons], "excluded": [list(n) for n in update.excluded]}
        random_update = _edits.Update(tuple(_edits.random_neurons(lm, update.neurons, seed=seed * 7919 + n_done)),
                                      update.old_ids, update.new_ids, update.lambda1, update.lambda2,
                                      update.embedding, update.multi_token)
        arms = [("knowledge", update), ("random", random_update)]
        if rec.activations:  # ours, beyond the paper: the edit reversed on negatively active neurons
            flipped = _edits.negatively_active(update.neurons, rec.activations)
            row["flipped"] = [list(n) for n in flipped]
            arms.append(("sign_aware", replace(update, flipped=flipped)))
        for name, edit in arms:
            def measure():
                after_own = answer_probabilities(lm, own, batch_size, top_k=5)
                after_new = answer_probabilities(lm, new_prompts, batch_size, top_k=5)
                return after_own, after_new, {
                    "intra": answer_perplexity(lm, same, batch_size) if same else float("nan"),
                    "inter": answer_perplexity(lm, other, batch_size) if other else float("nan")}
            after_own, after_new, ppl_after = with_edits(lm, [edit], measure)
            row[name] = {
                "change_rate": float(np.mean([b["top1_id"] != a["top1_id"] for b, a in zip(before_own, after_own)])),
                "success_rate": float(np.mean([a["correct"] for a in after_new])),
                "top5_rate": float(np.mean([a["in_top_k"] for a in after_new])),
                "p_old_before": float(np.mean([b["prob"] for b in before_own])),
                "p_old_after": float(np.mean([a["prob"] for a in after_own])),
                "p_new_after": float(np.mean([a["prob"] for a in after_new])),
                "ppl_intra_before": ppl_before["intra"], "ppl_intra_after": ppl_after["intra"],
                "ppl_inter_before": ppl_before["inter"], "ppl_inter_after": ppl_after["inter"],
            }
        rows.append(row)
        task.progress((n_done + 1) / max(len(candidates), 1), row["fact"])

    return {"lambda1": lambda1, "lambda2": lambda2, "exclusion_fraction": fraction,
            "embedding": embedding or _edits.default_embedding(lm), "multi_token": _edits.default_multi_token(lm),
            "facts": rows, "skipped": skipped, "knowledge": update_summary(rows, "knowledge"),
            "random": update_summary(rows, "random"),
            "sign_aware": update_summary([r for r in rows if "sign_aware" in r], "sign_aware")}


def update_summary(rows: list[dict], name: str) -> dict:
    """Means over updated facts of one arm ("knowledge" or "random"), and perplexity changes as mean and
    median: one edit that wrecks a prompt's perplexity dominates the mean, so the median is reported beside it."""
    if not rows:
        return {}
    vals = [r[name] for r in rows]
    out = {k: float(np.nanmean([v[k] for v in vals])) for k in vals[0]}
    for kind in ("intra", "inter"):
        before = np.array([v[f"ppl_{kind}_before"] for v in vals], dtype=float)
        after = np.array([v[f"ppl_{kind}_after"] for v in vals], dtype=float)
        out[f"ppl_{kind}_change"] = float(np.nanmean(after - before))
        out[f"ppl_{kind}_change_rel"] = float(np.nanmean(after / before - 1))
        out[f"ppl_{kind}_change_median"] = float(np.nanmedian(after - before))
    return out


def erase_experiment(lm, records: Sequence[FactNeurons], k: int = 20, fill: str = "zero", seed: int = 0,
                     control_prompts: int = 40, batch_size: int = 32, task: Task | None = None) -> dict:
    """Erase each relation (its k most frequent knowledge neurons' value vectors -> zero or [UNK]); accuracy
    and answer perplexity on its prompts and on `control_prompts` sampled from other relations, beside the
    same number of random neurons from the same layers."""
    task = as_task(task)
    rng = np.random.default_rng(seed + 29)
    relations = sorted({r.relation for r in records})
    out = {}
    for n_done, rel in enumerate(relations):
        task.check()
        recs = [r for r in records if r.relation == rel]
        neurons = _edits.erase_neurons([r.neurons for r in recs], k)
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

        before = measure()
        random_set = _edits.random_neurons(lm, neurons, seed=seed * 104729 + n_done)
        out[rel] = {"neurons": [list(n) for n in neurons], "before": before,
                    "knowledge": with_edits(lm, [_edits.Erase(tuple(neurons), fill, emb)], measure),
                    "random": with_edits(lm, [_edits.Erase(tuple(random_set), fill, emb)], measure)}
        task.progress((n_done + 1) / len(relations), rel)
    return {"k": k, "fill": fill, "per_relation": out}


def activation_by_prompt(records: Sequence[FactNeurons]) -> dict:
    """Mean activation of a fact's knowledge neurons at the answer position on its own prompts, on prompts of
    other facts of its relation and on prompts of other relations (from the activations attribution
    recorded), averaged over facts."""
    own, same, other = [], [], []
    for rec in records:
        if not rec.neurons or rec.activations is None:
            continue
        idx = tuple(np.array(rec.neurons).T)

        def mean_act(recs):
            vals = [a[idx].mean() for r in recs if r.activations is not None for a in r.activations]
            return float(np.mean(vals)) if vals else float("nan")

        own.append(mean_act([rec]))
        same.append(mean_act([r for r in records if r.relation == rec.relation and r is not rec]))
        other.append(mean_act([r for r in records if r.relation != rec.relation]))
    return {"own_prompts": float(np.nanmean(own)) if own else float("nan"),
            "same_relation_other_facts": float(np.nanmean(same)) if same else float("nan"),
            "other_relations": float(np.nanmean(other)) if other else float("nan"), "facts": len(own)}
