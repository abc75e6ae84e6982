"""The bad-input catalogue, continued (issue 25: nothing lost, nothing faked). Each case runs through the same
check as tests/test_bad_inputs.py (`run_failing` + `check_one_line`): exit status 2, one error line naming the
problem, no traceback, within 10 s, and every path the command was given byte-identical afterwards (a project
that did not exist is not created). Every case here failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_bad_inputs import NO_MODEL, check_one_line, run_failing, world  # noqa: F401 - world is a fixture

ATTR_FACTS = ["attribute", "--facts", "builtin", "--relations", "P36", "--steps", "1"]
UPDATE = ["edit", "update", "--relation", "P36", "--subject", "France", "--new-object", "Berlin", "--steps", "2",
          "--p", "0.1"]
HUGE = "Paris " * 2_000_000  # a 12 MB field

CASES = [
    # weights the files do not provide would be random values: refused, by name (--allow-missing-weights allows)
    ("weights-missing", ["predict", "hi", "--model", "{missing}"],
     ["transformer.h.0.mlp.c_proj.weight", "not in the weight files", "--allow-missing-weights"]),
    ("weights-unexpected", ["model", "info", "--model", "{unexpected}"], ["transformer.h.0.mlp.surprise", "unknown"]),
    ("weights-misshaped", ["model", "info", "--model", "{misshaped}"], ["c_proj.bias", "(5,)", "(32,)"]),
    # configs: NaN, no layers, absurd sizes (refused before the model is built)
    ("config-nan", ["predict", "hi", "--model", "{nan_config}"], ["layer_norm_epsilon", "nan"]),
    ("config-no-layers", ["attribute", "--prompt", "The capital of", "--answer", " Paris", "--model", "{layers0}"],
     ["= 0", "at least one layer"]),
    ("config-million-layers", ["model", "info", "--model", "{layers_huge}"], ["1000000", "weight files"]),
    # tokenizers are named as the tokenizer
    ("tokenizer-missing", ["predict", "The capital of", "--model", "{no_tokenizer}"], ["tokenizer", "no vocabulary"]),
    ("tokenizer-broken", ["predict", "The capital of", "--model", "{broken_tokenizer}"],
     ["could not load the tokenizer", "tokenizer.json"]),
    # NaN is never a result
    ("predict-nan-weights", ["predict", "The capital of", "--model", "{nan_weights}"], ["NaN or infinite"]),
    ("update-lambda2-overflow", UPDATE + ["--lambda2", "1e30", "--model", "{gpt2}", "--project", "{project}"],
     ["NaN or infinite"]),
    ("amplify-factor-overflow", ["edit", "amplify", "--relation", "P36", "--subject", "France", "--factor", "1e38",
                                 "--steps", "2", "--p", "0.1", "--model", "{gpt2}"], ["NaN or infinite"]),
    # a failing command stores nothing and creates no project
    ("failed-attribute-new-project", ["attribute", "--prompt", "The capital of", "--answer", " Paris", "--steps", "2",
                                      "--model", "{nan_weights}", "--project", "{tmp}/fresh.knproj"],
     ["NaN or infinite"]),
    ("failed-attribute-keeps-project", ["attribute", "--prompt", "The capital of", "--answer", " Paris", "--steps",
                                        "2", "--model", "{nan_weights}", "--project", "{project}"], ["NaN or infinite"]),
    ("failed-neurons-keeps-project", ["neurons", "--relation", "P36", "--subject", "France", "--steps", "2",
                                      "--model", "{nan_weights}", "--project", "{project}"], ["NaN or infinite"]),
    ("failed-facts-run-keeps-project", ATTR_FACTS + ["--model", "{nan_weights}", "--project", "{project}"],
     ["NaN or infinite"]),
    ("failed-facts-run-new-project", ATTR_FACTS + ["--model", "{nan_weights}", "--project", "{tmp}/fresh2.knproj"],
     ["NaN or infinite"]),
    # hangs: the cluster's address is checked before anything loads (loopback only)
    ("cluster-port-closed", ATTR_FACTS + ["--cluster", "ray:127.0.0.1:1", "--project", "{tmp}/fresh3.knproj"]
     + NO_MODEL, ["127.0.0.1:1", "cannot reach"]),
    ("cluster-port-closed-ipv6", ATTR_FACTS + ["--cluster", "ray:[::1]:1", "--project", "{project}"] + NO_MODEL,
     ["[::1]:1", "cannot reach"]),
    ("cluster-address-not-host-port", ATTR_FACTS + ["--cluster", "ray:127.0.0.1:port", "--project", "{project}"]
     + NO_MODEL, ["not HOST:PORT"]),
    # --project is stored or refused, never ignored
    ("project-model-fetch", ["model", "fetch", "--project", "{project}"], ["--project", "kn model fetch"]),
    ("project-facts-list", ["facts", "list", "--project", "{project}"], ["--project", "kn facts import"]),
    # accepted silently before
    ("answer-unknown-token-causal", ["attribute", "--prompt", "The capital of France is", "--answer", " Xyzzyq",
                                     "--model", "{gpt2}"], ["unknown token"]),
    ("batch-repeated-request", ["edit", "batch", "{batch_repeat}"] + NO_MODEL, ["line 2", "repeats line 1"]),
    ("batch-contradictory-requests", ["edit", "batch", "{batch_contradict}"] + NO_MODEL,
     ["line 2", "contradicts line 1"]),
    ("batch-rephrase-as-text", ["edit", "batch", "{batch_rephrase_text}"] + NO_MODEL,
     ["rephrase_prompts", "list", "[\"...\"]"]),
    ("batch-subject-inside-a-word", ["edit", "batch", "{batch_inside_word}"] + NO_MODEL, ["only inside another word"]),
    # messages: a huge field is quoted in part
    ("huge-subject", ["neurons", "--relation", "P36", "--subject", HUGE.strip()], ["characters cut"]),
    ("huge-batch-field", ["edit", "batch", "{batch_huge}"] + NO_MODEL, ["characters cut"]),
    ("huge-fact-file-field", ["facts", "import", "{jsonl_huge}"], ["characters cut"]),
]


@pytest.fixture(scope="module")
def places(world, tmp_path_factory):
    """The world of tests/test_bad_inputs.py plus broken model folders and request files."""
    root = tmp_path_factory.mktemp("more")
    out = dict(world)
    gpt2 = Path(world["gpt2"])

    def variant(name, tensors=None, config=None):
        folder = root / name
        shutil.copytree(gpt2, folder)
        if tensors is not None:
            state = load_file(folder / "model.safetensors")
            tensors(state)
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(config)
            (folder / "config.json").write_text(json.dumps(cfg))
        out[name] = str(folder)
        return folder

    variant("missing", lambda s: s.pop("transformer.h.0.mlp.c_proj.weight"))
    variant("unexpected", lambda s: s.__setitem__("transformer.h.0.mlp.surprise", torch.zeros(3)))
    variant("misshaped", lambda s: s.__setitem__("transformer.h.0.mlp.c_proj.bias", torch.zeros(5)))
    variant("nan_config", config={"layer_norm_epsilon": float("nan")})
    variant("layers0", config={"n_layer": 0})
    variant("layers_huge", config={"n_layer": 1_000_000})
    for f in variant("no_tokenizer").iterdir():
        if "token" in f.name:
            f.unlink()
    (variant("broken_tokenizer") / "tokenizer.json").write_text("{broken")
    easy = {"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris",
            "target_new": "Berlin", "neurons": [[0, 1]]}
    texts = {
        "batch_repeat": [easy, easy],
        "batch_contradict": [easy, {**easy, "target_new": "Rome"}],
        "batch_rephrase_text": [{**easy, "rephrase_prompts": "France has the capital"}],
        "batch_inside_word": [{**easy, "prompt": "The capital of Francesca is"}],
        "batch_huge": [{**easy, "subject": HUGE}],
        "batch_unknown_objects": [{**easy, "target_new": "Xyzzyq"}, {**easy, "ground_truth": "Qwertyz"}],
    }
    for key, records in texts.items():
        (root / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        out[key] = str(root / f"{key}.jsonl")
    relation = {"kind": "relation", "id": "P1", "name": "in", "templates": ["[X] is in [Y] ."]}
    (root / "huge.jsonl").write_text(json.dumps(relation) + "\n" + json.dumps(
        {"kind": "fact", "relation": HUGE, "subject": "France", "object": "Paris"}) + "\n")
    out["jsonl_huge"] = str(root / "huge.jsonl")
    out["tmp"] = str(root)
    return out


def _fill(text: str, places: dict) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("name,argv,words", [pytest.param(*case, id=case[0]) for case in CASES])
def test_bad_input_is_one_line_status_2(name, argv, words, places, capsys):
    argv = [_fill(a, places) for a in argv]
    check_one_line(*run_failing(argv, places, capsys), words, places)


def test_a_batch_that_leaves_out_every_request_stores_nothing(places, capsys):
    """--skip-bad lists each request it leaves out (one line each), then fails; the project keeps every byte
    (before: its relations, facts and neuron sets were stored and the project bumped)."""
    argv = ["edit", "batch", places["batch_unknown_objects"], "--model", places["gpt2"], "--project",
            places["project"], "--skip-bad", "--steps", "1"]
    code, lines, out, err, _ = run_failing(argv, places, capsys)
    assert code == 2 and lines[-1].startswith("error: every one of the 2 requests was left out"), lines
    assert all(line.startswith(("skipped line", "left out line")) for line in lines[:-1]), lines
