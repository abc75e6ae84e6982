"""Causal tracing (Meng et al. 2022, ROME): which hidden states carry a fact from the subject to the answer.

The method, as ROME's `experiments/causal_trace.py` and its notebook do it:
1. A clean run of the prompt gives P(o) and every state that can be restored, at every position: each block's output
   (the residual stream), each FFN output projection's output (MLP out) and each attention output projection's
   output (attn out; `FamilySpec.attn_out`). These are the sublayers' contributions before dropout, the residual
   add and any post-norm, so "MLP out" is the same module in every family.
2. Corrupted runs: Gaussian noise is added to the subject tokens' input embeddings (the output of the model's input
   embedding module), `samples` draws of standard deviation `noise` x the embeddings' standard deviation. ROME
   measures that standard deviation over the token embeddings of its fact set's subjects (`collect_embedding_std`);
   `embedding_std` does the same over the subjects it is given. The draws are seeded, and the same draws serve every
   restoration (ROME re-seeds for each one), so two cells differ by what was restored, not by the noise.
3. Restored runs: the corrupted runs with one state at one (token, layer) set back to its clean value. For MLP and
   attn with `window` > 1, that token's state in the `window` layers around the layer is restored (ROME's window:
   layers l - w//2 .. l + ceil(w/2) - 1, clipped to the model); the residual stream is always one layer.
The cell (token, layer) holds P(o) restored, averaged over the samples; its indirect effect is that minus P(o)
corrupted (the same samples). o is the first token of the answer, as ROME traces one token: with the subject
corrupted, the later tokens' probabilities would be conditioned on an answer the model no longer gives.

How it is fast, without approximating anything:
- One batch per (kind, layer): its rows are (token, sample), all the same prompt, so nothing is padded.
- Blocks below the lowest restored layer compute exactly what the corrupted run computed: they are replayed from it
  (tiled over the tokens) instead of run.
- Causal models: a state before the subject's first token is the same in the clean and the corrupted run (nothing it
  attends to is corrupted), so restoring it changes nothing; those cells are P(o) corrupted and are not run.
- Only the answer position goes through the vocabulary head.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from .encoding import PromptError, encode_prompt
from .families import get_path
from .hooks import Hooks, replacing_output, tiled_replay
from .passes import _token_probs
from .tasks import Task, as_task
from .validation import ValidationError, check_int, check_number

KINDS = ("residual", "mlp", "attn")
KIND_NAMES = {"residual": "residual stream (block output)", "mlp": "MLP output", "attn": "attention output"}
MAX_ROW_TOKENS = 8192  # rows x tokens in one forward; more positions are split over several forwards


class TraceError(PromptError):
    """A prompt that cannot be traced (the subject is not in it, no tokens to corrupt): one line naming the fix."""


@dataclass(frozen=True)
class TraceParams:
    kinds: tuple[str, ...] = KINDS
    samples: int = 10  # noise draws (ROME: 10)
    noise: float = 3.0  # noise standard deviation as a multiple of the embeddings' (ROME: 3)
    seed: int = 0
    window: int = 1  # MLP/attn layers restored around each layer (ROME's figures: 10)

    def __post_init__(self):
        kinds = tuple(dict.fromkeys(self.kinds))
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise ValidationError(f"kinds={list(self.kinds)!r} is not allowed; use one or more of {', '.join(KINDS)}")
        object.__setattr__(self, "kinds", kinds)
        for name in ("samples", "window"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0))
        object.__setattr__(self, "noise", check_number("noise", self.noise, positive=True))

    def to_dict(self) -> dict:
        return {**asdict(self), "kinds": list(self.kinds)}


@dataclass
class TraceResult:
    prompt: str
    subject: str
    answer: str  # the traced token's text
    answer_token_id: int
    tokens: list[str]
    token_ids: list[int]
    subject_span: tuple[int, int]  # token indices [start, end) of the corrupted subject
    answer_position: int  # the position whose output predicts the answer
    p_clean: float
    p_corrupted: float
    restored: dict[str, np.ndarray]  # kind -> [tokens, layers] P(o) with that state restored, mean over samples
    embedding_std: float
    embedding_std_tokens: int  # how many subject tokens the standard deviation was measured on
    params: TraceParams
    elapsed_s: float = 0.0
    skipped_positions: list[int] = field(default_factory=list)  # causal: before the subject, P(o) corrupted exactly

    @property
    def noise_std(self) -> float:
        return self.params.noise * self.embedding_std

    def effect(self, kind: str) -> np.ndarray:
        """The indirect effect: P(o) restored minus P(o) corrupted, [tokens, layers]."""
        return self.restored[kind] - self.p_corrupted

    def last_subject_token(self) -> int:
        return self.subject_span[1] - 1

    def peak_layer(self, kind: str, token: int | None = None) -> int:
        """The layer whose restoration at `token` (default: the last subject token, where ROME finds the MLP
        effect) helps most."""
        row = self.restored[kind][self.last_subject_token() if token is None else token]
        return int(np.argmax(row))

    def to_dict(self) -> dict:
        kinds = {}
        for kind, grid in self.restored.items():
            t, layer = np.unravel_index(int(np.argmax(grid)), grid.shape)
            kinds[kind] = {
                "state": KIND_NAMES[kind],
                "restored": grid.tolist(), "indirect_effect": self.effect(kind).tolist(),
                "peak": {"token": int(t), "layer": int(layer),
                         "indirect_effect": float(grid[t, layer] - self.p_corrupted)},
                "peak_layer_at_last_subject_token": self.peak_layer(kind),
            }
        return {
            "method": "causal tracing (Meng et al. 2022)", "prompt": self.prompt, "subject": self.subject,
            "answer": self.answer, "answer_token_id": self.answer_token_id, "answer_note":
                "the first answer token is traced, as ROME does", "tokens": self.tokens, "token_ids": self.token_ids,
            "subject_span": list(self.subject_span), "answer_position": self.answer_position,
            "p_clean": self.p_clean, "p_corrupted": self.p_corrupted, "kinds": kinds,
            "embedding_std": self.embedding_std, "embedding_std_tokens": self.embedding_std_tokens,
            "noise_std": self.noise_std, "params": self.params.to_dict(), "elapsed_s": self.elapsed_s,
            "skipped_positions": self.skipped_positions,
            "skipped_note": "positions before the subject in a causal model are not changed by the corruption; "
                            "restoring them gives P(o) corrupted exactly and they are not run",
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        params = TraceParams(**{**data["params"], "kinds": tuple(data["params"]["kinds"])})
        return cls(data["prompt"], data["subject"], data["answer"], int(data["answer_token_id"]),
                   list(data["tokens"]), list(data["token_ids"]), tuple(data["subject_span"]),
                   int(data["answer_position"]), float(data["p_clean"]), float(data["p_corrupted"]),
                   {k: np.asarray(v["restored"], dtype=np.float64) for k, v in data["kinds"].items()},
                   float(data["embedding_std"]), int(data["embedding_std_tokens"]), params,
                   float(data.get("elapsed_s", 0.0)), list(data.get("skipped_positions", [])))


def embedding_std(lm, subjects: Sequence[str]) -> tuple[float, int]:
    """ROME's `collect_embedding_std`: the standard deviation of the input embeddings of the subjects' tokens
    (each subject tokenized alone, without special tokens), and how many tokens it was measured on."""
    embed = lm.model.get_input_embeddings()
    rows = []
    with torch.no_grad():
        for subject in dict.fromkeys(s for s in subjects if s and s.strip()):
            ids = list(lm.tokenizer(subject, add_special_tokens=False)["input_ids"])
            if ids:
                rows.append(embed(torch.tensor([ids], device=lm.device))[0].float())
    if not rows:
        raise TraceError("no subject has any tokens to measure the embeddings' standard deviation on; "
                         "give at least one subject")
    values = torch.cat(rows)
    if values.numel() < 2:
        raise TraceError("one embedding value cannot give a standard deviation; give a longer subject")
    return float(values.std()), int(values.shape[0])


def subject_span(lm, text: str, token_ids: Sequence[int], subject: str) -> tuple[int, int]:
    """Token indices [start, end) of the first occurrence of `subject` in `text`, as tokenized in `token_ids`
    (the prompt's model input)."""
    if not subject or not subject.strip():
        raise TraceError("the subject is empty; give the words of the prompt to corrupt")
    at = text.find(subject)
    if at < 0:
        raise TraceError(f"the subject {subject!r} does not occur in the prompt {text!r}; give it exactly as the "
                         "prompt writes it")
    end = at + len(subject)
    tok = lm.tokenizer
    covering: list[int] = []
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(token_ids[:len(enc["input_ids"])]):
            covering = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < b and a < end and b > at]
    if not covering:  # no offsets: ROME's rule, over the decoded tokens
        pieces = [tok.decode([int(t)]) for t in token_ids]
        joined = "".join(pieces)
        char = joined.find(subject.strip())
        loc = 0
        for i, piece in enumerate(pieces):
            start, loc = loc, loc + len(piece)
            if char >= 0 and loc > char and start < char + len(subject.strip()):
                covering.append(i)
    if not covering:
        raise TraceError(f"no token of the prompt covers the subject {subject!r}; give it as the prompt writes it")
    return covering[0], covering[-1] + 1


def restored_layers(kind: str, layer: int, window: int, layers: int) -> range:
    """The layers restored for a cell at `layer`: ROME's window for MLP and attn, the layer itself otherwise."""
    if kind == "residual" or window == 1:
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(layers, layer - (-window // 2)))


def state_modules(layout, kind: str) -> list:
    """The module per layer whose output is the state `kind` (see the module notes)."""
    if kind == "residual":
        return list(layout.blocks)
    if kind == "mlp":
        return list(layout.out_projs)
    return [_attention_output(block, layout.spec.attn_out) for block in layout.blocks]


def _attention_output(block, paths: str):
    """The block's attention output projection: the first of `attn_out`'s "|"-separated paths the block has
    (a model mixing attention kinds, e.g. Qwen 3.5's linear-attention and full-attention layers)."""
    for path in paths.split("|"):
        try:
            return get_path(block, path)
        except AttributeError:
            continue
    raise AttributeError(f"{type(block).__name__} has none of the attention outputs {paths!r}")


def _as_tokens(x: torch.Tensor, rows: int, seq: int) -> torch.Tensor:
    """A state as (rows, seq, hidden), also where a family flattens tokens (OPT's FFN)."""
    return x.view(rows, seq, x.shape[-1]) if x.dim() == 2 else x


class _Tracer:
    """The clean and corrupted runs of one prompt, and the restored runs over them."""

    def __init__(self, lm, ids: Sequence[int], pos: int, token: int, span: tuple[int, int], noise: torch.Tensor):
        self.lm, self.layout = lm, lm.layout
        self.ids = torch.tensor([list(ids)], device=lm.device)
        self.seq, self.pos, self.token, self.span = len(ids), pos, token, span
        self.noise = noise  # (samples, span, hidden)
        self.samples = noise.shape[0]
        self.embed = lm.model.get_input_embeddings()
        with torch.no_grad():
            self.clean = {kind: [None] * self.layout.layers for kind in KINDS}
            record = [(module, self._recorder(kind, layer)) for kind in KINDS
                      for layer, module in enumerate(state_modules(self.layout, kind))]
            with Hooks(post=record):
                self.p_clean = float(self._probs(1)[0])
            blocks: dict[int, object] = {}
            with Hooks(post=[(block, lambda m, a, out, j=j: blocks.__setitem__(j, out))
                             for j, block in enumerate(self.layout.blocks)] + [self._corrupting(1)]):
                self.p_corrupted_rows = self._probs(self.samples)
        self.corrupted_blocks = [blocks[j] for j in range(self.layout.layers)]
        self.p_corrupted = float(self.p_corrupted_rows.mean())

    def _recorder(self, kind: str, layer: int):
        def record(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            self.clean[kind][layer] = _as_tokens(x, 1, self.seq).detach().clone()
        return record

    def _corrupting(self, copies: int):
        """The input embeddings' hook that adds the noise draws (tiled `copies` times) on the subject's tokens."""
        start, end = self.span
        noise = self.noise.repeat(copies, 1, 1)

        def corrupt(x):
            x = x.clone()
            x[:, start:end] += noise.to(device=x.device, dtype=x.dtype)
            return x
        return self.embed, replacing_output(corrupt)

    def _probs(self, rows: int) -> torch.Tensor:
        hidden = self.layout.base_model()(input_ids=self.ids.expand(rows, -1)).last_hidden_state[:, self.pos]
        return _token_probs(self.layout, hidden, self.token).float().cpu()

    def restored(self, kind: str, layers: range, positions: Sequence[int]) -> torch.Tensor:
        """P(o) per (position, sample) with `kind`'s state restored at each row's position in `layers`."""
        copies, seq = len(positions), self.seq
        rows = copies * self.samples
        row_pos = torch.tensor(list(positions), device=self.lm.device).repeat_interleave(self.samples)
        row_index = torch.arange(rows, device=self.lm.device)
        modules = state_modules(self.layout, kind)

        def restore(layer):
            clean = self.clean[kind][layer][0, row_pos]

            def put(x):
                y = _as_tokens(x, rows, seq).clone()
                y[row_index, row_pos] = clean.to(y.dtype)
                return y.view(x.shape)
            return modules[layer], replacing_output(put)

        below = list(zip(self.layout.blocks[:layers.start], self.corrupted_blocks[:layers.start]))
        with torch.no_grad(), tiled_replay(below, self.samples, copies), \
                Hooks(post=[self._corrupting(copies)] + [restore(layer) for layer in layers]):
            return self._probs(rows).view(copies, self.samples)


def trace(lm, text: str, subject: str, answer_ids: Sequence[int], params: TraceParams = TraceParams(),
          noise_scale: tuple[float, int] | None = None, task: Task | None = None) -> TraceResult:
    """Causal tracing of one prompt (see the module notes). `noise_scale`: the embeddings' standard deviation and
    the number of tokens it was measured on (`embedding_std` over the fact set's subjects); by default measured on
    this subject alone."""
    task = as_task(task)
    started = time.perf_counter()
    target = encode_prompt(lm, text, answer_ids).targets()[0]
    span = subject_span(lm, text, target.ids, subject)
    if lm.kind == "causal" and span[0] > target.pos:
        raise TraceError(f"the subject {subject!r} comes after the answer position; a causal model's answer "
                         "cannot depend on it")
    std, std_tokens = noise_scale if noise_scale is not None else embedding_std(lm, [subject])
    generator = torch.Generator().manual_seed(params.seed)
    noise = torch.randn(params.samples, span[1] - span[0], lm.layout.hidden, generator=generator,
                        dtype=torch.float64) * (params.noise * std)
    tracer = _Tracer(lm, target.ids, target.pos, target.token, span, noise)
    L, seq = lm.layout.layers, len(target.ids)
    first = span[0] if lm.kind == "causal" else 0
    positions = list(range(first, seq))
    per_forward = max(1, MAX_ROW_TOKENS // max(1, params.samples * seq))
    chunks = [positions[i:i + per_forward] for i in range(0, len(positions), per_forward)]
    restored = {}
    done, total = 0, len(params.kinds) * L * len(chunks)
    for kind in params.kinds:
        grid = np.full((seq, L), tracer.p_corrupted, dtype=np.float64)
        for layer in range(L):
            layers = restored_layers(kind, layer, params.window, L)
            for chunk in chunks:
                task.check()
                grid[chunk, layer] = tracer.restored(kind, layers, chunk).double().mean(dim=1).numpy()
                done += 1
                task.progress(done / total, f"{kind}: layer {layer + 1} of {L}")
        restored[kind] = grid
    tokens = [lm.tokenizer.decode([int(t)]) for t in target.ids]
    return TraceResult(text, subject, lm.tokenizer.decode([target.token]), int(target.token), tokens,
                       [int(t) for t in target.ids], span, int(target.pos), tracer.p_clean, tracer.p_corrupted,
                       restored, std, std_tokens, params, time.perf_counter() - started, list(range(first)))


FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
COLOURS = {"residual": "Purples", "mlp": "Greens", "attn": "Reds"}  # ROME's


def plot_trace(result: TraceResult, path, dpi: int = 150) -> None:
    """ROME's heat maps: one panel per kind, tokens (subject tokens starred) x layers, coloured by P(o) restored
    from P(o) corrupted (the colour scale's floor) up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result.restored)
    labels = [repr(t)[1:-1] + ("*" if result.subject_span[0] <= i < result.subject_span[1] else "")
              for i, t in enumerate(result.tokens)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.8 + 0.32 * len(labels)), squeeze=False,
                             dpi=150)
    for ax, kind in zip(axes[0], kinds):
        grid = result.restored[kind]
        image = ax.imshow(grid, aspect="auto", cmap=COLOURS[kind], vmin=min(result.p_corrupted, grid.min()),
                          interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("restored layer" if kind == "residual" or result.params.window == 1
                      else f"centre of {result.params.window} restored layers")
        ax.set_title(f"restoring the {KIND_NAMES[kind]}", fontsize=9)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(f"p({result.answer.strip()}) restored", fontsize=8)
    fig.suptitle(f"{result.prompt!r}: P(clean) {result.p_clean:.3f}, subject corrupted {result.p_corrupted:.3f} "
                 f"({result.params.samples} samples, noise {result.params.noise:g}x std)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
