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
                                        "2", "--model", "{nan_weights}", "--project", "{project}"],
     ["NaN or infinite"]),
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
    # found by the audit before closing issue 25 (each failed before its fix)
    ("weights-missing-neurons-project", ["neurons", "--relation", "P36", "--subject", "France", "--model",
                                         "{missing}", "--project", "{project}"], ["not in the weight files"]),
    ("weights-missing-masked", ["predict", "The capital of France is [MASK] .", "--model", "{bert_missing}"],
     ["not in the weight files", "bert"]),
    ("config-nan-nested", ["predict", "hi", "--model", "{nan_init}"], ["initializer_range", "nan"]),
    ("config-layers-negative", ["predict", "hi", "--model", "{layers_negative}"], ["= -1"]),
    ("config-layers-text", ["predict", "hi", "--model", "{layers_text}"], ["config.json", "n_layer"]),
    ("tokenizer-missing-attribute", ["attribute", "--prompt", "The capital of", "--answer", " Paris", "--model",
                                     "{no_tokenizer}"], ["tokenizer", "no vocabulary"]),
    ("answer-unknown-token-in-a-multi-token-answer", ["attribute", "--prompt", "The capital of France is", "--answer",
                                                      " Paris Xyzzyq", "--model", "{gpt2}"], ["unknown token"]),
    ("project-model-fetch-new-file", ["model", "fetch", "--project", "{tmp}/fresh4.knproj"], ["--project"]),
    ("cluster-localhost-port-closed", ATTR_FACTS + ["--cluster", "ray:localhost:1", "--project", "{project}"]
     + NO_MODEL, ["localhost:1", "cannot reach"]),
    ("cluster-ray-client-port-closed", ATTR_FACTS + ["--cluster", "ray:ray://127.0.0.1:1", "--project", "{project}"]
     + NO_MODEL, ["ray://127.0.0.1:1", "cannot reach"]),
    ("cluster-port-0", ATTR_FACTS + ["--cluster", "ray:127.0.0.1:0", "--project", "{project}"] + NO_MODEL,
     ["not HOST:PORT"]),
    ("cluster-port-too-big", ATTR_FACTS + ["--cluster", "ray:127.0.0.1:70000", "--project", "{project}"] + NO_MODEL,
     ["not HOST:PORT"]),
    ("cluster-no-host", ATTR_FACTS + ["--cluster", "ray::6379", "--project", "{project}"] + NO_MODEL,
     ["not HOST:PORT"]),
    ("batch-repeated-request-ours", ["edit", "batch", "{batch_repeat_ours}"] + NO_MODEL, ["line 3", "repeats line 1"]),
    ("batch-contradictory-kinds", ["edit", "batch", "{batch_contradict_kind}"] + NO_MODEL,
     ["line 2", "contradicts line 1", "suppress"]),
    ("batch-repeated-request-after-a-bom", ["edit", "batch", "{batch_bom_repeat}"] + NO_MODEL,
     ["1 bad request", "line 2", "repeats line 1"]),
    ("batch-subject-inside-a-word-at-the-start", ["edit", "batch", "{batch_inside_word_start}"] + NO_MODEL,
     ["only inside another word"]),
    ("huge-relation", ["neurons", "--relation", HUGE.strip(), "--subject", "France"], ["characters cut"]),
    ("huge-facts-list-relation", ["facts", "list", "--relation", HUGE.strip()], ["characters cut"]),
    ("huge-erase-relation", ["edit", "erase", "--relation", HUGE.strip()], ["characters cut"]),
    ("huge-degeneracy-subject", ["edit", "degeneracy", "--relation", "P36", "--subject", HUGE.strip()],
     ["characters cut"]),
    ("huge-batch-relation", ["edit", "batch", "{batch_huge_relation}"] + NO_MODEL, ["characters cut"]),
    ("huge-csv-relation", ["facts", "import", "{csv_huge}"], ["characters cut"]),
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
    variant("nan_init", config={"initializer_range": float("nan")})
    variant("layers_negative", config={"n_layer": -1})
    variant("layers_text", config={"n_layer": "3"})
    bert_missing = root / "bert_missing"
    shutil.copytree(world["bert"], bert_missing)
    state = load_file(bert_missing / "model.safetensors")
    state.pop(next(k for k in state if "intermediate.dense.weight" in k))
    save_file(state, str(bert_missing / "model.safetensors"), metadata={"format": "pt"})
    out["bert_missing"] = str(bert_missing)
    variant("unexpected", lambda s: s.__setitem__("transformer.h.0.mlp.surprise", torch.zeros(3)))
    variant("misshaped", lambda s: s.__setitem__("transformer.h.0.mlp.c_proj.bias", torch.zeros(5)))
    variant("nan_config", config={"layer_norm_epsilon": float("nan")})
    variant("layers0", config={"n_layer": 0})
    variant("layers_huge", config={"n_layer": 1_000_000})
    for f in variant("no_tokenizer").iterdir():
        if "token" in f.name:
            f.unlink()
    (variant("broken_tokenizer") / "tokenizer.json").write_text("{broken")
    ours = {"relation": "P36", "subject": "France", "new_object": "Berlin"}
    easy = {"prompt": "The capital of France is", "subject": "France", "ground_truth": "Paris",
            "target_new": "Berlin", "neurons": [[0, 1]]}
    texts = {
        "batch_repeat": [easy, easy],
        "batch_contradict": [easy, {**easy, "target_new": "Rome"}],
        "batch_rephrase_text": [{**easy, "rephrase_prompts": "France has the capital"}],
        "batch_inside_word": [{**easy, "prompt": "The capital of Francesca is"}],
        "batch_huge": [{**easy, "subject": HUGE}],
        "batch_unknown_objects": [{**easy, "target_new": "Xyzzyq"}, {**easy, "ground_truth": "Qwertyz"}],
        "batch_repeat_ours": [ours, {**ours, "subject": "Germany"}, ours],
        "batch_contradict_kind": [ours, {"relation": "P36", "subject": "france", "kind": "suppress"}],
        "batch_inside_word_start": [{**easy, "prompt": "Frances says the capital is", "subject": "France"}],
        "batch_huge_relation": [{**ours, "relation": HUGE}],
    }
    for key, records in texts.items():
        (root / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        out[key] = str(root / f"{key}.jsonl")
    relation = {"kind": "relation", "id": "P1", "name": "in", "templates": ["[X] is in [Y] ."]}
    (root / "huge.jsonl").write_text(json.dumps(relation) + "\n" + json.dumps(
        {"kind": "fact", "relation": HUGE, "subject": "France", "object": "Paris"}) + "\n")
    out["jsonl_huge"] = str(root / "huge.jsonl")
    (root / "bom.jsonl").write_text("\ufeff" + (json.dumps(ours) + "\n") * 2, encoding="utf-8")
    out["batch_bom_repeat"] = str(root / "bom.jsonl")
    (root / "huge.csv").write_text("kind,relation,name,template,subject,object\nfact," + HUGE.strip()
                                   + ",,,France,Paris\n")
    out["csv_huge"] = str(root / "huge.csv")
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


# ------------------------------------------------------------------------------------ the Python API

def _replaced_project(tmp_path, how):
    from kn_core.store import create_project

    project = create_project(tmp_path / "p.knproj")
    project.add_fact({"relation": "P1", "subject": "a", "object": "b"})
    if how == "replaced":
        create_project(tmp_path / "other.knproj").close()
        Path(tmp_path / "other.knproj").replace(tmp_path / "p.knproj")
    else:
        (tmp_path / "p.knproj").unlink()
    return project


def _hanging_resolver(monkeypatch):
    import socket
    import time

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(30))


API = [
    ("load-missing-weights", lambda p, t, m: _load(p["missing"]), "ModelLoadError", ["not in the weight files"]),
    ("load-no-layers", lambda p, t, m: _load(p["layers0"]), "ModelLoadError", ["at least one layer"]),
    ("load-million-layers", lambda p, t, m: _load(p["layers_huge"]), "ModelLoadError", ["weight files"]),
    ("load-broken-tokenizer", lambda p, t, m: _load(p["broken_tokenizer"]), "ModelLoadError",
     ["could not load the tokenizer"]),
    ("cluster-unresolvable-host-does-not-hang", lambda p, t, m: (_hanging_resolver(m), _address("no-such-host:6379")),
     "ClusterError", ["cannot resolve", "no answer in 3 s"]),
    ("cluster-port-closed", lambda p, t, m: _address("127.0.0.1:1"), "ClusterError", ["cannot reach"]),
    ("write-to-a-replaced-project", lambda p, t, m: _replaced_project(t, "replaced").add_fact(
        {"relation": "P1", "subject": "c", "object": "d"}), "ProjectReplacedError", ["replaced by another file"]),
    ("write-to-a-deleted-project", lambda p, t, m: _replaced_project(t, "deleted").add_fact(
        {"relation": "P1", "subject": "c", "object": "d"}), "ProjectReplacedError", ["deleted or moved away"]),
    ("non-finite-logits", lambda p, t, m: _finite(float("nan")), "NonFiniteOutputError", ["NaN or infinite"]),
    ("infinite-logits", lambda p, t, m: _finite(float("inf")), "NonFiniteOutputError", ["NaN or infinite"]),
]


def _load(folder):
    from kn_core.models import load_model

    return load_model(folder, device="cpu")


def _address(address):
    from kn_core.cluster import check_address

    check_address(address)


def _finite(value):
    from kn_core.validation import check_finite_output

    check_finite_output(torch.tensor([0.0, value]))


@pytest.mark.parametrize("name,call,error,words", [pytest.param(*case, id=case[0]) for case in API])
def test_api_refuses_in_one_line(name, call, error, words, places, tmp_path, monkeypatch):
    import time

    started = time.perf_counter()
    with pytest.raises(Exception) as info:
        call(places, tmp_path, monkeypatch)
    message = str(info.value)
    assert type(info.value).__name__ == error and "\n" not in message, message
    assert all(word in message for word in words), message
    assert time.perf_counter() - started < 10
