"""Do "syntax neurons" appear as readily as knowledge neurons? (Niu et al., ICLR 2024: the attribution that finds
knowledge neurons finds neurons for syntactic phenomena too.) A small built-in set of BLiMP-style minimal pairs
(kn_core/data/syntax_minimal_pairs.json, source named there) is attributed exactly as facts are: each item (a
phenomenon and a number, e.g. subject-verb agreement with a singular subject) is a "fact" whose prompts are its
sentences, each with its grammatical continuation as the answer; refined neurons per item with p adapted over the
items as the paper adapts it per relation. Its minimal-pair partner (the same sentences with the other number)
says whether the model prefers the grammatical form (BLiMP's measure: P(good) > P(bad)).

Causal models only: the items are sentence prefixes whose next word carries the agreement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import numpy as np

from .tasks import Task, as_task
from .selection import DEFAULT_P, DEFAULT_T


@dataclass(frozen=True)
class SyntaxPrompt:
    """One sentence prefix with its grammatical (`answer`) and ungrammatical (`wrong`) continuation."""
    text: str
    answer: str
    answer_ids: tuple[int, ...]
    wrong: str
    wrong_ids: tuple[int, ...]


def syntax_items() -> dict:
    """The built-in minimal pairs: {"source": ..., "items": [{"id", "phenomenon", "number", "pair", "prompts"}]}."""
    text = resources.files("kn_core").joinpath("data/syntax_minimal_pairs.json").read_text(encoding="utf-8")
    return json.loads(text)


def syntax_prompts(lm, item: dict) -> tuple[list[SyntaxPrompt], list[dict]]:
    """The item's sentences this model's tokenizer can ask, and the others with the reason (e.g. a continuation
    its vocabulary only has as the unknown token)."""
    from .encoding import PromptError, encode_answer

    kept, left_out = [], []
    for text, good, bad in item["prompts"]:
        try:
            kept.append(SyntaxPrompt(text, good, encode_answer(lm, text, good), bad, encode_answer(lm, text, bad)))
        except PromptError as exc:
            left_out.append({"item": item["id"], "prompt": text, "reason": str(exc)})
    return kept, left_out


def syntax_experiment(lm, score: Callable, t: float = DEFAULT_T, p: float = DEFAULT_P, exclude=(),
                      layers: int | None = None, task: Task | None = None) -> dict:
    """Refined neurons of each built-in syntax item (p adapted over the items), their layers, the neurons
    shared by an item and its minimal-pair partner, and how often the model prefers the grammatical form.
    `score(prompt)`: the prompt's attribution (an object with `.scores` [layers, neurons]), e.g. the
    reproduction's cached `attribute_cached`."""
    from .evaluation import answer_probabilities
    from .experiments import neuron_statistics
    from .neurons import adapt_p, refined_neurons

    data = syntax_items()
    if lm.kind != "causal":
        return {"source": data["source"], "applicable": False,
                "reason": "the built-in items are sentence prefixes for causal models; a masked model is not run"}
    task = as_task(task)
    prompts, left_out = {}, []
    for item in data["items"]:
        prompts[item["id"]], dropped = syntax_prompts(lm, item)
        left_out += dropped
    items = [item for item in data["items"] if len(prompts[item["id"]]) >= 3]  # refinement needs 3 prompts
    left_out += [{"item": item["id"], "prompt": None, "reason": f"{len(prompts[item['id']])} of its sentences can be "
                  "asked of this model; refinement needs at least 3"} for item in data["items"] if item not in items]
    if not items:
        return {"source": data["source"], "applicable": False, "left_out": left_out,
                "reason": "no item keeps 3 sentences this model's tokenizer can ask (listed under left_out)"}
    total, done, scores = sum(len(ps) for ps in prompts.values()), 0, {}
    for item in items:
        scores[item["id"]] = []
        for prompt in prompts[item["id"]]:
            task.check()
            scores[item["id"]].append(score(prompt).scores)
            done += 1
            task.progress(done / total, f"syntax: {item['id']} ({done}/{total})")
    adapted = adapt_p([scores[i["id"]] for i in items], t=t, p=p, exclude=exclude)
    refined = {i["id"]: [list(n) for n in refined_neurons(scores[i["id"]], t, adapted.p, exclude=exclude)]
               for i in items}
    rows = []
    for item in items:
        ps = prompts[item["id"]]
        good = answer_probabilities(lm, ps)
        bad = answer_probabilities(lm, [SyntaxPrompt(q.text, q.wrong, q.wrong_ids, q.answer, q.answer_ids) for q in ps])
        mine, partner = {tuple(n) for n in refined[item["id"]]}, {tuple(n) for n in refined.get(item["pair"], [])}
        rows.append({"id": item["id"], "phenomenon": item["phenomenon"], "number": item["number"],
                     "prompts": len(ps), "refined": refined[item["id"]],
                     "shared_with_pair": sorted(list(n) for n in mine & partner),
                     "prefers_grammatical": float(np.mean([g["prob"] > b["prob"] for g, b in zip(good, bad)])),
                     "p_grammatical": float(np.mean([g["prob"] for g in good]))})
    n_layers = layers or int(np.shape(next(iter(scores.values()))[0])[0])
    stats = neuron_statistics([r["refined"] for r in rows], [r["phenomenon"] for r in rows], n_layers)
    return {"source": data["source"], "applicable": True, "p": adapted.p, "p_history": adapted.history,
            "items": rows, "statistics": stats, "left_out": left_out}
