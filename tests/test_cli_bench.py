"""`kn bench`, `kn facts to-counterfact`, `kn facts import` of benchmark files and --protocol on `kn edit` /
`kn edit batch`, on saved tiny models."""

import json
from pathlib import Path

import pytest

from kn_core.cli import main
from tiny import make_tiny

DATA = Path(__file__).parent / "data"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    lm = make_tiny("gpt2")
    folder = tmp_path_factory.mktemp("gpt2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def pararel(tmp_path_factory):
    root = tmp_path_factory.mktemp("pararel")
    (root / "pattern_data" / "graphs_json").mkdir(parents=True)
    (root / "trex_lms_vocab").mkdir()
    templates = ["The capital of [X] is [Y] .", "[X], whose capital is [Y] .", "The capital city of [X] is [Y] ."]
    (root / "pattern_data" / "graphs_json" / "P36.jsonl").write_text(
        "".join(json.dumps({"pattern": t}) + "\n" for t in templates))
    facts = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid")]
    (root / "trex_lms_vocab" / "P36.jsonl").write_text(
        "".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in facts))
    return root


def test_facts_import_names_the_format_and_what_is_left_out(capsys):
    code, out, _ = run(capsys, "facts", "import", DATA / "zsre_mend_eval_sample.json", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["format"] == "zsre" and doc["facts"] == 2
    assert {x["field"] for x in doc["left_out"]} >= {"pred", "cond", "locality"}


def test_to_counterfact_then_bench_then_resume(capsys, gpt2, pararel, tmp_path):
    cf = tmp_path / "cf.json"
    code, out, _ = run(capsys, "facts", "to-counterfact", "--facts", pararel, "--output", cf, "--json")
    assert code == 0 and json.loads(out)["cases"] == 4
    argv = ["bench", cf, "--model", gpt2, "--cases", "2", "--steps", "2", "--quadrature", "gauss", "--t", "0.1",
            "--p", "0.5", "--gen-tokens", "4", "--out", tmp_path / "bench", "--json"]
    code, out, _ = run(capsys, *argv)
    doc = json.loads(out)
    assert code == 0 and doc["protocol"] == "rome" and doc["format"] == "counterfact"
    assert set(doc["summary"]) >= {"pre", "post", "control"} and doc["status"] == "complete"
    assert (tmp_path / "bench" / "report.html").is_file()
    code, out, _ = run(capsys, *argv)
    assert code == 0 and json.loads(out)["timing"]["cases_resumed"] == 2


def test_edit_batch_protocol_easyedit_on_a_counterfact_file(capsys, gpt2, tmp_path):
    record = {"case_id": 3, "requested_rewrite": {"prompt": "The capital of {} is", "relation_id": "P36",
                                                  "subject": "France", "target_new": {"str": "Berlin"},
                                                  "target_true": {"str": "Paris"}},
              "paraphrase_prompts": ["France, whose capital is", "The capital city of France is"],
              "neighborhood_prompts": ["The capital of Japan is"], "generation_prompts": [], "attribute_prompts": []}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    code, out, err = run(capsys, "edit", "batch", path, "--model", gpt2, "--protocol", "easyedit", "--steps", "2",
                         "--p", "0.3", "--t", "0.1", "--json")
    doc = json.loads(out)
    assert code == 0, err
    assert doc["protocol"] == "easyedit" and doc["format"] == "counterfact"
    for side in ("pre", "post", "control"):
        assert 0 <= doc["summary"][side]["rewrite_acc"] <= 1
    assert doc["cases"][0]["case_id"] == "3" and "locality" in doc["cases"][0]["post"]


def test_edit_update_protocol_rome(capsys, gpt2):
    code, out, _ = run(capsys, "edit", "update", "--relation", "P36", "--subject", "France", "--new-object", "Berlin",
                       "--model", gpt2, "--steps", "2", "--p", "0.3", "--protocol", "rome", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["protocol"] == "rome"
    assert {"ES", "EM", "PS", "NS"} <= set(doc["protocol_scores"]["post"])
    code, out, _ = run(capsys, "edit", "suppress", "--relation", "P36", "--subject", "France", "--model", gpt2,
                       "--steps", "2", "--p", "0.3", "--json")
    assert code == 0 and json.loads(out)["protocol"] == "kn"
