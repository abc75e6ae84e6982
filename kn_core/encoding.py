"""A prompt and its answer tokens as model inputs: where each answer token is predicted, and from what.

Causal models: the prompt's tokens then the answer's; answer token j is predicted at the position before it,
teacher-forced (the true earlier answer tokens, never the model's choice). Masked models: one mask slot per
answer token; token j is predicted at slot j with the earlier slots filled with the true tokens and the later
ones still masked. Attribution and evaluation both encode through here, so both report the same probability.
Bad prompts are refused here, before any forward pass, with a one-line `PromptError` (or the validation layer's
`ValidationError` for text that is not valid Unicode and token ids outside the vocabulary).

Prompt formats (`PROMPT_FORMATS`, set on a loaded model with `set_prompt_format`, read by every encoding here):
"plain" tokenizes the prompt text as it is (the paper; every run before the option). "chat" (causal models
with a chat template) renders the prompt as the start of the assistant's reply: the user's message asks to
complete the sentence (`CHAT_REQUEST`), `apply_chat_template(..., add_generation_prompt=True)` opens the
assistant's turn, the prompt's own tokens follow, and the answer continues them. Why not EasyEdit's rendering
(EasyEdit #374: the prompt as the user's message, the answer as the reply's first token): our prompts are cloze
prefixes ("The capital of France is"), and a reply does not begin with " Paris" (the default model gives it
1e-5 there, 0.77 plain), so that would score a token the model is not asked to produce. The answer's token
ids are the same in both formats (the answer continuing the plain prompt), so plain and chat scores of one
fact compare the same tokens, at positions shifted by the chat prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .validation import check_text, check_token_ids


class PromptError(ValueError):
    pass


class PromptTypeError(PromptError, TypeError):
    """Something that is not a prompt where a prompt belongs."""


@dataclass(frozen=True)
class Target:
    """One answer token: the input ids, the position that predicts it, and its id."""
    ids: tuple[int, ...]
    pos: int
    token: int


@dataclass(frozen=True)
class EncodedPrompt:
    kind: str  # "causal" | "masked"
    ids: tuple[int, ...]  # causal: prompt + answer tokens; masked: the prompt with its mask slots
    positions: tuple[int, ...]  # the position whose output predicts each answer token
    answer_ids: tuple[int, ...]

    def targets(self) -> list[Target]:
        """The teacher-forced input of each answer token."""
        if self.kind == "causal":
            return [Target(self.ids[:pos + 1], pos, token) for pos, token in zip(self.positions, self.answer_ids)]
        targets = []
        for j, token in enumerate(self.answer_ids):
            filled = list(self.ids)
            for k in range(j):
                filled[self.positions[k]] = self.answer_ids[k]
            targets.append(Target(tuple(filled), self.positions[j], token))
        return targets


def encode_prompt(lm, text: str, answer_ids: Sequence[int]) -> EncodedPrompt:
    """The inputs that predict `answer_ids` after (causal) or in the mask slots of (masked) `text`."""
    tok = lm.tokenizer
    check_text("prompt", text, allow_blank=True)
    if not text.strip():
        raise PromptError("the prompt is empty; type the sentence that leads to the answer")
    answer = _checked_answer_ids(lm, answer_ids)
    ids = tuple(prompt_ids(lm, text))
    if lm.kind == "causal":
        if not ids:
            raise PromptError(f"the prompt {text!r} has no tokens before the answer")
        full = ids + answer
        check_length(lm, len(full))
        return EncodedPrompt("causal", full, tuple(range(len(ids) - 1, len(full) - 1)), answer)
    check_length(lm, len(ids))
    mask_id = tok.mask_token_id
    if mask_id is None:
        raise PromptError(f"{lm.family} has no mask token; it cannot be used as a masked language model")
    slots = tuple(i for i, t in enumerate(ids) if t == mask_id)
    if not slots:
        raise PromptError(f"the prompt has no mask slot; put {tok.mask_token} (or [Y] in a template) where "
                          f"the answer goes")
    if len(slots) != len(answer):
        raise PromptError(f"the prompt has {len(slots)} mask slot(s) but the answer has {len(answer)} "
                          f"token(s); use one {tok.mask_token} per answer token")
    return EncodedPrompt("masked", ids, slots, answer)


def encode_answer(lm, text: str, answer: str) -> tuple[int, ...]:
    """Token ids of `answer` as it continues `text` (causal) or fills the mask slots (masked)."""
    tok = lm.tokenizer
    check_text("prompt", text, allow_blank=True)
    check_text("answer", answer, allow_blank=True)
    prompt_ids = tok(text)["input_ids"]
    ids = None
    if lm.kind == "causal":
        full_ids = tok(text + answer)["input_ids"]
        check_length(lm, len(full_ids))  # callers encode the answer first: refuse a long prompt before any work
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            ids = full_ids[len(prompt_ids):]
    else:
        check_length(lm, len(prompt_ids))
    if ids is None:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
    if tok.unk_token_id is not None and tok.unk_token_id in ids and (tok.unk_token or "") not in answer:
        # its scores would be those of "<unk>" (as facts.render_prompts skips such objects)
        raise PromptError(f"the tokenizer maps {answer!r} to the unknown token; pick a word in its vocabulary")
    return tuple(ids)


PROMPT_FORMATS = ("plain", "chat")
CHAT_REQUEST = "Complete this sentence: {prompt}"  # the user's message of a chat-format prompt (module notes)


def prompt_format(lm) -> str:
    """The loaded model's prompt format ("plain" unless `set_prompt_format` said otherwise)."""
    return getattr(lm, "prompt_format", "plain")


def prompt_format_params(lm) -> dict:
    """The prompt format as recorded in run, neuron-set and edit params: {"prompt_format": "chat"} for chat,
    nothing for plain (every record made before the option is plain, and stays comparable for resume)."""
    return {"prompt_format": "chat"} if prompt_format(lm) == "chat" else {}


def check_prompt_format(lm, fmt: str) -> str:
    """`fmt` when `lm` can use it, else a one-line PromptError naming the fix (before any forward pass)."""
    if fmt not in PROMPT_FORMATS:
        raise PromptError(f"prompt format {fmt!r} is unknown; use plain or chat")
    if fmt == "chat":
        if lm.kind != "causal":
            raise PromptError(f"{lm.family} is a masked model: chat templates are for causal (instruct) models; "
                              "use --prompt-format plain")
        if not getattr(lm.tokenizer, "chat_template", None):
            raise PromptError(f"the tokenizer of {lm.source} has no chat template; use --prompt-format plain, or an "
                              "instruct model whose tokenizer_config.json has a chat_template")
    return fmt


def set_prompt_format(lm, fmt: str) -> None:
    """Every prompt of `lm` is encoded in `fmt` from now on (attribution and evaluation alike)."""
    lm.prompt_format = check_prompt_format(lm, fmt)


def prompt_ids(lm, text: str) -> list[int]:
    """The token ids of a prompt (the text before the answer) in the model's prompt format (module notes)."""
    tok = lm.tokenizer
    if prompt_format(lm) == "plain":
        return list(tok(text)["input_ids"])
    opening = tok.apply_chat_template([{"role": "user", "content": CHAT_REQUEST.format(prompt=text)}],
                                      add_generation_prompt=True, tokenize=True)
    if isinstance(opening, Mapping):  # recent transformers answer with a BatchEncoding
        opening = opening["input_ids"]
    return [int(i) for i in opening] + list(tok(text, add_special_tokens=False)["input_ids"])


def _checked_answer_ids(lm, answer_ids) -> tuple[int, ...]:
    if not isinstance(answer_ids, (str, bytes)) and hasattr(answer_ids, "__len__") and len(answer_ids) == 0:
        raise PromptError("the answer has no tokens; give the object to attribute")
    return check_token_ids("answer_ids", answer_ids, vocabulary_size(lm))


def vocabulary_size(lm) -> int:
    """The number of logits the model gives: every answer token id must be below it."""
    return int(lm.layout.output_embeddings().shape[0])


_NO_LIMIT = 10**7  # tokenizers without a limit report a huge model_max_length (int(1e30))


def max_positions(lm) -> int | None:
    """The longest input the model takes: its position table (config), else the tokenizer's model_max_length
    when that is a real limit; None when neither says (e.g. ALiBi models)."""
    config = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            if lm.layout.spec.positions_after_padding:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    limit = getattr(lm.tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None


def prompt_text_ids(lm, text: str) -> list[int]:
    """`text_ids` of a prompt whose next token is read (e.g. `evaluation.predict`), in the prompt format."""
    ids = prompt_ids(lm, check_text("prompt", text, allow_blank=True))
    check_length(lm, len(ids))
    return ids


def text_ids(lm, name: str, text: str) -> list[int]:
    """The token ids of a plain text (no answer appended), refused in one line before any forward pass when it
    is not valid text (`name` says which) or is longer than the model's positions."""
    ids = list(lm.tokenizer(check_text(name, text, allow_blank=True))["input_ids"])
    check_length(lm, len(ids))
    return ids


def check_length(lm, n_tokens: int) -> None:
    """Refuses an input longer than the model's positions (before it costs anything)."""
    limit = max_positions(lm)
    if limit is not None and n_tokens > limit:
        raise PromptError(f"the prompt and answer are {n_tokens} tokens, more than this model's {limit} positions; "
                          f"shorten the prompt")
