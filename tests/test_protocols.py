"""The protocols (kn_core.protocols) against hand computations on fixed logits, cases worked by hand from
EasyEdit's and ROME's formulas, and the pre-edit scores of a case against a direct transformers forward."""

import json
import math

import numpy as np
import pytest
import torch

from kn_core.bench import BenchSettings, pararel_to_counterfact, run_bench
from kn_core.facts import Fact, FactSet, Relation
from kn_core.field_formats import EditCase, read_field_file
from kn_core.protocols import (argmax_kept, case_prompts, compute_n_gram_entropy, harmonic_mean, n_gram_entropy,
                               score_case, summarize, tfidf_similarity, token_accuracy)
from tiny import make_tiny

_LM = {}


def tiny():
    if "gpt2" not in _LM:
        _LM["gpt2"] = make_tiny("gpt2")
    return _LM["gpt2"]


class P:  # a prompt as the protocols read it (its answer's token ids)
    def __init__(self, ids):
        self.answer_ids = tuple(ids)


def row(logits, targets):
    """An answer_probabilities row computed here from fixed logits (one row of logits per answer position)."""
    logits = np.asarray(logits, dtype=float)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lp = [float(logp[k, t]) for k, t in enumerate(targets)]
    greedy = [int(i) for i in logits.argmax(axis=1)]
    return {"logprob": sum(lp), "prob": math.exp(sum(lp)), "token_probs": [math.exp(x) for x in lp],
            "greedy_ids": greedy, "top1_id": greedy[0], "correct": greedy == list(targets)}


def test_token_accuracy_and_kept_argmax_by_hand():
    assert token_accuracy([0, 1], [0, 2]) == 0.5
    assert token_accuracy([5], [5]) == 1.0
    assert argmax_kept([3, 1, 2], [3, 0, 2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])


def test_easyedit_case_worked_by_hand():
    """rewrite_acc: prompt 1 gets 1 of 2 target tokens (0.5), prompt 2 both (1.0): 0.75. rephrase_acc: 0 of 1.
    locality: argmax at the locality target's 3 positions before [3, 1, 2], after [3, 0, 2]: 2/3.
    portability group "Reasoning": 1 of 1."""
    L = [[2, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 4]]
    prompts = {"rewrite:new": [P([0, 2]), P([0, 1])], "paraphrase:new": [P([2])],
               "locality:Relation_Specificity": [P([3, 1, 2])], "portability:Reasoning": [P([3])]}
    after = {"rewrite:new": [row(L[:2], [0, 2]), row(L[:2], [0, 1])], "paraphrase:new": [row([L[0]], [2])],
             "locality:Relation_Specificity": [row([[0, 0, 0, 9], [9, 0, 0, 0], [0, 0, 9, 0]], [3, 1, 2])],
             "portability:Reasoning": [row([L[2]], [3])]}
    before = dict(after, **{"locality:Relation_Specificity": [row([[0, 0, 0, 9], [0, 9, 0, 0], [0, 0, 9, 0]],
                                                                  [3, 1, 2])]})
    s = score_case("easyedit", prompts, after, before)
    assert s["rewrite_acc"] == pytest.approx(0.75) and s["rephrase_acc"] == 0.0
    assert s["locality"] == {"Relation_Specificity_acc": pytest.approx(2 / 3)}
    assert s["portability"] == {"Reasoning_acc": 1.0}
    assert score_case("easyedit", prompts, before, None)["locality"]["applicable"] is False


def test_rome_case_worked_by_hand_multi_token_uses_mean_log_prob():
    """Rewrite: o* has 2 tokens with log p -1 and -1.2 (product e^-2.2), o one token with log p -1.5. The product
    says o wins, ROME's mean per-token log p says o* wins (-1.1 > -1.5): ES = 1, EM = e^-1.1 - e^-1.5.
    Neighborhood: log p(o) = -0.5, log p(o*) = -2: NS = 1, NM = e^-0.5 - e^-2."""
    def lp_row(lps):
        return {"logprob": sum(lps), "token_probs": [math.exp(x) for x in lps]}

    rows = {"rewrite:new": [lp_row([-1.0, -1.2])], "rewrite:true": [lp_row([-1.5])],
            "paraphrase:new": [lp_row([-3.0]), lp_row([-0.1])], "paraphrase:true": [lp_row([-1.0]), lp_row([-2.0])],
            "neighborhood:true": [lp_row([-0.5])], "neighborhood:new": [lp_row([-2.0])]}
    s = score_case("rome", {}, rows)
    assert s["ES"] == 1.0 and s["EM"] == pytest.approx(math.exp(-1.1) - math.exp(-1.5))
    assert s["PS"] == 0.5 and s["PM"] == pytest.approx(((math.exp(-3) - math.exp(-1)) + (math.exp(-.1) - math.exp(-2))) / 2)
    assert s["NS"] == 1.0 and s["NM"] == pytest.approx(math.exp(-0.5) - math.exp(-2))
    assert s["fluency"]["applicable"] is False and s["consistency"]["applicable"] is False
    summary = summarize("rome", [s, dict(s, ES=0.0)])
    assert summary["ES"] == 0.5 and summary["S"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.5 + 1 / 1.0))


def test_harmonic_mean_and_fluency_by_hand():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([1.0, 0.0]) == 0.0 and harmonic_mean([1.0, None]) is None
    # "a b a b": bigrams ab, ba, ab -> H = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams aba, bab -> H = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert compute_n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert n_gram_entropy(["a b a b", "a a a a"]) == pytest.approx((2 / 3 * h2 + 4 / 3) / 4)
    assert compute_n_gram_entropy("Paris, France's capital.") == pytest.approx(
        (2 / 3 * math.log2(5) + 4 / 3 * math.log2(4)) / 2)  # Paris , France 's capital . : 6 tokens


def test_tfidf_similarity():
    corpus = ["paris is in france", "berlin is in germany"]
    assert tfidf_similarity("paris france", "paris france", corpus) == pytest.approx(1.0)
    assert tfidf_similarity("paris", "berlin", corpus) == 0.0
    assert 0 < tfidf_similarity("paris is nice", "paris is in france", corpus) < 1


def test_mquake_any_question_any_alias():
    yes, no = {"correct": True}, {"correct": False}
    rows = {"edit:0": [yes], "edit:1": [no], "hop:0:0": [no], "hop:0:1": [yes], "hop:1:0": [yes],
            "question:0:0": [no], "question:1:0": [no], "question:1:1": [yes]}
    s = score_case("mquake", {}, rows)
    assert s["edit_wise"] == 0.5 and s["instance_wise"] == 1.0 and s["multi_hop"] == 1.0
    rows["question:1:1"] = [no]
    rows["hop:1:0"] = [no]
    s = score_case("mquake", {}, rows)
    assert s["multi_hop"] == 0.0 and s["instance_wise"] == 0.0


CASE = EditCase("c0", "The capital of France is", "France", "Paris", "Berlin", "P36",
                paraphrases=("France, whose capital is",), neighborhood=(("The capital of Japan is", ("Tokyo",)),),
                locality={"other": (("The language of Italy is", ("Italian",)),)},
                portability={"Reasoning": (("The capital of Germany is", ("Berlin",)),)})


def _direct(lm, prompt: str, target: str):
    """EasyEdit's test_prediction_acc and ROME's per-token mean log p, computed here with the transformers
    model's own forward on tok(prompt + ' ' + target)."""
    tok = lm.tokenizer
    ids = tok(prompt + " " + target, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    answer = ids[n:]
    lps = [float(logp[n - 1 + k, t]) for k, t in enumerate(answer)]
    acc = float(np.mean(np.equal(logits.argmax(-1).tolist()[n - 1:-1], answer)))
    return acc, sum(lps) / len(lps)


def test_pre_edit_scores_equal_a_direct_transformers_computation():
    lm = tiny()
    prompts, skipped = case_prompts(lm, CASE, "rome")
    assert not skipped
    from kn_core.evaluation import answer_probabilities

    rows = {g: answer_probabilities(lm, ps) for g, ps in prompts.items()}
    rome, easy = score_case("rome", prompts, rows), score_case("easyedit", prompts, rows)
    new, true = _direct(lm, CASE.prompt, "Berlin"), _direct(lm, CASE.prompt, "Paris")
    assert rome["ES"] == float(new[1] > true[1])
    assert rome["EM"] == pytest.approx(math.exp(new[1]) - math.exp(true[1]), abs=1e-6)
    pn, pt = _direct(lm, CASE.paraphrases[0], "Berlin"), _direct(lm, CASE.paraphrases[0], "Paris")
    assert rome["PM"] == pytest.approx(math.exp(pn[1]) - math.exp(pt[1]), abs=1e-6)
    nn, nt = _direct(lm, "The capital of Japan is", "Berlin"), _direct(lm, "The capital of Japan is", "Tokyo")
    assert rome["NS"] == float(nt[1] > nn[1])
    assert rome["NM"] == pytest.approx(math.exp(nt[1]) - math.exp(nn[1]), abs=1e-6)
    assert easy["rewrite_acc"] == new[0] and easy["rephrase_acc"] == pn[0]
    assert easy["portability"]["Reasoning_acc"] == _direct(lm, "The capital of Germany is", "Berlin")[0]


def test_batch_protocol_summary_pre_post_control(tmp_path):
    from kn_core.batch import run_batch
    from kn_core.batch_requests import parse_requests

    lm = tiny()
    record = {"case_id": 7, "requested_rewrite": {"prompt": "The capital of {} is", "relation_id": "P36",
                                                  "subject": "France", "target_new": {"str": "Berlin"},
                                                  "target_true": {"str": "Paris"}},
              "paraphrase_prompts": ["France, whose capital is"], "neighborhood_prompts": ["The capital of Japan is"],
              "generation_prompts": [], "attribute_prompts": []}
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    parsed = parse_requests(path, None, "update")
    neurons = {r.line: (((2, 5), (2, 9)), "explicit", None) for r in parsed.requests}
    report = run_batch(lm, parsed, neurons, protocol="rome", measure_sizes=False).report
    assert report["protocol"] == "rome" and {"pre", "post", "control"} <= set(report["summary"])
    prompts, _ = case_prompts(lm, read_field_file(path).cases[0], "rome")
    from kn_core.evaluation import answer_probabilities

    direct = score_case("rome", prompts, {g: answer_probabilities(lm, ps) for g, ps in prompts.items()})
    assert report["summary"]["pre"]["EM"] == pytest.approx(direct["EM"], abs=1e-9)
    assert report["cases"][0]["case_id"] == "7" and "ES" in report["cases"][0]["post"]
    for side in ("pre", "post", "control"):
        for key in ("ES", "PS", "NS"):
            assert 0.0 <= report["summary"][side][key] <= 1.0


def _tiny_counterfact(tmp_path):
    rel = Relation("P36", "capital", ("The capital of [X] is [Y].", "[X], whose capital is [Y].",
                                      "The capital city of [X] is [Y].", "[Y] is the capital of [X]."))
    facts = [Fact("P36", c, cap) for c, cap in [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                                                ("Spain", "Madrid")]]
    records, left = pararel_to_counterfact(FactSet("t", {"P36": rel}, facts), seed=0)
    assert left and "subject does not come before" in left[0]["reason"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    return path, records


def test_pararel_to_counterfact_shape(tmp_path):
    _, records = _tiny_counterfact(tmp_path)
    assert len(records) == 4
    r = records[0]
    assert r["requested_rewrite"]["prompt"] == "The capital of {} is"
    assert r["requested_rewrite"]["target_new"]["str"] != r["requested_rewrite"]["target_true"]["str"]
    assert r["paraphrase_prompts"] == [f"{r['requested_rewrite']['subject']}, whose capital is",
                                       f"The capital city of {r['requested_rewrite']['subject']} is"]
    assert read_field_file(tmp_path / "cf.json").format == "counterfact"


def test_bench_runs_resumes_and_writes_the_report(tmp_path):
    from kn_core.attribution import AttributionParams

    lm = tiny()
    path, _ = _tiny_counterfact(tmp_path)
    read = read_field_file(path)
    settings = BenchSettings(cases=2, seed=0, t=0.1, p=0.5, gen_tokens=5, generation_prompts=1)
    params = AttributionParams(steps=2, quadrature="gauss")
    report = run_bench(lm, read, tmp_path / "out", params, settings)
    assert report["status"] == "complete" and report["protocol"] == "rome"
    for name in ("report.json", "report.md", "report.html"):
        assert (tmp_path / "out" / name).is_file()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| Editor | Score S | Efficacy ES |" in md and "Fluency GE" in md and "load average" in md
    edited = [c for c in report["cases"] if "conditions" in c]
    if edited:
        assert set(report["summary"]) == {"unedited", "update (paper)", "random neurons (paper λ)",
                                          "update (calibrated)", "random neurons (calibrated λ)"}
        assert isinstance(report["summary"]["unedited"]["fluency"], float)
    assert len(edited) + len(report["left_out"]["cases"]) == 2
    again = run_bench(lm, read, tmp_path / "out", params, settings)
    assert again["timing"]["cases_resumed"] == 2 and again["summary"] == report["summary"]


def test_kn_protocol_by_hand():
    a, b = {"correct": True, "top1_id": 1, "prob": 0.5}, {"correct": False, "top1_id": 2, "prob": 0.2}
    rows = {"rewrite:new": [a, b], "rewrite:true": [b, b], "paraphrase:new": [a], "neighborhood:true": [a, b]}
    before = dict(rows, **{"neighborhood:true": [a, a]})
    s = score_case("kn", {}, rows, before, "update")
    assert s == {"reliability": 0.5, "generality": 1.0, "locality": 0.5}
    assert score_case("kn", {}, rows, before, "suppress")["reliability"] == 1.0  # o greedy on no prompt


def test_bench_suppress_and_a_multi_rewrite_case(tmp_path):
    from kn_core.attribution import AttributionParams

    lm = tiny()
    path, _ = _tiny_counterfact(tmp_path)
    params = AttributionParams(steps=2, quadrature="gauss")
    report = run_bench(lm, read_field_file(path), tmp_path / "s", params,
                       BenchSettings(edit="suppress", protocol="kn", cases=1, t=0.1, p=0.5))
    if report["cases_edited"]:
        assert set(report["summary"]) == {"unedited", "suppress", "random neurons"}
        assert set(report["summary"]["suppress"]) >= {"reliability", "generality"}
    assert report["cases_edited"] + len(report["left_out"]["cases"]) == 1
    case = EditCase("m", "The capital of France is", "France", "Paris", "Berlin",
                    paraphrases=("France, whose capital is", "The capital city of France is"),
                    extra_edits=(EditCase("m.1", "The capital of Japan is", "Japan", "Tokyo", "Rome"),))
    from kn_core.bench import run_case

    out = run_case(lm, case, params, BenchSettings(protocol="mquake", t=0.1, p=0.5), tmp_path / "cache")
    # rewrite 1 has one prompt: refinement (3 prompts) cannot select, so its neurons are that prompt's coarse ones
    # (neurons.case_neurons), never a silent "none"; only rewrite 0 (3 prompts, refined) may be left without any
    assert out["rewrites"][1]["neurons"]
    assert "left_out" not in out or out["left_out"].startswith("no knowledge neurons for rewrite 0 (refined")


def test_the_cli_offers_every_protocol():
    from kn_core.cli.bench import PROTOCOL_CHOICES
    from kn_core.protocols import PROTOCOLS

    assert tuple(PROTOCOL_CHOICES) == PROTOCOLS


@pytest.mark.default_model
def test_pre_edit_rome_and_easyedit_scores_on_the_default_model_equal_transformers():
    """A real CounterFact record (tests/data) on the embedded default model: the protocols' pre-edit numbers from
    answer_probabilities rows equal EasyEdit's / ROME's formulas on the transformers forward of prompt + ' ' + target."""
    from pathlib import Path

    from kn_core.evaluation import answer_probabilities
    from kn_core.models import load_model

    lm = load_model("default", device="cpu")
    case = read_field_file(Path(__file__).parent / "data" / "counterfact_sample.json").cases[0]
    prompts, skipped = case_prompts(lm, case, "rome")
    assert not skipped
    rows = {g: answer_probabilities(lm, ps) for g, ps in prompts.items()}
    rome, easy = score_case("rome", prompts, rows), score_case("easyedit", prompts, rows)
    texts = {"rewrite": [case.prompt], "paraphrase": list(case.paraphrases),
             "neighborhood": [p for p, _ in case.neighborhood]}
    for name, group, sign in (("EM", "rewrite", 1), ("PM", "paraphrase", 1), ("NM", "neighborhood", -1)):
        diffs = [math.exp(_direct(lm, t, case.target_new)[1]) - math.exp(_direct(lm, t, case.target_true)[1])
                 for t in texts[group]]
        assert rome[name] == pytest.approx(sign * float(np.mean(diffs)), abs=1e-5)
    accs = [_direct(lm, t, case.target_new)[0] for t in texts["paraphrase"]]
    assert easy["rephrase_acc"] == pytest.approx(float(np.mean(accs)))


def test_summary_lines_read_pre_post_control():
    from kn_core.protocols import summary_lines

    lines = summary_lines("rome", {"pre": {"ES": 0.25, "fluency": 5.0}, "post": {"ES": 1.0, "fluency": 4.5,
                                                                             "consistency": {"applicable": False}},
                                   "control": {"ES": 0.5, "fluency": 5.1}})
    assert "ES: 25.0% -> 100.0% (50.0%)" in lines[1] and "fluency: 5.00 bits -> 4.50 bits (5.10 bits)" in lines[2]
    assert lines[3].strip().startswith("consistency: n/a -> n/a")
