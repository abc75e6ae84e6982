"""Prompt formats (`--prompt-format plain|chat`, kn_core.encoding): a chat-rendered prompt is the template's
opening (the user asking to complete the sentence, the assistant's turn opened) followed by the prompt's own
tokens, for attribution and evaluation alike; answer positions stay right; the format is recorded."""

from __future__ import annotations

import numpy as np
import pytest

from kn_core.attribution import AttributionParams, attribute
from kn_core.encoding import (CHAT_REQUEST, PromptError, encode_prompt, prompt_format, prompt_format_params,
                              prompt_ids, set_prompt_format)
from kn_core.evaluation import answer_probabilities, predict
from kn_core.facts import Fact, Prompt
from tiny import make_tiny, tiny_llama

TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>{% endif %}")
TEXT = "The capital of France is"


def _chat_llama():
    lm = tiny_llama()
    lm.tokenizer.chat_template = TEMPLATE
    return lm


def _prompt(lm, text=TEXT, answer=" Paris"):
    ids = tuple(lm.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return Prompt(text, answer, ids, "[X] [Y]", Fact("r", "France", answer.strip()), "causal")


def _continue_final_message(lm, text):
    """transformers' own rendering of an assistant reply that starts with `text` (an independent reference)."""
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_REQUEST.format(prompt=text)}, {"role": "assistant", "content": text}],
        continue_final_message=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_prompt_ids_are_the_assistant_reply_starting_with_the_prompt():
    lm = _chat_llama()
    plain = prompt_ids(lm, TEXT)
    assert prompt_format(lm) == "plain" and plain == lm.tokenizer(TEXT)["input_ids"]
    set_prompt_format(lm, "chat")
    chat = prompt_ids(lm, TEXT)
    assert chat == _continue_final_message(lm, TEXT)
    assert chat[-len(plain):] == plain and len(chat) > len(plain)
    encoded = encode_prompt(lm, TEXT, _prompt(lm).answer_ids)
    assert encoded.ids[:len(chat)] == tuple(chat) and encoded.positions == (len(chat) - 1,)
    assert prompt_format_params(lm) == {"prompt_format": "chat"}
    set_prompt_format(lm, "plain")
    assert prompt_ids(lm, TEXT) == plain and prompt_format_params(lm) == {}


def test_attribution_of_a_chat_prompt_equals_attribution_of_its_ids_given_plainly(one_cpu_thread):
    lm = _chat_llama()
    prompt = _prompt(lm)
    params = AttributionParams(steps=4)
    set_prompt_format(lm, "chat")
    chat = attribute(lm, prompt, params)
    ids = prompt_ids(lm, TEXT)
    rendered = lm.tokenizer.decode(ids)  # the same ids as text: the special tokens are parsed back
    set_prompt_format(lm, "plain")
    assert lm.tokenizer(rendered)["input_ids"] == ids
    plain = attribute(lm, rendered, params, answer_ids=prompt.answer_ids)
    np.testing.assert_array_equal(chat.scores, plain.scores)
    np.testing.assert_array_equal(chat.activations, plain.activations)
    assert chat.prob == plain.prob
    assert not np.array_equal(attribute(lm, prompt, params).scores, chat.scores)  # plain TEXT is another input
    set_prompt_format(lm, "chat")
    (row,) = answer_probabilities(lm, [prompt])
    assert row["prob"] == pytest.approx(chat.prob, rel=1e-5)


def test_prompt_format_is_refused_where_it_cannot_apply():
    with pytest.raises(PromptError, match="no chat template.*--prompt-format plain"):
        set_prompt_format(tiny_llama(), "chat")
    with pytest.raises(PromptError, match="masked model"):
        set_prompt_format(make_tiny("bert"), "chat")
    with pytest.raises(PromptError, match="plain or chat"):
        set_prompt_format(_chat_llama(), "markdown")


def test_runs_record_the_chat_format_and_plain_records_stay_as_before():
    from kn_core.runner import prompt_params, run_params

    params = AttributionParams()
    assert prompt_params("causal", "prefix") == {"causal_templates": "prefix"}
    assert prompt_params("causal", "prefix", "chat") == {"causal_templates": "prefix", "prompt_format": "chat"}
    assert run_params(params, "causal", "prefix", "chat")["prompt_format"] == "chat"
    assert "prompt_format" not in run_params(params, "causal", "prefix")


def test_a_chat_run_is_not_resumed_from_plain_runs(tmp_path, one_cpu_thread):
    from kn_core.fact_files import builtin_facts
    from kn_core.runner import attribute_factset
    from kn_core.store import create_project

    lm = _chat_llama()
    factset = builtin_facts()
    one = factset.facts_of("P36")[:1]
    small = type(factset)(factset.name, {"P36": factset.relation("P36")}, one)
    params = AttributionParams(steps=2)
    with create_project(tmp_path / "p.knproj") as project:
        first = attribute_factset(project, lm, small, params)
        set_prompt_format(lm, "chat")
        chat = attribute_factset(project, lm, small, params)
        again = attribute_factset(project, lm, small, params)
        runs = project.list_runs()
    assert (first.attributed, chat.attributed, chat.already_stored, again.already_stored) == (1, 1, 0, 1)
    assert [r.params.get("prompt_format") for r in runs] == [None, "chat"]


@pytest.mark.default_model
def test_default_model_chat_template_and_paris():
    import torch

    from kn_core.models import load_model

    lm = load_model("default", device="cpu")
    prompt = _prompt(lm)
    plain = answer_probabilities(lm, [prompt])[0]["prob"]
    set_prompt_format(lm, "chat")
    ids = prompt_ids(lm, TEXT)
    assert ids == _continue_final_message(lm, TEXT)
    (row,) = answer_probabilities(lm, [prompt])
    with torch.no_grad():  # directly with transformers
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    direct = float(torch.softmax(logits, -1)[prompt.answer_ids[0]])
    assert row["prob"] == pytest.approx(direct, rel=1e-5)
    assert predict(lm, TEXT, 1)[0]["token"] == " Paris"
    assert row["prob"] > 0.5 and row["prob"] != pytest.approx(plain)  # measured: 0.93 chat, 0.77 plain
