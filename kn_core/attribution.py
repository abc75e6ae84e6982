"""Integrated gradients over FFN neurons (Dai et al., 2022). Coarse, refined and relation-level neurons are
selected from these scores in `kn_core.neurons`.

Attr(w_i^l) = (w_i / m) * sum_k dP(alpha_k * w^l)/dw_i, where the whole activation vector of layer l at the
answer position is scaled by alpha_k and P is the answer's probability. Right Riemann points alpha_k = k/m
(k = 1..m, the paper) or left points k = 0..m-1 (the authors' code).

`quadrature` (AttributionParams) chooses the rule: `riemann` (the above, the default), `gauss` (Gauss-Legendre with
m points) or `auto` (points raised per layer until its completeness error is within `tolerance`); see
`quadrature.py`.

One prompt: `attribute`; a fact's prompts: `attribute_fact`. The passes that compute the gradients exactly but
fast (replayed clean values, batches that grow layer by layer, shared prefix caches, shared prompts) are in
`passes.py`; prompts are encoded by `encoding.py`.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import torch

from . import neurons as kn_neurons
from .encoding import PromptError, PromptTypeError, Target, encode_answer, encode_prompt  # noqa: F401 (API)
from .models import LoadedModel
from .passes import Runner, SharedRunner, integrate
from .quadrature import DEFAULT_POINTS, DEFAULT_TOLERANCE, QUADRATURES
from .selection import DEFAULT_T, Neuron, default_t  # noqa: F401 (API: the CLI reads default_t here)
from .tasks import Task, as_task
from .validation import ValidationError, check_choice, check_int, check_number, check_positive, check_steps

RULES = ("right", "left")  # Riemann sum points: alpha = k/m for k = 1..m (paper) or k = 0..m-1 (authors' code)
METHODS = ("ig", "activation")  # integrated gradients, or the paper's baseline (the raw activation)


@dataclass(frozen=True)
class AttributionParams:
    steps: int | None = None  # m: Riemann steps, or Gauss points per panel; None: 20 riemann, 4 gauss, 3 auto
    rule: str = "right"  # "right": alpha = k/m, k=1..m (paper); "left": k=0..m-1 (authors' code)
    method: str = "ig"  # "ig" or "activation" (the paper's baseline: score = raw activation)
    multi_token: str = "mean"  # how per-token scores of a multi-token answer combine: "mean", "sum", "first"
    layers_per_pass: int | None = None  # None: chosen from the device and the memory budget (plan_passes)
    passes_per_backward: int | None = None  # None: as many as the memory budget allows (plan_passes)
    memory_budget_mb: int | None = None  # None: 2 GiB on CPU, a quarter of free memory on CUDA
    seed: int = 0
    share_prompts: bool | None = None  # a fact's prompts in shared passes (`shares_passes`); None: on accelerators
    quadrature: str = "riemann"  # "riemann" (paper), "gauss" or "auto" (quadrature.py)
    tolerance: float = DEFAULT_TOLERANCE  # gauss/auto: the completeness error per layer that is good enough
    # steps above validation.MAX_STEPS only on purpose; not a scoring parameter, so not in to_dict()
    force: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self):
        check_choice("quadrature", self.quadrature, QUADRATURES)
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_POINTS[self.quadrature])
        check_steps(self.steps, self.force)
        check_number("tolerance", self.tolerance, maximum=1.0, positive=True)
        if self.quadrature != "riemann" and self.rule != "right":
            raise ValidationError(f"rule = {self.rule!r} applies to the Riemann sum only; drop it (or --rule) "
                                  f"with quadrature = {self.quadrature!r}")
        check_choice("rule", self.rule, RULES)
        check_choice("method", self.method, METHODS)
        check_choice("multi_token", self.multi_token, ("mean", "sum", "first"))
        for name in ("layers_per_pass", "passes_per_backward"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.memory_budget_mb is not None:
            check_positive("memory_budget_mb", self.memory_budget_mb)
        check_int("seed", self.seed, 0)
        check_choice("share_prompts", self.share_prompts, (None, True, False))

    def alphas(self) -> list[float]:
        m = self.steps
        ks = range(1, m + 1) if self.rule == "right" else range(0, m)
        return [k / m for k in ks]

    @classmethod
    def from_dict(cls, stored: dict) -> "AttributionParams":
        """The parameters a run stored (`to_dict`, among the run's other params), read back."""
        return cls(**{f.name: stored[f.name] for f in fields(cls) if f.name in stored and f.name != "force"})

    def to_dict(self) -> dict:
        """The scoring parameters, stored with a run. The Riemann sum (the default) stores no `quadrature` or
        `tolerance`, so its dict is the one runs stored before those options existed (and caches keyed on it
        still match): a dict without `quadrature` means "riemann"."""
        out = asdict(self)
        del out["force"]
        if self.quadrature == "riemann":
            del out["quadrature"], out["tolerance"]
        return out


def integration_text(params: dict) -> str:
    """How the integral is computed, in words, from `AttributionParams.to_dict()` (a stored run's params: without a
    `quadrature` key it is the paper's Riemann sum). Reports and notes say it this one way."""
    quadrature = params.get("quadrature", "riemann")
    if quadrature == "riemann":
        return f"{params['steps']} steps ({params.get('rule', 'right')} Riemann points)"
    return (f"{quadrature} quadrature ({params['steps']} Gauss-Legendre points per panel, completeness "
            f"tolerance {params.get('tolerance')})")


@dataclass
class PromptScores:
    prompt: str
    answer: str
    answer_ids: tuple[int, ...]
    scores: np.ndarray  # float32 [layers, neurons]
    activations: np.ndarray  # float32 [layers, neurons], mean over answer tokens
    prob: float  # P(answer): product of the teacher-forced token probabilities
    token_probs: list[float]
    completeness: list[dict]  # per layer: {"layer", "sum", "delta", "ratio"}; gauss/auto add "points" (rows
    # evaluated), "error" (quadrature.py's completeness error) and "within_tolerance"
    seconds: float
    params: dict = field(default_factory=dict)

    def coarse(self, t: float = DEFAULT_T) -> list[Neuron]:
        return kn_neurons.coarse_neurons(self.scores, t)


def _attribute_target(lm: LoadedModel, target: Target, params: AttributionParams,
                      report: Callable[..., None], task: Task):
    """Scores [L, N], activations [L, N], P(w), P(0 at layer l) [L] and the quadrature's notes per layer (None
    for the Riemann sum) for one answer token."""
    runner = Runner(lm, target, patching=params.method == "ig")
    if params.method == "activation":
        report(0, lm.layout.layers, runner.acts)
        return runner.acts, runner.acts, runner.prob, None, None
    seq_len = 1 if runner.prefix_cache is not None else len(target.ids)
    scores, p_zero, notes = integrate(lm, runner, params, seq_len,
                                      lambda a, b, chunk, done=None: report(a, b, chunk[0], done), task,
                                      dense_layers(lm, params))
    return scores[0], runner.acts, runner.prob, p_zero[0], notes


_MASSIVE_LAYERS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, ...]]" = weakref.WeakKeyDictionary()


def dense_layers(lm: LoadedModel, params: AttributionParams) -> tuple[int, ...]:
    """The layers that `gauss` and `auto` integrate on a dense grid from the start: those holding a massive
    neuron (`neurons.flag_massive` on the built-in neutral sentences; measured once per model, a few seconds).
    Their integrand is not smooth along the path (quadrature.py); the Riemann sum needs none."""
    if params.quadrature == "riemann" or params.method != "ig":
        return ()
    if lm.model not in _MASSIVE_LAYERS:
        massive = kn_neurons.flag_massive(kn_neurons.activation_stats(lm))
        _MASSIVE_LAYERS[lm.model] = tuple(sorted({layer for layer, _ in massive}))
    return _MASSIVE_LAYERS[lm.model]


def _combine(arrays: list[torch.Tensor], how: str) -> torch.Tensor:
    if how == "first":
        return arrays[0]
    stacked = torch.stack(arrays)
    return stacked.sum(0) if how == "sum" else stacked.mean(0)


def _prompt_parts(lm: LoadedModel, prompt, params: AttributionParams, answer_ids=None):
    """(text, answer, answer ids, the answer tokens to attribute) of a facts.Prompt, or of text with answer_ids."""
    if isinstance(prompt, str):
        if answer_ids is None:
            raise PromptTypeError(f"attribute() got the plain text {_short(prompt)} without answer_ids; pass a "
                            f"facts.Prompt, or answer_ids=encode_answer(lm, text, answer)")
        text, answer = prompt, ""
    elif hasattr(prompt, "text") and hasattr(prompt, "answer_ids"):
        text, answer = prompt.text, getattr(prompt, "answer", "")
        answer_ids = prompt.answer_ids if answer_ids is None else answer_ids
    else:
        raise PromptTypeError(f"a prompt must be a facts.Prompt or text with answer_ids, not {type(prompt).__name__}")
    encoded = encode_prompt(lm, text, answer_ids)
    targets = encoded.targets()
    return text, answer, encoded.answer_ids, (targets[:1] if params.multi_token == "first" else targets)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class NonFiniteScoresError(ArithmeticError):
    """Attribution gave NaN or infinite scores (an overflow in half precision, or weights that hold NaN). Never
    passed on: the coarse threshold of such a prompt would be undefined and its neurons silently missing."""


def _check_finite(text: str, scores: torch.Tensor, model_dtype: torch.dtype) -> None:
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        layers = sorted(set(torch.nonzero(bad)[:, 0].tolist()))
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        dtype = str(model_dtype).replace("torch.", "")
        fix = ("check the model's weights for NaN or infinite values" if model_dtype in (torch.float32, torch.float64)
               else "run it in float32 (--dtype float32), where half precision does not overflow, or check its weights")
        raise NonFiniteScoresError(f"{int(bad.sum())} attribution scores of {_short(text)} are NaN or infinite "
                                   f"(layers {shown}; the model ran in {dtype}): {fix}")


def _prompt_scores(text: str, answer: str, ids: tuple[int, ...], per_token: list, params: AttributionParams,
                   seconds: float, model_dtype: torch.dtype) -> PromptScores:
    """One prompt's result from its answer tokens' (scores, activations, P(w), P(0 at each layer))."""
    how = params.multi_token
    scores = _combine([s for s, _, _, _, _ in per_token], how)
    _check_finite(text, scores, model_dtype)
    acts = _combine([a for _, a, _, _, _ in per_token], "mean")
    token_probs = [p for _, _, p, _, _ in per_token]
    completeness = []
    if params.method == "ig":
        delta = _combine([p - pz for _, _, p, pz, _ in per_token], how)
        sums = scores.sum(1).cpu()
        for layer in range(len(sums)):
            d, s = float(delta[layer]), float(sums[layer])
            completeness.append({"layer": layer, "sum": s, "delta": d, "ratio": s / d if d else math.nan})
            notes = [n[layer] for _, _, _, _, n in per_token if n is not None]
            if notes:  # gauss/auto: how many rows the layer took and whether its check passed (every token)
                error = max(n["error"] for n in notes)
                completeness[-1].update(points=sum(n["rows"] for n in notes), error=error,
                                        within_tolerance=error <= params.tolerance)
    return PromptScores(
        prompt=text, answer=answer, answer_ids=ids,
        scores=scores.float().cpu().numpy().astype(np.float32),
        activations=acts.float().cpu().numpy().astype(np.float32),
        prob=float(np.prod(token_probs)), token_probs=token_probs, completeness=completeness,
        seconds=seconds, params=params.to_dict())


def attribute(lm: LoadedModel, prompt, params: AttributionParams | None = None, *, task: Task | None = None,
              answer_ids: Sequence[int] | None = None) -> PromptScores:
    """Attribution scores of every FFN neuron for one prompt.

    `prompt` is a facts.Prompt (text + answer_ids) or a plain string together with `answer_ids`. The task gets
    progress, and each finished chunk of layers as a partial result
    {"prompt": 0, "token": j, "layers": (a, b), "scores": float32 [b - a, neurons]}; cancelling raises
    tasks.Cancelled between chunks.
    """
    params = params or AttributionParams()
    return _attribute_one(lm, _prompt_parts(lm, prompt, params, answer_ids), params, as_task(task))


def _attribute_one(lm: LoadedModel, parts, params: AttributionParams, task: Task, index: int = 0,
                   of: int = 1) -> PromptScores:
    """`attribute` of an encoded prompt (`_prompt_parts`), as prompt `index` of `of` (for attribute_fact)."""
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    text, answer, ids, targets = parts
    L = lm.layout.layers
    per_token = []
    for j, target in enumerate(targets):
        def report(a, b, chunk_scores, done=None, j=j):
            where = f"prompt {index + 1}/{of}, " if of > 1 else ""
            task.progress((j + (b / L if done is None else done)) / len(targets),
                          f"{where}answer token {j + 1}/{len(targets)}, layers {a}-{b - 1} of {L}")
            task.partial({"prompt": index, "token": j, "layers": (a, b), "scores": chunk_scores.float().cpu().numpy()})
        per_token.append(_attribute_target(lm, target, params, report, task))
    return _prompt_scores(text, answer, ids, per_token, params, time.perf_counter() - started, lm.model.dtype)


def shares_passes(lm: LoadedModel, params: AttributionParams) -> bool:
    """Whether a fact's prompts run in shared passes (`passes.SharedRunner`): masked LMs with BERT-style blocks and an
    attention that takes a mask (eager or sdpa). By default only on GPUs: on CPU the rows are already large enough
    to keep the cores busy, and sharing measured no faster there (benchmarks/bench_attribution.py), while one
    prompt after another lets the app show each prompt as it finishes."""
    wanted = lm.device.type != "cpu" if params.share_prompts is None else params.share_prompts
    return (wanted and params.method == "ig" and lm.kind == "masked"
            and getattr(lm.model.config, "_attn_implementation", "eager") in ("eager", "sdpa")
            and lm.layout.bert_style)


def attribute_fact(lm: LoadedModel, prompts: Sequence, params: AttributionParams | None = None, *,
                   task: Task | None = None,
                   on_prompt: Callable[[int, PromptScores], None] | None = None) -> list[PromptScores]:
    """Scores for every prompt of a fact; the task's progress covers the whole fact and its partial results are
    `attribute`'s, with "prompt" the prompt's index.

    Where the model allows (`shares_passes`) all prompts go through the same passes; otherwise one prompt after
    another. `on_prompt(k, result)` is called as each prompt's result is ready.
    """
    params, task = params or AttributionParams(), as_task(task)
    parts = [_prompt_parts(lm, prompt, params) for prompt in prompts]  # every prompt checked before any work
    n = len(parts)
    if n > 1 and shares_passes(lm, params):
        results = _attribute_shared(lm, parts, params, task)
        for k, result in enumerate(results):
            if on_prompt is not None:
                on_prompt(k, result)
        return results
    results = []
    for k, prompt_parts in enumerate(parts):
        results.append(_attribute_one(lm, prompt_parts, params, task.slice(k / n, (k + 1) / n), index=k, of=n))
        if on_prompt is not None:
            on_prompt(k, results[-1])
    return results


def _attribute_shared(lm: LoadedModel, parts: list, params: AttributionParams, task: Task) -> list[PromptScores]:
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    owner = [(k, j) for k, (_, _, _, targets) in enumerate(parts) for j in range(len(targets))]
    runners = [Runner(lm, target) for _, _, _, targets in parts for target in targets]
    task.check()
    shared = SharedRunner(lm, runners)
    L = lm.layout.layers

    def report(a, b, chunk, done=None):
        task.progress(b / L if done is None else done, f"{len(parts)} prompts together, layers {a}-{b - 1} of {L}")
        for (k, j), chunk_scores in zip(owner, chunk):
            task.partial({"prompt": k, "token": j, "layers": (a, b), "scores": chunk_scores.float().cpu().numpy()})

    scores, p_zero, notes = integrate(lm, shared, params, shared.seq, report, task, dense_layers(lm, params))
    per_prompt: list[list] = [[] for _ in parts]
    for i, (k, _) in enumerate(owner):
        per_prompt[k].append((scores[i], runners[i].acts, runners[i].prob, p_zero[i], notes))
    seconds = (time.perf_counter() - started) / len(parts)
    return [_prompt_scores(text, answer, ids, per_prompt[k], params, seconds, lm.model.dtype)
            for k, (text, answer, ids, _) in enumerate(parts)]
