"""The bad-input catalogue of the Python API (issue 14): each bad parameter raises a ValueError (mostly the
validation layer's ValidationError) whose one-line message names it, before any work. The CLI's catalogue is
tests/test_bad_inputs.py."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from test_bad_inputs import LONG, SURROGATE
from tiny import make_tiny


def _attribution_params(**kwargs):
    from kn_core.attribution import AttributionParams

    return AttributionParams(**kwargs)


API = [
    ("steps-nan", lambda: _attribution_params(steps=math.nan), ["steps", "nan"]),
    ("steps-fraction", lambda: _attribution_params(steps=2.5), ["steps", "2.5"]),
    ("steps-string", lambda: _attribution_params(steps="20"), ["steps", "'20'"]),
    ("steps-0", lambda: _attribution_params(steps=0), ["steps", "0"]),
    ("steps-huge", lambda: _attribution_params(steps=100000), ["steps", "100000", "force"]),
    ("steps-bool", lambda: _attribution_params(steps=True), ["steps", "True"]),
    ("memory-negative", lambda: _attribution_params(memory_budget_mb=-1), ["memory_budget_mb", "-1"]),
    ("memory-zero", lambda: _attribution_params(memory_budget_mb=0), ["memory_budget_mb", "0"]),
    ("memory-nan", lambda: _attribution_params(memory_budget_mb=math.nan), ["memory_budget_mb", "nan"]),
    ("rule-middle", lambda: _attribution_params(rule="middle"), ["rule", "middle"]),
    ("method-x", lambda: _attribution_params(method="x"), ["method"]),
    ("multi-token-x", lambda: _attribution_params(multi_token="max"), ["multi_token", "max"]),
    ("layers-per-pass-0", lambda: _attribution_params(layers_per_pass=0), ["layers_per_pass", "0"]),
    ("passes-per-backward-negative", lambda: _attribution_params(passes_per_backward=-2), ["passes_per_backward"]),
    ("seed-negative", lambda: _attribution_params(seed=-1), ["seed", "-1"]),
    ("share-prompts-string", lambda: _attribution_params(share_prompts="yes"), ["share_prompts", "yes"]),
    # found by the audit before closing issue 14 (each failed before its fix)
    ("selection-t-nan", lambda: _selection().NeuronSelection(t=math.nan), ["t", "nan"]),
    ("selection-p-5", lambda: _selection().NeuronSelection(p=5), ["p", "5"]),
    ("neuron-source-t-negative", lambda: _batch().NeuronSource(t=-1), ["t", "-1"]),
    ("select-relations-none", lambda: _runner().select_relations(_builtin(), ",,"), ["relations", "',,'"]),
    ("select-relations-int", lambda: _runner().select_relations(_builtin(), 5), ["relations", "5"]),
    ("held-out-fraction", lambda: _held_out(2.5), ["held-out", "2.5"]),
    ("held-out-string", lambda: _held_out("1"), ["held-out", "'1'"]),
    ("fact-nul-subject", lambda: _facts().Fact("P36", "Fr\x00ance", "Paris"), ["subject", "NUL"]),
    ("fact-surrogate-object", lambda: _facts().Fact("P36", "France", SURROGATE), ["object", "surrogate"]),
    ("template-nul", lambda: _facts().Relation("P1", "in", ("[X] is\x00 in [Y] .",)), ["template", "NUL"]),
]


def _runner():
    from kn_core import runner

    return runner


def _selection():
    from kn_core import selection

    return selection


def _batch():
    from kn_core import batch

    return batch


def _facts():
    from kn_core import facts

    return facts


def _builtin():
    from kn_core.fact_files import builtin_facts

    return builtin_facts()


def _held_out(n):
    from kn_core.metrics import held_out_templates

    return held_out_templates(["a [X] [Y]", "b [X] [Y]", "c [X] [Y]", "d [X] [Y]", "e [X] [Y]"], n)


@pytest.mark.parametrize("name,call,words", [pytest.param(*case, id=case[0]) for case in API])
def test_api_bad_input_is_a_one_line_value_error(name, call, words):
    from kn_core.validation import ValidationError

    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert time.perf_counter() - started < 10


def test_api_force_allows_many_steps_and_is_not_a_scoring_parameter():
    params = _attribution_params(steps=5000, force=True)
    assert params.steps == 5000 and "force" not in params.to_dict()
    assert params == _attribution_params(steps=5000, force=True)


@pytest.fixture(scope="module")
def tiny_gpt2():
    return make_tiny("gpt2")


@pytest.mark.parametrize("name", [
    "bare-string", "ids-beyond-vocabulary", "negative-ids",
])
def test_api_attribute_bad_input(name, tiny_gpt2):
    from kn_core.attribution import AttributionParams, attribute

    params = AttributionParams(steps=1)
    vocab = tiny_gpt2.model.config.vocab_size
    with pytest.raises(ValueError) as info:
        if name == "bare-string":
            attribute(tiny_gpt2, "The capital of France is", params)
        elif name == "ids-beyond-vocabulary":
            attribute(tiny_gpt2, "The capital of France is", params, answer_ids=(vocab + 5,))
        else:
            attribute(tiny_gpt2, "The capital of France is", params, answer_ids=(-3,))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scores,t,words", [
    (np.zeros((0, 0)), 0.2, "scores"), (np.zeros(5), 0.2, "scores"), (np.ones((2, 3)), float("nan"), "t"),
    (np.ones((2, 3)), -1, "t"), (np.ones((2, 3)), 5, "t")], ids=["empty", "1-D", "t nan", "t -1", "t 5"])
def test_api_coarse_neurons_of_bad_scores_or_t(scores, t, words):
    from kn_core.neurons import coarse_neurons

    with pytest.raises(ValueError, match=words) as info:  # not numpy's "zero-size array to reduction operation"
        coarse_neurons(scores, t)
    assert "\n" not in str(info.value)


REQUEST = '{"relation": "P36", "subject": "France", "kind": "suppress", "neurons": [[0, 1]]}'


@pytest.mark.parametrize("settings,words", [
    ({"forgetting_prompts": "1"}, ["forgetting_prompts", "'1'"]), ({"max_prompts": 2.5}, ["max_prompts", "2.5"]),
    ({"control_facts": -1}, ["control_facts", "-1"]), ({"options": {"lambda1": math.nan}}, ["lambda1", "nan"]),
    ({"options": {"colour": "red"}}, ["'colour'"])], ids=["forgetting-text", "max-prompts-fraction",
                                                          "control-facts-negative", "option-nan", "option-unknown"])
def test_api_run_batch_settings_are_refused_before_any_request_is_planned(settings, words, tiny_gpt2):
    from kn_core.batch import run_batch
    from kn_core.batch_requests import parse_requests

    parsed = parse_requests([REQUEST], _builtin())
    with pytest.raises(ValueError) as info:
        run_batch(tiny_gpt2, parsed, {1: (((0, 1),), "explicit", None)}, **settings)
    assert "\n" not in str(info.value) and all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("source", [b'{"relation": "P36"}', 5, [b"{}"]], ids=["bytes", "int", "byte-lines"])
def test_api_parse_requests_of_something_that_is_not_text(source):
    from kn_core.batch_requests import BatchError, parse_requests

    with pytest.raises(BatchError, match="lines of text"):
        parse_requests(source, _builtin())


def test_api_attribute_factset_refuses_other_parameter_types_before_writing(tiny_gpt2, tmp_path):
    from kn_core.runner import attribute_factset
    from kn_core.store import create_project
    from kn_core.validation import ValidationError

    with create_project(tmp_path / "p.knproj") as project:
        with pytest.raises(ValidationError, match="AttributionParams"):
            attribute_factset(project, tiny_gpt2, _builtin(), {"steps": 1}, relations="P36")
        assert project.counts()["models"] == 0 and project.counts()["facts"] == 0


def test_api_plain_texts_are_checked_before_a_forward_pass(tiny_gpt2):
    from kn_core import evaluation as ev
    from kn_core.validation import ValidationError

    with pytest.raises(ValueError, match="positions"):
        ev.neuron_activations(tiny_gpt2, [(0, 1)], ["Paris", LONG])
    with pytest.raises(ValueError, match="positions"):
        ev.perplexity(tiny_gpt2, [LONG])
    with pytest.raises(ValidationError, match="surrogate"):
        ev.predict(tiny_gpt2, SURROGATE)
    with pytest.raises(ValidationError, match="NUL"):
        ev.neuron_activations(tiny_gpt2, [(0, 1)], ["Par\x00is"])


def test_api_edit_from_dict_with_an_extra_key():
    from kn_core.edits import Suppress, edit_from_dict

    entry = Suppress(((0, 1),), "answer").to_dict() | {"surprise": 1}
    with pytest.raises(ValueError):
        edit_from_dict(entry)


@pytest.mark.parametrize("check,args,words", [
    ("check_token_ids", ("answer_ids", [5, 100], 50), ["answer_ids[1]", "100", "0 to 49"]),
    ("check_token_ids", ("answer_ids", [-1], 50), ["answer_ids[0]", "-1"]),
    ("check_token_ids", ("answer_ids", [], 50), ["answer_ids", "at least one"]),
    ("check_token_ids", ("answer_ids", "Paris", 50), ["answer_ids", "sequence"]),
    ("check_text", ("prompt", b"bytes"), ["prompt", "str"]),
    ("check_fraction", ("t", "0.2"), ["t", "'0.2'"]),
    ("check_number", ("lambda1", math.inf), ["lambda1", "inf"]),
    ("check_positive", ("scale", -0.0), ["scale", "> 0"]),
    ("check_choice", ("fill", "one", ("zero", "unk")), ["fill", "'zero'"]),
    ("check_device_name", ("device", "cuda:x"), ["device", "cuda:N"]),
])
def test_validation_functions(check, args, words):
    from kn_core import validation

    with pytest.raises(validation.ValidationError) as info:
        getattr(validation, check)(*args)
    assert all(word in str(info.value) for word in words), str(info.value)
