"""Degeneracy test (Chen et al., AAAI 2024, "Journey to the Center of the Knowledge Neurons"): do some of a
fact's knowledge neurons carry it redundantly?

For a fact's prompts and its knowledge neurons, the answer is measured with each neuron suppressed alone,
each pair suppressed, and all suppressed (activation -> 0 at the answer positions, the paper's suppress), and
beside it the same for a random control set (as many neurons from the same layers, seeded).

Definitions, fixed before any measurement (`DegeneracyParams`):
- A suppression **removes** the fact when
  - criterion "top1" (default): the answer is no longer the greedy prediction (every answer token,
    teacher-forced) on more than half of the prompts on which the unedited model predicts it. Prompts the
    unedited model gets wrong say nothing about removal and are not counted; a fact it gets wrong on every
    prompt is "not applicable" under this criterion;
  - criterion "prob": the answer's mean probability over the prompts falls below `removed_below` (default
    0.5) times its unedited mean probability.
  Otherwise the suppression **leaves** the fact.
- A **redundant (degenerate) pair** {a, b}: suppressing a alone leaves the fact, suppressing b alone leaves
  it, suppressing both removes it: either neuron alone suffices (Chen et al.'s degenerate knowledge neurons).
- The **whole set is redundant** when suppressing all removes the fact but no single neuron's suppression
  does (this also covers many small additive contributions; the pairs are the sharper test).
- A **necessary** neuron removes the fact on its own.

Cost: 1 + n + C(n', 2) + 1 suppressions (n' = min(n, max_neurons)) of every prompt, run as batched forward
passes: the rows of one batch are (subset, prompt) pairs, and one hook per layer zeroes each row's own
neurons at its answer positions (`hooks.ActivationPatch`, removed when the batch ends, so the model is left
exactly as it was). Pairs beyond the cap are not tested and are listed in "left_out" with the reason; single
neurons and "all" always cover every neuron.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from . import edits as E
from .edit_plan import random_neurons
from .evaluation import _batch_forward, _encode_prompt, ratio
from .hooks import ActivationPatch
from .selection import Neuron
from .tasks import Task, as_task

CRITERIA = ("top1", "prob")


@dataclass(frozen=True)
class DegeneracyParams:
    criterion: str = "top1"
    removed_below: float = 0.5  # criterion "prob": removed below this fraction of the unedited mean probability
    max_neurons: int = 20  # pairs are tested among the first (strongest) max_neurons: 20 -> 190 pairs
    control: bool = True  # also test as many random neurons from the same layers
    seed: int = 0  # of the random control
    batch_size: int = 32

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {self.criterion!r}")
        if isinstance(self.removed_below, bool) or not isinstance(self.removed_below, (int, float)) \
                or not 0 < self.removed_below <= 1:
            raise ValueError(f"removed_below must be a fraction in (0, 1], not {self.removed_below!r}")
        for name, low in (("max_neurons", 2), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")

    def definition(self) -> str:
        """What "removes" means under these parameters, in one sentence for reports."""
        if self.criterion == "top1":
            return ("removes = the answer is no longer top-1 on more than half of the prompts the unedited model "
                    "gets right")
        return (f"removes = the answer's mean probability falls below {self.removed_below:g} x its unedited mean "
                "probability")

    def to_dict(self) -> dict:
        return {**asdict(self), "definition": self.definition()}


# --------------------------------------------------------------------------------------------------------
# Batched suppression
# --------------------------------------------------------------------------------------------------------

def suppressed_answers(lm, prompts: Sequence, subsets: Sequence[Sequence[Neuron]], batch_size: int = 32,
                       task: Task | None = None) -> list[list[dict]]:
    """For each subset of neurons (an empty one is the unedited model): each prompt's answer with those neurons'
    activations set to 0 at the answer positions, as `evaluation.answer_probabilities` measures it under
    `edits.Suppress(subset)`: [subset][prompt] -> {"prob", "logprob", "correct", "top1_id"}.

    One forward pass runs `batch_size` (subset, prompt-row) pairs; a hook per layer zeroes each row's own
    neurons (the same answer positions `evaluation` publishes to edits). The hooks end with each batch."""
    task = as_task(task)
    layout = lm.layout
    by_subset = [E._by_layer(E._norm_neurons(s)) for s in subsets]
    encoded = [_encode_prompt(lm, p) for p in prompts]
    rows = [(k, e) for k, prompt_rows in enumerate(encoded) for e in prompt_rows]
    jobs = [(s, e) for s in range(len(subsets)) for _, e in rows]
    logps: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        task.check()
        chunk = jobs[start:start + batch_size]
        width = max(len(e.ids) for _, e in chunk)
        answer = torch.zeros((len(chunk), width), dtype=torch.bool)
        zero: dict[int, torch.Tensor] = {}
        for row, (s, e) in enumerate(chunk):
            answer[row, e.positions] = True
            for layer, idx in by_subset[s].items():
                zero.setdefault(layer, torch.zeros((len(chunk), layout.neurons), dtype=torch.bool))[row, idx] = True

        def fn(layer, x, answer=answer, zero=zero):
            mask = answer.to(x.device)[:, : x.shape[1], None] & zero[layer].to(x.device)[:, None, :]
            return x.masked_fill(mask, 0)

        with ActivationPatch(layout, fn, layers=sorted(zero)):
            logps.extend(_batch_forward(lm, [e for _, e in chunk]))
        task.progress(min(1.0, (start + len(chunk)) / len(jobs)), "suppressing neuron subsets")
    out, at = [], 0
    for _ in subsets:
        answers = []
        for prompt_rows in encoded:
            logp = torch.cat(logps[at:at + len(prompt_rows)], dim=0)
            at += len(prompt_rows)
            targets = torch.tensor([t for e in prompt_rows for t in e.targets])
            lp = float(logp.gather(1, targets[:, None])[:, 0].sum())
            greedy = logp.argmax(dim=-1)
            answers.append({"prob": math.exp(lp), "logprob": lp, "correct": bool(torch.equal(greedy, targets)),
                            "top1_id": int(greedy[0])})
        out.append(answers)
    return out


# --------------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------------

def _ordered(neurons: Sequence[Neuron], scores) -> list[Neuron]:
    """Strongest first when scores are given ({neuron: score} or an array [layer, neuron]); else as given."""
    if scores is None:
        return list(neurons)
    value = (lambda n: float(scores.get(n, -np.inf))) if isinstance(scores, Mapping) else \
        (lambda n: float(scores[n[0], n[1]]))
    return sorted(neurons, key=lambda n: -value(n))  # stable: ties keep the given order


def _verdict(answers: list[dict], base: list[dict], known: list[int], params: DegeneracyParams) -> dict:
    """One suppression's row: mean probability, its ratio to the unedited one, the top-1 rate on the known
    prompts, and whether it removes the fact."""
    mean_prob = float(np.mean([a["prob"] for a in answers]))
    base_prob = float(np.mean([b["prob"] for b in base]))
    top1_rate = float(np.mean([answers[k]["correct"] for k in known])) if known else None
    if params.criterion == "top1":
        removes = top1_rate is not None and top1_rate < 0.5
    else:
        removes = mean_prob < params.removed_below * base_prob
    return {"mean_prob": mean_prob, "prob_ratio": ratio(base_prob, mean_prob), "top1_rate": top1_rate,
            "removes": bool(removes)}


def _name(n: Neuron) -> str:
    from .neurons import neuron_name

    return neuron_name(*n)


def _analyse(lm, prompts, neurons: list[Neuron], params: DegeneracyParams, task: Task) -> dict:
    tested = neurons[: params.max_neurons]
    pairs = list(combinations(tested, 2))
    subsets = [()] + [(n,) for n in neurons] + pairs + [tuple(neurons)]
    answers = suppressed_answers(lm, prompts, subsets, params.batch_size, task)
    base = answers[0]
    known = [k for k, b in enumerate(base) if b["correct"]]
    applicable = params.criterion != "top1" or bool(known)
    singles = [{"neurons": [list(n)], **_verdict(a, base, known, params)}
               for n, a in zip(neurons, answers[1:1 + len(neurons)])]
    pair_rows = [{"neurons": [list(a), list(b)], **_verdict(x, base, known, params)}
                 for (a, b), x in zip(pairs, answers[1 + len(neurons):-1])]
    whole = {"neurons": [list(n) for n in neurons], **_verdict(answers[-1], base, known, params)}
    removes_alone = {tuple(r["neurons"][0]) for r in singles if r["removes"]}
    for row in pair_rows:
        a, b = (tuple(n) for n in row["neurons"])
        row["redundant"] = applicable and row["removes"] and a not in removes_alone and b not in removes_alone
    whole["redundant"] = applicable and len(neurons) >= 2 and whole["removes"] and not removes_alone
    redundant_pairs = [r["neurons"] for r in pair_rows if r["redundant"]]
    left_out = [{"what": f"pairs with {_name(n)}", "reason": f"only the {params.max_neurons} strongest neurons are "
                 f"paired (max_neurons); {_name(n)} is tested alone and in 'all'"} for n in neurons[len(tested):]]
    total_pairs = len(neurons) * (len(neurons) - 1) // 2
    return {
        "applicable": applicable,
        "reason": None if applicable else "the unedited model does not give the answer top-1 on any prompt, so "
                                          "nothing can be removed (use criterion 'prob')",
        "neurons": [list(n) for n in neurons], "prompts": len(prompts), "known_prompts": len(known),
        "unedited": {"mean_prob": float(np.mean([b["prob"] for b in base])),
                     "top1_rate": float(np.mean([b["correct"] for b in base]))},
        "singles": singles, "pairs": pair_rows, "all": whole,
        "pairs_tested": len(pairs), "pairs_total": total_pairs, "left_out": left_out,
        "necessary": [[*n] for n in neurons if n in removes_alone],
        "redundant_pairs": redundant_pairs,
        "degenerate": bool(redundant_pairs) or whole["redundant"],
        "forward_rows": len(subsets) * len(prompts),
    }


def degeneracy_test(lm, prompts: Sequence, neurons: Iterable[Neuron], params: DegeneracyParams | None = None, *,
                    scores=None, exclude: Iterable[Neuron] = (), task: Task | None = None) -> dict:
    """The degeneracy test of one fact (see the module notes): its `prompts` (facts.Prompt) and knowledge
    `neurons`. `scores` ({neuron: score} or an array [layer, neuron]) orders the neurons strongest first, so
    the cap keeps the strongest for pairs; `exclude`: neurons the random control never draws (e.g. flagged).

    Returns the knowledge neurons' analysis (`singles`, `pairs`, `all`, `necessary`, `redundant_pairs`,
    `degenerate`, `left_out`, ...), `params` (with the definition of "removes") and, with `params.control`,
    the same analysis of the random control under "control". Raises ValueError (one line) for no prompts, no
    neurons or neurons outside the model, before any forward pass."""
    params = params or DegeneracyParams()
    task = as_task(task)
    neurons = list(E._norm_neurons(neurons))
    if not prompts:
        raise ValueError("the degeneracy test needs the fact's prompts; no template renders this fact")
    if not neurons:
        raise ValueError("the degeneracy test needs knowledge neurons; this fact has none (lower t or p)")
    E.check_neurons(lm, neurons)
    neurons = _ordered(neurons, scores)
    share = 0.5 if params.control else 1.0
    out = {"params": params.to_dict(),
           **_analyse(lm, prompts, neurons, params, task.slice(0.0, share))}
    if params.control:
        control = random_neurons(lm, neurons, seed=params.seed, exclude=exclude)
        out["control"] = {"kind": "random neurons from the same layers",
                          **_analyse(lm, prompts, control, params, task.slice(share, 1.0))}
    return out


def summary_line(result: dict) -> str:
    """One line: how many redundant pairs, whether all removes, beside the control."""
    def part(r):
        if not r["applicable"]:
            return "not applicable"
        return (f"{len(r['redundant_pairs'])}/{r['pairs_tested']} redundant pairs, "
                f"{len(r['necessary'])} necessary, all {'removes' if r['all']['removes'] else 'leaves'} the fact"
                + (" (whole set redundant)" if r["all"]["redundant"] else ""))
    text = f"knowledge neurons: {part(result)}"
    if "control" in result:
        text += f"; random control: {part(result['control'])}"
    return text


def relation_summary(results: Sequence[dict]) -> dict:
    """Counts over facts (one relation): facts tested, applicable, with redundant pairs, with a redundant whole
    set, degenerate; the same for their random controls."""
    def counts(rs):
        ok = [r for r in rs if r["applicable"]]
        return {"facts": len(rs), "applicable": len(ok),
                "with_redundant_pairs": sum(bool(r["redundant_pairs"]) for r in ok),
                "whole_set_redundant": sum(r["all"]["redundant"] for r in ok),
                "degenerate": sum(r["degenerate"] for r in ok),
                "all_removes": sum(r["all"]["removes"] for r in ok),
                "redundant_pairs": sum(len(r["redundant_pairs"]) for r in ok),
                "pairs_tested": sum(r["pairs_tested"] for r in ok)}
    out = {"knowledge": counts(results)}
    controls = [r["control"] for r in results if "control" in r]
    if controls:
        out["random"] = counts(controls)
    return out


# --------------------------------------------------------------------------------------------------------
# Over many facts (the reproduction)
# --------------------------------------------------------------------------------------------------------

def _compact(r: dict) -> dict:
    """What a report keeps of one analysis: the verdicts, single neurons and all (pairs: the redundant ones)."""
    keep = ("applicable", "reason", "neurons", "prompts", "known_prompts", "unedited", "singles", "all",
            "pairs_tested", "pairs_total", "left_out", "necessary", "redundant_pairs", "degenerate")
    return {k: r[k] for k in keep}


def degeneracy_experiment(lm, records: Sequence, params: DegeneracyParams | None = None,
                          scores: Mapping | None = None, exclude: Iterable[Neuron] = (),
                          task: Task | None = None) -> dict:
    """The degeneracy test of every fact of `records` (`experiments.FactNeurons`) that has knowledge neurons;
    `scores`: {fact: scores [layer, neuron]} to pair the strongest first; the random control of fact i is
    seeded with params.seed * 1_000_003 + i and never draws `exclude`. Returns the parameters, per relation
    and in total the counts of `relation_summary`, each fact's compact result, and the facts left out (no
    knowledge neurons)."""
    from dataclasses import replace

    params = params or DegeneracyParams()
    task = as_task(task)
    exclude = list(exclude)
    used = [r for r in records if r.neurons]
    facts, results = [], {}
    for i, rec in enumerate(used):
        task.check()
        fact_params = replace(params, seed=params.seed * 1_000_003 + i)
        result = degeneracy_test(lm, rec.prompts, rec.neurons, fact_params,
                                 scores=(scores or {}).get(rec.fact), exclude=exclude,
                                 task=task.slice(i / len(used), (i + 1) / len(used)))
        results.setdefault(rec.relation, []).append(result)
        facts.append({"relation": rec.relation, "subject": rec.fact.subject, "object": rec.fact.object,
                      **_compact(result),
                      **({"control": _compact(result["control"])} if "control" in result else {})})
        task.progress((i + 1) / len(used), f"degeneracy {rec.relation}:{rec.fact.subject}")
    return {"params": params.to_dict(),
            "per_relation": {rid: relation_summary(rs) for rid, rs in results.items()},
            "total": relation_summary([r for rs in results.values() for r in rs]),
            "facts": facts,
            "facts_without_neurons": [f"{r.relation}:{r.fact.subject}" for r in records if not r.neurons]}
