"""`kn` with --prompt-format, --eval and cases of few prompts (issue 22): what the JSON records."""

from __future__ import annotations

import json

import pytest

from test_cli import run
from test_prompt_format import TEMPLATE
from tiny import make_tiny

ONE_TEMPLATE = ('{"kind": "relation", "id": "P1", "name": "capital", "templates": ["The capital of [X] is [Y] ."]}\n'
                '{"kind": "fact", "relation": "P1", "subject": "France", "object": "Paris"}\n'
                '{"kind": "fact", "relation": "P1", "subject": "Japan", "object": "Tokyo"}\n')


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    lm = make_tiny("gpt2")
    lm.tokenizer.chat_template = TEMPLATE
    lm.model.save_pretrained(root / "gpt2")
    lm.tokenizer.save_pretrained(root / "gpt2")
    (root / "one.jsonl").write_text(ONE_TEMPLATE)
    (root / "requests.jsonl").write_text(json.dumps({"prompt": "The capital of France is", "subject": "France",
                                                     "ground_truth": "Paris", "target_new": "Berlin"}) + "\n")
    return {"model": str(root / "gpt2"), "facts": str(root / "one.jsonl"), "requests": str(root / "requests.jsonl")}


def test_edit_with_chat_prompts_judged_by_generation(capsys, saved):
    code, out, err = run(capsys, "edit", "suppress", "--relation", "P36", "--subject", "France", "--model",
                         saved["model"], "--steps", "2", "--t", "0.1", "--p", "0.2", "--eval", "generate",
                         "--prompt-format", "chat", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["eval"] == "generate" and doc["prompt_format"] == "chat"
    assert doc["neuron_params"]["selection"]["rule"] == "refined"
    code, out, err = run(capsys, "edit", "suppress", "--relation", "P36", "--subject", "France", "--model",
                         saved["model"], "--steps", "2", "--t", "0.1", "--p", "0.2")
    assert code == 0, err
    assert "correct judged teacher-forced, plain prompts" in out


def test_neurons_of_a_fact_with_one_template_use_the_few_prompt_rule(capsys, saved, tmp_path):
    code, out, err = run(capsys, "neurons", "--relation", "P1", "--subject", "France", "--facts", saved["facts"],
                         "--model", saved["model"], "--steps", "2", "--keep-massive", "--json",
                         "--project", str(tmp_path / "p.knproj"))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["selection"]["rule"] == "coarse in every prompt" and doc["selection"]["prompts"] == 1
    pairs = sorted((c["layer"], c["neuron"]) for c in doc["coarse"][0])  # the one prompt's coarse neurons
    assert [(n["layer"], n["neuron"]) for n in doc["refined"]] == pairs
    assert doc["refined"] and doc["prompt_format"] == "plain"


def test_edit_of_a_one_template_fact_gets_neurons_and_says_how(capsys, saved):
    code, out, err = run(capsys, "edit", "amplify", "--relation", "P1", "--subject", "France", "--facts",
                         saved["facts"], "--model", saved["model"], "--steps", "2", "--hold-out", "0", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["neurons"] and doc["neuron_params"]["selection"]["rule"] == "coarse in every prompt"
    assert "fewer than the 3 refinement needs" in err
    code, out, err = run(capsys, "edit", "amplify", "--relation", "P1", "--subject", "France", "--facts",
                         saved["facts"], "--model", saved["model"], "--steps", "2", "--hold-out", "0", "--t", "1")
    assert code == 2 and "no knowledge neurons" in err and "paraphrased prompts" in err and "lower --p" not in err


def test_batch_of_a_single_prompt_request_judged_by_generation(capsys, saved):
    code, out, err = run(capsys, "edit", "batch", saved["requests"], "--model", saved["model"], "--steps", "2",
                         "--eval", "generate", "--prompt-format", "chat", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["evaluation"] == "generate" and doc["prompt_format"] == "chat" and doc["applied"] == 1
    assert "the prompt's coarse neurons" in doc["requests"][0]["neurons_from"]
