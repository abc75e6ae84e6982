"""Probabilities, perplexities and the paper's experiments, always beside a control.

Conventions used throughout:

* A *prompt* is a `facts.Prompt` (anything with `.text`, `.answer`, `.answer_ids`, `.kind`). For a causal
  model `text` is the prefix and `answer_ids` the continuation's tokens; for a masked model `text` holds one
  mask token per answer token.
* **Multi-token answers.** Causal: the answer's probability is the product of the teacher-forced token
  probabilities, P(a1 | x) * P(a2 | x a1) * ...; one forward pass over `x + answer` gives all of them.
  Masked: likewise teacher-forced from left to right: mask j is predicted with the earlier masks filled
  with the true tokens and the later ones still masked (one forward per answer token), as `attribution`
  does, so both report the same probability. `correct` means the greedy choice equals the true token at
  every answer position (teacher-forced), `top1_token` is the top choice at the first answer position.
* The **answer positions** of a batch (the positions that predict answer tokens) are published to
  activation edits through `edits.answer_positions`, so "suppress at the answer position" means exactly
  those positions, also for multi-token answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from . import edits as _edits
from .encoding import encode_prompt

Progress = Callable[[float, dict | None], None]


# --------------------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


@dataclass
class _Encoded:
    ids: list[int]
    positions: list[int]  # positions whose logits predict the answer tokens
    targets: list[int]  # the answer tokens, one per position


def _encode_prompt(lm, prompt) -> list[_Encoded]:
    """The rows one prompt needs (causal: one row for all answer tokens; masked: one row per token)."""
    encoded = encode_prompt(lm, prompt.text, prompt.answer_ids)
    if encoded.kind == "causal":
        return [_Encoded(list(encoded.ids), list(encoded.positions), list(encoded.answer_ids))]
    return [_Encoded(list(t.ids), [t.pos], [t.token]) for t in encoded.targets()]


def _batch_forward(lm, encoded: Sequence[_Encoded]):
    """Runs one right-padded batch; returns (log-probs at answer positions per row, answer-position mask)."""
    model, device = lm.model, lm.device
    width = max(len(e.ids) for e in encoded)
    pad = _pad_id(lm.tokenizer)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        attention[row, : len(e.ids)] = 1
        answer_mask[row, e.positions] = True
    with torch.no_grad(), _edits.answer_positions(answer_mask.to(device)):
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    rows = []
    for row, e in enumerate(encoded):
        rows.append(torch.log_softmax(logits[row, e.positions].float(), dim=-1).cpu())
    return rows


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def answer_probabilities(lm, prompts: Sequence, batch_size: int = 16, progress: Progress | None = None,
                         cancel=None, top_k: int = 0) -> list[dict]:
    """Probability of each prompt's answer under the model as it is now (with whatever edits are active).

    Returns one dict per prompt: `prob` (product over answer tokens, see the module notes), `logprob`,
    `token_probs`, `top1_token`, `top1_id`, `correct` (greedy == answer at every answer position) and, with
    `top_k`, `top` (the k best first tokens with their probabilities) and `in_top_k`.
    """
    per_prompt = [_encode_prompt(lm, p) for p in prompts]
    flat = [e for rows in per_prompt for e in rows]
    logps: list[torch.Tensor] = []
    total = max(len(flat), 1)
    for start, chunk in _batches(flat, batch_size):
        if cancel is not None and getattr(cancel, "cancelled", False):
            from .tasks import Cancelled  # only when cancelling
            raise Cancelled("evaluation cancelled")
        logps.extend(_batch_forward(lm, chunk))
        if progress is not None:
            progress(min(1.0, (start + len(chunk)) / total), None)
    results: list[dict] = []
    at = 0
    for rows in per_prompt:
        logp = torch.cat(logps[at:at + len(rows)], dim=0)
        at += len(rows)
        targets = torch.tensor([t for e in rows for t in e.targets])
        token_lp = logp.gather(1, targets[:, None])[:, 0]
        greedy = logp.argmax(dim=-1)
        lp = float(token_lp.sum())
        item = {
            "prob": math.exp(lp),
            "logprob": lp,
            "token_probs": [math.exp(float(x)) for x in token_lp],
            "top1_id": int(greedy[0]),
            "top1_token": _token_text(lm.tokenizer, int(greedy[0])),
            "correct": bool(torch.equal(greedy, targets)),
        }
        if top_k:
            values, indices = logp[0].topk(top_k)
            item["top"] = [{"token": _token_text(lm.tokenizer, int(i)), "id": int(i), "prob": math.exp(float(v))}
                           for v, i in zip(values, indices)]
            item["in_top_k"] = int(targets[0]) in [int(i) for i in indices]
        results.append(item)
    return results


def token_probabilities(lm, prompts: Sequence, token_ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[dict]:
    """Like `answer_probabilities` but scores other answer tokens (e.g. the new object o' of an update).

    The prompt's own answer tokens still decide where the answer positions are (causal: the prefix; the
    continuation after the first position is teacher-forced with `token_ids`)."""
    swapped = []
    for prompt, ids in zip(prompts, token_ids):
        swapped.append(_SwappedPrompt(prompt.text, tuple(int(t) for t in ids), prompt.kind))
    return answer_probabilities(lm, swapped, batch_size=batch_size)


@dataclass(frozen=True)
class _SwappedPrompt:
    text: str
    answer_ids: tuple[int, ...]
    kind: str
    answer: str = ""


def answer_perplexity(lm, prompts: Sequence, batch_size: int = 16) -> float:
    """exp of the mean negative log-probability per answer token over the prompts (the paper's perplexity of
    the gold object)."""
    rows = answer_probabilities(lm, prompts, batch_size=batch_size)
    nll = [-math.log(max(p, 1e-45)) for r in rows for p in r["token_probs"]]
    return float(math.exp(sum(nll) / max(len(nll), 1)))


def perplexity(lm, items: Sequence, batch_size: int = 16) -> float:
    """Perplexity of prompts' answers (for `Prompt`s) or of plain texts (for strings).

    Texts: causal models use the usual next-token perplexity; masked models the pseudo-perplexity (each
    token masked in turn, Salazar et al., 2020)."""
    if not items:
        return float("nan")
    if not isinstance(items[0], str):
        return answer_perplexity(lm, items, batch_size)
    tokenizer = lm.tokenizer
    nll: list[float] = []
    if lm.kind == "causal":
        encoded = []
        for text in items:
            ids = tokenizer(text)["input_ids"]
            if len(ids) < 2:
                continue
            encoded.append(_Encoded(ids, list(range(len(ids) - 1)), ids[1:]))
    else:
        encoded = []
        specials = set(getattr(tokenizer, "all_special_ids", []))
        for text in items:
            ids = tokenizer(text)["input_ids"]
            for i, t in enumerate(ids):
                if t in specials:
                    continue
                masked = list(ids)
                masked[i] = tokenizer.mask_token_id
                encoded.append(_Encoded(masked, [i], [t]))
    for _, chunk in _batches(encoded, batch_size):
        for e, logp in zip(chunk, _batch_forward(lm, chunk)):
            nll.extend((-logp.gather(1, torch.tensor(e.targets)[:, None])[:, 0]).tolist())
    return float(math.exp(sum(nll) / max(len(nll), 1))) if nll else float("nan")


def predict(lm, text: str, top_k: int = 10) -> list[dict]:
    """Top-k predictions `[{token, id, prob}]`: causal: the next token after `text`; masked: the first mask
    token of `text` (see `predict_masks` for all of them). Raises ValueError for a masked prompt without a
    mask token."""
    return predict_masks(lm, text, top_k)[0]


def predict_masks(lm, text: str, top_k: int = 10) -> list[list[dict]]:
    tokenizer = lm.tokenizer
    ids = tokenizer(text)["input_ids"]
    if lm.kind == "causal":
        if not ids:
            raise ValueError("the prompt is empty")
        positions = [len(ids) - 1]
    else:
        mask = tokenizer.mask_token
        positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
        if not positions:
            raise ValueError(f"a masked model fills a mask token: put {mask} where the answer goes, "
                             f"e.g. 'The capital of France is {mask}.'")
    e = _Encoded(list(ids), positions, [0] * len(positions))
    logp = _batch_forward(lm, [e])[0]
    out = []
    for row in logp:
        values, indices = row.topk(min(top_k, row.shape[-1]))
        out.append([{"token": _token_text(tokenizer, int(i)), "id": int(i), "prob": math.exp(float(v))}
                    for v, i in zip(values, indices)])
    return out


# --------------------------------------------------------------------------------------------------------
# Neuron inspection and activation by prompt
# --------------------------------------------------------------------------------------------------------

def neuron_tokens(lm, layer: int, index: int, top_k: int = 10) -> dict:
    """The key-value reading (Geva et al., 2021): the neuron's value vector projected to the vocabulary
    (through the final norm where the family has one, and the head), the tokens it promotes and suppresses
    most. Returns {"layer", "index", "promotes": [{"token", "id", "logit"}], "suppresses": [...]}."""
    layout = lm.layout
    if not (0 <= layer < layout.layers and 0 <= index < layout.neurons):
        raise ValueError(f"neuron ({layer}, {index}) is outside this model ({layout.layers} layers x "
                         f"{layout.neurons} neurons)")
    with torch.no_grad():
        v = layout.value_vector(layer, index)
        head = layout.vocab_head()
        logits = head(v[None, None, :].to(layout.output_embeddings().device)).float()[0, 0].cpu()
    k = min(top_k, logits.shape[-1])
    top = logits.topk(k)
    bottom = (-logits).topk(k)

    def rows(values, indices, sign):
        return [{"token": _token_text(lm.tokenizer, int(i)), "id": int(i), "logit": sign * float(v)}
                for v, i in zip(values, indices)]

    return {"layer": int(layer), "index": int(index), "norm": float(v.float().norm()),
            "promotes": rows(top.values, top.indices, 1.0), "suppresses": rows(bottom.values, bottom.indices, -1.0)}


def neuron_activations(lm, neurons: Sequence[tuple[int, int]], items: Sequence, position: str = "answer",
                       batch_size: int = 16) -> np.ndarray:
    """Activations (items, len(neurons)) of the given neurons.

    `items`: Prompts (read at their answer positions, as attribution does: causal the position before the
    answer, masked the mask slots; mean over a multi-token answer's positions) or plain strings (position
    'answer': causal the last token, masked the mask tokens or, without one, the maximum over tokens;
    'max' / 'mean' / 'last': over all tokens)."""
    from .hooks import capture_activations

    if position not in ("answer", "max", "mean", "last"):
        raise ValueError(f"position must be answer, max, mean or last, not {position!r}")
    neurons = [(int(l), int(i)) for l, i in neurons]
    layers = sorted({l for l, _ in neurons})
    tokenizer = lm.tokenizer
    encoded: list[_Encoded] = []
    for item in items:
        if isinstance(item, str):
            ids = list(tokenizer(item)["input_ids"])
            if not ids:
                raise ValueError("an empty sentence has no activation")
            if position == "answer" and lm.kind == "masked":
                slots = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
                pos = slots or list(range(len(ids)))
                mode = "mean" if slots else "max"
            elif position in ("answer", "last"):
                pos, mode = [len(ids) - 1], "mean"
            else:
                pos, mode = list(range(len(ids))), position
            encoded.append(_Encoded(ids, pos, [mode]))
        else:
            rows = _encode_prompt(lm, item)
            if lm.kind == "causal":
                e = rows[0]
                encoded.append(_Encoded(e.ids, e.positions, ["mean"]))
            else:  # the original prompt with all slots masked; mean over the slots
                first = rows[0]
                slots = [i for i, t in enumerate(first.ids) if t == tokenizer.mask_token_id]
                encoded.append(_Encoded(first.ids, slots, ["mean"]))
    out = np.zeros((len(encoded), len(neurons)), dtype=np.float32)
    if not neurons:
        return out
    pad = _pad_id(tokenizer)
    for start, chunk in _batches(encoded, batch_size):
        width = max(len(e.ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            attention[row, : len(e.ids)] = 1

        def run():
            with torch.no_grad():
                return lm.model(input_ids=ids.to(lm.device), attention_mask=attention.to(lm.device))

        _, acts = capture_activations(lm.layout, run, layers)
        for row, e in enumerate(chunk):
            for col, (l, i) in enumerate(neurons):
                values = acts[l][row, e.positions, i].float()
                mode = e.targets[0]
                out[start + row, col] = float(values.max() if mode == "max" else values.mean())
    return out


def rank_by_activation(lm, neurons: Sequence[tuple[int, int]], items: Sequence, position: str = "answer") -> list[dict]:
    """Items ranked by the mean activation of `neurons`, highest first: [{"text", "activation", "rank"}]."""
    acts = neuron_activations(lm, neurons, items, position).mean(axis=1) if len(items) else np.zeros(0)
    order = np.argsort(-acts, kind="stable")
    return [{"rank": r + 1, "text": items[i] if isinstance(items[i], str) else items[i].text,
             "activation": float(acts[i])} for r, i in enumerate(order)]


# --------------------------------------------------------------------------------------------------------
# Effects of edits
# --------------------------------------------------------------------------------------------------------

def relative_change(before: Sequence[float], after: Sequence[float]) -> float:
    """The paper's figure: mean(Δp) / mean(p) (= Σ(after - before) / Σ before)."""
    total = float(np.sum(before))
    return float(np.sum(np.asarray(after) - np.asarray(before)) / total) if total > 0 else float("nan")


def with_edits(lm, edit_list: Sequence, fn: Callable):
    """Runs fn() with the edits applied (in order) and reverts them afterwards, also on errors."""
    handles = []
    try:
        for edit in edit_list:
            handles.append(edit.apply(lm))
        return fn()
    finally:
        for handle in reversed(handles):
            handle.revert()


def edit_effect(lm, edit_list: Sequence, prompts: Sequence, before: list[dict] | None = None,
                batch_size: int = 16) -> dict:
    """Answer probabilities before and after the edits, with the relative change and the top-1 flip rate."""
    before = before if before is not None else answer_probabilities(lm, prompts, batch_size)
    after = with_edits(lm, edit_list, lambda: answer_probabilities(lm, prompts, batch_size))
    pb, pa = [r["prob"] for r in before], [r["prob"] for r in after]
    flips = [b["top1_id"] != a["top1_id"] for b, a in zip(before, after)]
    return {"before": pb, "after": pa, "relative_change": relative_change(pb, pa),
            "flip_rate": float(np.mean(flips)) if flips else float("nan"),
            "accuracy_before": float(np.mean([r["correct"] for r in before])) if before else float("nan"),
            "accuracy_after": float(np.mean([r["correct"] for r in after])) if after else float("nan"),
            "n": len(prompts)}


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
class FactRecord:
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


def _check_cancel(cancel):
    if cancel is not None and getattr(cancel, "cancelled", False):
        from .tasks import Cancelled
        raise Cancelled("evaluation cancelled")


def _pool(acc: dict) -> dict:
    rc = (acc["after"] - acc["before"]) / acc["before"] if acc["before"] > 0 else float("nan")
    return {"relative_change": rc, "flip_rate": acc["flips"] / acc["n"] if acc["n"] else float("nan"),
            "n_prompts": acc["n"]}


def suppress_amplify_experiment(lm, records: Sequence[FactRecord], factor: float = 2.0, seed: int = 0,
                                control_prompts: int = 20, batch_size: int = 32, progress: Progress | None = None,
                                cancel=None) -> dict:
    """Suppress (activation -> 0) and amplify (x factor) each fact's knowledge neurons at the answer position.

    Per relation: mean(Δp)/mean(p) pooled over the prompts of its facts, for three groups of prompts (the
    fact's own; `control_prompts` sampled from other facts of the same relation; as many from other
    relations) and three neuron sets (knowledge neurons; the activation baseline's neurons; as many random
    neurons from the same layers, seeded). Facts without knowledge neurons are left out (counted); a fact
    whose baseline set is empty contributes Δp = 0 to the baseline. `average` averages relations."""
    rng = np.random.default_rng(seed)
    all_prompts = [p for r in records for p in r.prompts]
    key = {id(p): i for i, p in enumerate(all_prompts)}
    base = answer_probabilities(lm, all_prompts, batch_size)
    methods, ops, groups = ("knowledge", "baseline", "random"), ("suppress", "amplify"), ("own", "same_relation", "other_relations")
    acc: dict = {}
    used = [r for r in records if r.neurons]
    skipped = [f"{r.fact.relation}:{r.fact.subject}" for r in records if not r.neurons]
    for n_done, (i, rec) in enumerate((i, r) for i, r in enumerate(records) if r.neurons):
        _check_cancel(cancel)
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
        if progress is not None:
            progress((n_done + 1) / max(len(used), 1), {"fact": f"{rec.fact.relation}:{rec.fact.subject}"})
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


def update_experiment(lm, records: Sequence[FactRecord], factset, seed: int = 0, facts_per_relation: int = 10,
                      lambda1: float = 1.0, lambda2: float = 8.0, fraction: float = 0.1,
                      control_prompts: int = 20, batch_size: int = 32, embedding: str | None = None,
                      progress: Progress | None = None, cancel=None) -> dict:
    """The paper's update <s, r, o> -> <s, r, o'> on up to `facts_per_relation` correctly answered facts per
    relation (o' a random other object of the relation, seeded), beside random neurons from the same layers.

    Per fact, on its own prompts: change rate (top-1 no longer the old top-1), success rate (o' is the greedy
    answer at every answer token), top-5 rate (o''s first token in the top 5); on prompts of other facts of
    the same relation (intra) and of other relations (inter): answer perplexity before and after."""
    rng = np.random.default_rng(seed + 17)
    by_relation: dict[str, list[FactRecord]] = {}
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
        _check_cancel(cancel)
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
        if progress is not None:
            progress((n_done + 1) / max(len(candidates), 1), {"fact": row["fact"]})

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


def erase_experiment(lm, records: Sequence[FactRecord], k: int = 20, fill: str = "zero", seed: int = 0,
                     control_prompts: int = 40, batch_size: int = 32, progress: Progress | None = None,
                     cancel=None) -> dict:
    """Erase each relation (its k most frequent knowledge neurons' value vectors -> zero or [UNK]); accuracy
    and answer perplexity on its prompts and on `control_prompts` sampled from other relations, beside the
    same number of random neurons from the same layers."""
    rng = np.random.default_rng(seed + 29)
    relations = sorted({r.relation for r in records})
    out = {}
    for n_done, rel in enumerate(relations):
        _check_cancel(cancel)
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
        if progress is not None:
            progress((n_done + 1) / len(relations), {"relation": rel})
    return {"k": k, "fill": fill, "per_relation": out}


def activation_by_prompt(records: Sequence[FactRecord]) -> dict:
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
