"""Probabilities, perplexities, predictions, neuron inspection and activations, and the effect of edits (the
paper's experiments built on these are in `experiments`).

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
* **Ranks** (`rank`, `ranks`): the rank of a true answer token among the whole vocabulary at its answer
  position, 1 = the greedy choice, counted as 1 + the number of tokens with a strictly higher probability
  (ties share the better rank). `ranks` has one per answer token (teacher-forced as above); `rank` is the
  first token's, the usual "rank of the object" (docs/METRICS.md).
* The **answer positions** of a batch (the positions that predict answer tokens) are published to
  activation edits through `hooks.answer_positions`, so "suppress at the answer position" means exactly
  those positions, also for multi-token answers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .encoding import encode_prompt, prompt_text_ids, text_ids
from .hooks import answer_positions, capture_activations
from .tasks import Task, as_task
from .validation import check_finite_output



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
class PaddedRow:
    """One row of a padded batch (`forward_rows`)."""
    ids: list[int]
    positions: list[int]  # positions whose logits predict the answer tokens
    targets: list[int]  # the answer tokens, one per position


def _encode_prompt(lm, prompt) -> list[PaddedRow]:
    """The rows one prompt needs (causal: one row for all answer tokens; masked: one row per token)."""
    encoded = encode_prompt(lm, prompt.text, prompt.answer_ids)
    if encoded.kind == "causal":
        return [PaddedRow(list(encoded.ids), list(encoded.positions), list(encoded.answer_ids))]
    return [PaddedRow(list(t.ids), [t.pos], [t.token]) for t in encoded.targets()]


@dataclass(frozen=True)
class RowOutput:
    """What one padded row's forward pass gives at its answer positions (`PaddedRow.positions`): the logits
    [positions, vocab] and, for the layers asked for, the FFN activations [positions, neurons], both as the
    model computed them (its dtype, its device)."""
    logits: torch.Tensor
    activations: dict[int, torch.Tensor]


def forward_chunk(lm, encoded: Sequence[PaddedRow], layers: Sequence[int] | None = None,
                  publish_answers: bool = True) -> list[RowOutput]:
    """One forward pass over `encoded` as one right-padded batch (the padding is masked out; every supported
    family puts position ids after the real tokens this way, `FamilySpec.positions_after_padding` included),
    under no_grad. `layers`: also capture those layers' FFN activations. `publish_answers`: publish the rows'
    answer positions to answer-scoped edits (`hooks.answer_positions`); the activation readers leave it off
    (they read the model as it is, where an answer-scoped edit falls back to the last position). No back-off
    here: a caller whose hooks depend on the batch's rows (`degeneracy`) needs exactly this batch."""
    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), _pad_id(lm.tokenizer), dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        attention[row, : len(e.ids)] = 1
        answer_mask[row, e.positions] = True
    scope = answer_positions(answer_mask.to(lm.device)) if publish_answers else contextlib.nullcontext()

    def run():
        with torch.no_grad(), scope:
            return lm.model(input_ids=ids.to(lm.device), attention_mask=attention.to(lm.device))

    output, acts = (run(), {}) if layers is None else capture_activations(lm.layout, run, layers)
    return [RowOutput(output.logits[row, e.positions], {layer: a[row, e.positions] for layer, a in acts.items()})
            for row, e in enumerate(encoded)]


def _fitting(lm, encoded: Sequence[PaddedRow], layers, publish_answers: bool) -> list[RowOutput]:
    """`forward_chunk`, halving the batch on a CUDA out-of-memory and retrying (as `passes` does for
    attribution); one row that does not fit is refused with what to do."""
    try:
        return forward_chunk(lm, encoded, layers, publish_answers)
    except torch.cuda.OutOfMemoryError:
        if len(encoded) == 1:
            raise torch.cuda.OutOfMemoryError("one prompt's forward pass does not fit in GPU memory; use a smaller "
                                              "model, --dtype bfloat16, or --device cpu") from None
        torch.cuda.empty_cache()
    half = len(encoded) // 2
    return (_fitting(lm, encoded[:half], layers, publish_answers)
            + _fitting(lm, encoded[half:], layers, publish_answers))


def forward_rows(lm, encoded: Sequence[PaddedRow], batch_size: int = 16, *, layers: Sequence[int] | None = None,
                 publish_answers: bool = True, task: Task | None = None, message: str = "") -> Iterator[RowOutput]:
    """The one forward over padded rows of different lengths: `RowOutput` of each row in order, `batch_size` rows
    per right-padded forward pass (`forward_chunk`), halved on a CUDA out-of-memory. The task is checked before
    each batch and, with a `message`, told the fraction of rows done after it."""
    task = as_task(task)
    for start, chunk in _batches(encoded, batch_size):
        task.check()
        yield from _fitting(lm, chunk, layers, publish_answers)
        if message:
            task.progress(min(1.0, (start + len(chunk)) / max(len(encoded), 1)), message)


def _log_probs(out: RowOutput) -> torch.Tensor:
    """Log-probabilities [positions, vocab] (float32, CPU) of a row; never a NaN probability passed off as a
    result."""
    logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
    check_finite_output(out.logits)
    return logp


def _batch_forward(lm, encoded: Sequence[PaddedRow]) -> list[torch.Tensor]:
    """Log-probabilities at the answer positions of each row of exactly one right-padded batch."""
    return [_log_probs(out) for out in forward_chunk(lm, encoded)]


def _batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


def answer_probabilities(lm, prompts: Sequence, batch_size: int = 16, task: Task | None = None,
                         top_k: int = 0) -> list[dict]:
    """Probability of each prompt's answer under the model as it is now (with whatever edits are active).

    Returns one dict per prompt: `prob` (product over answer tokens, see the module notes), `logprob`,
    `token_probs`, `top1_token`, `top1_id`, `greedy_ids` (the argmax at every answer position, teacher-forced),
    `correct` (greedy == answer at every answer position), `rank` and `ranks` (see the module notes) and, with
    `top_k`, `top` (the k best first tokens with their probabilities) and `in_top_k`.
    """
    per_prompt = [_encode_prompt(lm, p) for p in prompts]
    flat = [e for rows in per_prompt for e in rows]
    logps = [_log_probs(out) for out in forward_rows(lm, flat, batch_size, task=task, message="scoring prompts")]
    results: list[dict] = []
    at = 0
    for rows in per_prompt:
        logp = torch.cat(logps[at:at + len(rows)], dim=0)
        at += len(rows)
        targets = torch.tensor([t for e in rows for t in e.targets])
        token_lp = logp.gather(1, targets[:, None])[:, 0]
        greedy = logp.argmax(dim=-1)
        ranks = [int(r) for r in ((logp > token_lp[:, None]).sum(dim=-1) + 1)]
        lp = float(token_lp.sum())
        item = {
            "prob": math.exp(lp),
            "logprob": lp,
            "token_probs": [math.exp(float(x)) for x in token_lp],
            "top1_id": int(greedy[0]),
            "greedy_ids": [int(g) for g in greedy],  # the argmax at every answer position (token-level protocols)
            "top1_token": _token_text(lm.tokenizer, int(greedy[0])),
            "correct": bool(torch.equal(greedy, targets)),
            "rank": ranks[0],
            "ranks": ranks,
        }
        if top_k:
            values, indices = logp[0].topk(top_k)
            item["top"] = [{"token": _token_text(lm.tokenizer, int(i)), "id": int(i), "prob": math.exp(float(v))}
                           for v, i in zip(values, indices)]
            item["in_top_k"] = int(targets[0]) in [int(i) for i in indices]
        results.append(item)
    return results


# --------------------------------------------------------------------------------------------------------
# Generation-based evaluation (beside teacher forcing)
# --------------------------------------------------------------------------------------------------------

EVALUATIONS = ("forced", "generate")
GENERATION_MARGIN = 2  # new tokens beyond the longest answer's, so a closing token or a longer wording shows


def greedy_continuations(lm, prompts: Sequence, max_new_tokens: Sequence[int], batch_size: int = 16,
                         task: Task | None = None) -> list[list[int]]:
    """The greedy (argmax) continuation of each prompt (`max_new_tokens[i]` tokens at most, ending early at the
    end-of-sequence token), under the model as it is now (with whatever edits are active).

    Batched over prompts, right-padded, without a KV cache: each step is one forward pass over the prompts and
    their tokens so far, encoded as teacher forcing encodes them (`encoding.encode_prompt`, so in the model's
    prompt format), with the positions that predict the continuation published as answer positions, so that an
    answer-scoped activation edit acts while generating exactly where it acts when scored. On an unedited
    model this equals transformers' generate(do_sample=False) (tests/test_generation.py)."""
    if lm.kind != "causal":
        raise ValueError(f"{lm.family} is a masked model: generation-based evaluation needs a causal model; "
                         "use forced evaluation")
    task = as_task(task)
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    starts = []
    for prompt in prompts:
        encoded = encode_prompt(lm, prompt.text, prompt.answer_ids)
        starts.append(list(encoded.ids[:encoded.positions[0] + 1]))
    out: list[list[int]] = [[] for _ in prompts]
    for start, chunk in _batches(list(range(len(prompts))), batch_size):
        task.check()
        live = [i for i in chunk if max_new_tokens[i] > 0]
        while live:
            encoded = [PaddedRow(starts[i] + out[i], list(range(len(starts[i]) - 1, len(starts[i]) + len(out[i]))),
                                [0]) for i in live]
            for i, row in zip(live, forward_rows(lm, encoded, len(encoded))):
                out[i].append(int(_log_probs(row)[-1].argmax()))
            live = [i for i in live if len(out[i]) < max_new_tokens[i] and out[i][-1] != eos]
        task.progress(min(1.0, (start + len(chunk)) / max(len(prompts), 1)), "generating")
    return out


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def answer_matches(generated: str, answers: Iterable[str]) -> bool:
    """Whether a continuation starts with one of the answers, ignoring case and spaces (leading, repeated):
    the whole answer, then the end of the text or a character that is not a letter or digit (" Parisian" does
    not match "Paris"; " Paris." does)."""
    text = _normalised(generated)
    for answer in answers:
        want = _normalised(answer)
        if want and text.startswith(want) and (len(text) == len(want) or not text[len(want)].isalnum()):
            return True
    return False


def judge_by_generation(lm, prompts: Sequence, rows: list[dict], batch_size: int = 16,
                        task: Task | None = None) -> list[dict]:
    """`answer_probabilities` rows of `prompts` judged by generation: `correct` becomes whether the greedy
    continuation (the answer's token count + GENERATION_MARGIN new tokens, or the longest alias's) matches the
    answer or one of the prompt's `aliases` (`answer_matches`); the teacher-forced verdict stays as
    `correct_forced`, the text as `generated`. Probabilities and ranks stay teacher-forced."""
    answers = [(p.answer, *getattr(p, "aliases", ())) for p in prompts]
    budgets = [max([len(p.answer_ids)] + [len(lm.tokenizer(" " + a.strip(), add_special_tokens=False)["input_ids"])
                                          for a in names[1:]]) + GENERATION_MARGIN
               for p, names in zip(prompts, answers)]
    continuations = greedy_continuations(lm, prompts, budgets, batch_size, task)
    for row, names, ids, budget in zip(rows, answers, continuations, budgets):
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        row.update(correct_forced=row["correct"], correct=answer_matches(text, names), generated=text,
                   max_new_tokens=budget)
    return rows


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
    return perplexity_of(answer_probabilities(lm, prompts, batch_size=batch_size))


def perplexity_of(rows: Sequence[dict]) -> float:
    """`answer_perplexity` of prompts already evaluated (`answer_probabilities` rows)."""
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
            ids = text_ids(lm, "text", text)
            if len(ids) < 2:
                continue
            encoded.append(PaddedRow(ids, list(range(len(ids) - 1)), ids[1:]))
    else:
        encoded = []
        specials = set(getattr(tokenizer, "all_special_ids", []))
        for text in items:
            ids = text_ids(lm, "text", text)
            for i, t in enumerate(ids):
                if t in specials:
                    continue
                masked = list(ids)
                masked[i] = tokenizer.mask_token_id
                encoded.append(PaddedRow(masked, [i], [t]))
    for e, row in zip(encoded, forward_rows(lm, encoded, batch_size)):
        nll.extend((-_log_probs(row).gather(1, torch.tensor(e.targets)[:, None])[:, 0]).tolist())
    return float(math.exp(sum(nll) / max(len(nll), 1))) if nll else float("nan")


def predict(lm, text: str, top_k: int = 10) -> list[dict]:
    """Top-k predictions `[{token, id, prob}]`: causal: the next token after `text`; masked: the first mask
    token of `text` (see `predict_masks` for all of them). Raises ValueError for a masked prompt without a
    mask token."""
    return predict_masks(lm, text, top_k)[0]


def predict_masks(lm, text: str, top_k: int = 10) -> list[list[dict]]:
    tokenizer = lm.tokenizer
    ids = prompt_text_ids(lm, text)
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
    e = PaddedRow(list(ids), positions, [0] * len(positions))
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

def neuron_tokens(lm, layer: int, index: int, top_k: int = 10, sign: int | None = None) -> dict:
    """The key-value reading (Geva et al., 2021): what the neuron writes to the residual stream, activation x
    value vector, projected to the vocabulary (through the final norm where the family has one, and the head).

    `sign`: the sign of the neuron's activation on the prompts of interest (see `activation_sign`). SwiGLU and
    GELU neurons also fire negative, and then they promote what their value vector alone would suppress, so
    the tokens are ranked by sign x the projection. None reads the value vector as if the activation were
    positive (the usual reading). Returns {"layer", "index", "norm", "sign" (+1, -1 or None), "promotes",
    "suppresses" ([{"token", "id", "logit"}], logit = sign x projection), "labels" (what each list means)}."""
    layout = lm.layout
    if not (0 <= layer < layout.layers and 0 <= index < layout.neurons):
        raise ValueError(f"neuron ({layer}, {index}) is outside this model ({layout.layers} layers x "
                         f"{layout.neurons} neurons)")
    if index >= layout.width(layer):  # the padding of a narrower (dense) layer of an MoE model
        raise ValueError(f"neuron ({layer}, {index}) is outside layer {layer}, which has {layout.width(layer)} neurons")
    if sign not in (None, 1, -1):
        raise ValueError(f"sign must be +1, -1 or None, not {sign!r}")
    with torch.no_grad():
        v = layout.value_vector(layer, index)
        head = layout.vocab_head()
        logits = head(v[None, None, :].to(layout.output_embeddings().device)).float()[0, 0].cpu() * (sign or 1)
    k = min(top_k, logits.shape[-1])
    top = logits.topk(k)
    bottom = (-logits).topk(k)

    def rows(values, indices, factor):
        return [{"token": _token_text(lm.tokenizer, int(i)), "id": int(i), "logit": factor * float(v)}
                for v, i in zip(values, indices)]

    when = {None: "when positive (sign not given)", 1: "when active as on these prompts (positive)",
            -1: "when active as on these prompts (negative)"}[sign]
    return {"layer": int(layer), "index": int(index), "norm": float(v.float().norm()), "sign": sign,
            "promotes": rows(top.values, top.indices, 1.0), "suppresses": rows(bottom.values, bottom.indices, -1.0),
            "labels": {"promotes": f"promotes {when}", "suppresses": f"suppresses {when}"}}


def activation_sign(lm, layer: int, index: int, prompts: Sequence) -> int:
    """+1 or -1: the sign of the neuron's mean activation at the answer position over `prompts` (e.g. a fact's
    prompts), the `sign` that `neuron_tokens` reads the value vector with. A mean of exactly 0 gives +1."""
    if not prompts:
        raise ValueError("the activation sign needs at least one prompt")
    mean = float(neuron_activations(lm, [(layer, index)], prompts)[:, 0].mean())
    return -1 if mean < 0 else 1


def neuron_activations(lm, neurons: Sequence[tuple[int, int]], items: Sequence, position: str = "answer",
                       batch_size: int = 16) -> np.ndarray:
    """Activations (items, len(neurons)) of the given neurons.

    `items`: Prompts (read at their answer positions, as attribution does: causal the position before the
    answer, masked the mask slots; mean over a multi-token answer's positions) or plain strings (position
    'answer': causal the last token, masked the mask tokens or, without one, the maximum over tokens;
    'max' / 'mean' / 'last': over all tokens)."""
    if position not in ("answer", "max", "mean", "last"):
        raise ValueError(f"position must be answer, max, mean or last, not {position!r}")
    neurons = [(int(l), int(i)) for l, i in neurons]
    layers = sorted({l for l, _ in neurons})
    tokenizer = lm.tokenizer
    encoded: list[PaddedRow] = []
    for item in items:
        if isinstance(item, str):
            ids = text_ids(lm, "sentence", item)
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
            encoded.append(PaddedRow(ids, pos, [mode]))
        else:
            rows = _encode_prompt(lm, item)
            if lm.kind == "causal":
                e = rows[0]
                encoded.append(PaddedRow(e.ids, e.positions, ["mean"]))
            else:  # the original prompt with all slots masked; mean over the slots
                first = rows[0]
                slots = [i for i, t in enumerate(first.ids) if t == tokenizer.mask_token_id]
                encoded.append(PaddedRow(first.ids, slots, ["mean"]))
    out = np.zeros((len(encoded), len(neurons)), dtype=np.float32)
    if not neurons:
        return out
    rows = forward_rows(lm, encoded, batch_size, layers=layers, publish_answers=False)
    for row, (e, forward) in enumerate(zip(encoded, rows)):
        for col, (l, i) in enumerate(neurons):
            values = forward.activations[l][:, i].float()
            out[row, col] = float(values.max() if e.targets[0] == "max" else values.mean())
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

def ratio(before: float, after: float) -> dict:
    """A change of a positive quantity (e.g. a perplexity) as {"ratio", "log10", "text"}: "x3.2", "x1.2e26",
    "x0.85"; never a raw difference (perplexities after a bad edit differ by 30 digits). Non-finite or
    non-positive inputs give None values and the text "n/a"."""
    if not (before > 0 and after > 0 and math.isfinite(before) and math.isfinite(after)):
        return {"ratio": None, "log10": None, "text": "n/a"}
    log10 = math.log10(after) - math.log10(before)
    return ratio_from_log10(log10)


def ratio_from_log10(log10: float) -> dict:
    """{"ratio", "log10", "text"} from a log10 ratio (e.g. a median or mean of per-fact log10 ratios)."""
    if log10 is None or not math.isfinite(log10):
        return {"ratio": None, "log10": None, "text": "n/a"}
    value = 10.0 ** log10 if log10 < 300 else float("inf")
    if -2 <= log10 < 2:  # x0.85, x3.2, x12
        text = f"x{value:.2g}" if value < 10 else f"x{value:.0f}"
    else:  # x4.4e2, x1.2e26, x5.0e-3: one mantissa digit after the point, renormalised after rounding
        exponent = math.floor(log10)
        mantissa = round(10 ** (log10 - exponent), 1)
        if mantissa >= 10:
            mantissa, exponent = mantissa / 10, exponent + 1
        text = f"x{mantissa:.1f}e{exponent}"
    return {"ratio": value if math.isfinite(value) else None, "log10": float(log10), "text": text}


def change_text(rel: float | None, digits: int = 1) -> str:
    """A relative change (after / before - 1, e.g. `relative_change`) as text a reader takes in at once: a signed
    percentage up to a doubling ("+41.6%", "-63.70%"), the ratio after / before beyond it ("x6.9e2", never
    "+69517.1%"); "n/a" when it is not a number."""
    if rel is None or not math.isfinite(rel):
        return "n/a"
    if rel < 1:
        return f"{100 * rel:+.{digits}f}%"
    return ratio_from_log10(math.log10(1 + rel))["text"]


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


def flip_rate(before: Sequence[dict], after: Sequence[dict]) -> float:
    """The top-1 flip rate: the share of prompts whose greedy first answer token (`top1_id`) differs between two
    measurements of the same prompts (`answer_probabilities` rows, paired in order); NaN for no prompts. Every
    summary's flip rate is this one."""
    flips = [b["top1_id"] != a["top1_id"] for b, a in zip(before, after)]
    return float(np.mean(flips)) if flips else float("nan")


MEASURE_CHUNK = 256  # prompts per answer_probabilities call: it holds every prompt's full-vocabulary log-probs


def measure_groups(lm, group_list: Sequence[Mapping[str, Sequence]], task: Task | None = None,
                   evaluation: str = "forced", top_k: int = 0) -> list[dict[str, list[dict]]]:
    """The one edit measurement: `answer_probabilities` rows of every named group of prompts of every entry of
    `group_list` (e.g. one edit plan's groups each) under the model as it is now (with whatever edits are in
    force), batched across groups and entries, in chunks of MEASURE_CHUNK prompts so that memory does not grow
    with the number of entries. `evaluation` "generate" judges `correct` by greedy generation
    (`judge_by_generation`; probabilities stay teacher-forced). Every summary (an edit's metrics, a batch's, the
    protocols', the GUI's table) is derived from these rows."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be forced or generate, not {evaluation!r}")
    task = as_task(task)
    flat = [p for groups in group_list for ps in groups.values() for p in ps]
    measured: list[dict] = []
    for start in range(0, len(flat), MEASURE_CHUNK):
        part = task.slice(start / len(flat), min(start + MEASURE_CHUNK, len(flat)) / len(flat))
        chunk = flat[start:start + MEASURE_CHUNK]
        rows = answer_probabilities(lm, chunk, task=part, top_k=top_k)
        measured += judge_by_generation(lm, chunk, rows) if evaluation == "generate" else rows
    rows = iter(measured)
    return [{g: [next(rows) for _ in ps] for g, ps in groups.items()} for groups in group_list]


def effect_between(before: list[dict], after: list[dict]) -> dict:
    """An edit's effect on prompts measured before it and with it (`answer_probabilities` rows, e.g. one group of
    `edit_plan.measure_plan` each time): the probabilities, the relative change, the top-1 flip rate and the
    accuracies."""
    pb, pa = [r["prob"] for r in before], [r["prob"] for r in after]
    return {"before": pb, "after": pa, "relative_change": relative_change(pb, pa),
            "flip_rate": flip_rate(before, after),
            "accuracy_before": float(np.mean([r["correct"] for r in before])) if before else float("nan"),
            "accuracy_after": float(np.mean([r["correct"] for r in after])) if after else float("nan"),
            "n": len(before)}
