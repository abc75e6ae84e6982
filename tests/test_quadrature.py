"""Quadratures beyond the paper's Riemann sum (kn_core/quadrature.py) against an independent slow reference: a
float64 loop with one full forward and backward pass per (layer, alpha) point."""

import json
import math

import numpy as np
import pytest
import torch

from kn_core import attribution
from kn_core.attribution import AttributionParams, attribute, attribute_fact, encode_answer
from kn_core.cli import main
from kn_core.hooks import ActivationPatch
from kn_core.passes import Runner, plan_passes
from kn_core.quadrature import DENSE_PANELS, MIN_WIDTH, gauss_legendre
from kn_core.tasks import Cancelled, Task
from kn_core.validation import ValidationError
from tiny import make_tiny, tiny_llama

CASES = [("bert", "The capital of France is [MASK] .", "Paris"),
         ("gpt2", "The capital of France is", " Paris"),
         ("llama", "The capital of France is", " Paris")]


def tiny64(family):
    lm = tiny_llama() if family == "llama" else make_tiny(family)
    lm.model.double()  # float64: the comparison tests the rule, not rounding
    return lm


def reference(lm, text, answer_ids, panels_of):
    """Scores [L, N] and P(0 at layer l) [L] of the first answer token: for each layer its panels
    (`panels_of(layer)`: [(a, b), ...]) with m Gauss-Legendre points each, one full pass per point."""
    tok, layout = lm.tokenizer, lm.layout
    ids = list(tok(text)["input_ids"])
    pos = ids.index(tok.mask_token_id) if lm.kind == "masked" else len(ids) - 1
    x = torch.tensor([ids])
    target = answer_ids[0]

    def prob_and_grad(layer, point):
        def put(l, a):
            a = a.clone()
            a[0, pos] = point
            return a

        with torch.enable_grad(), ActivationPatch(layout, put, [layer]):
            prob = lm.model(input_ids=x).logits[0, pos].softmax(-1)[target]
            (grad,) = torch.autograd.grad(prob, point)
        return float(prob.detach()), grad

    scores, p_zero = [], []
    for layer in range(layout.layers):
        seen = {}
        with torch.no_grad(), ActivationPatch(layout, lambda l, a: seen.__setitem__(l, a[0, pos].clone()), [layer]):
            lm.model(input_ids=x)
        w = seen[layer]
        total = torch.zeros_like(w)
        for (a, b), m in panels_of(layer):
            nodes, weights = gauss_legendre(m)
            for node, weight in zip(nodes, weights):
                point = ((a + (b - a) * node) * w).clone().requires_grad_(True)
                total += (b - a) * weight * prob_and_grad(layer, point)[1]
        scores.append((w * total).numpy())
        p_zero.append(prob_and_grad(layer, torch.zeros_like(w).requires_grad_(True))[0])
    return np.stack(scores), np.array(p_zero)


def one_panel(m):
    return lambda layer: [((0.0, 1.0), m)]


@pytest.mark.parametrize("m", range(1, 9))
def test_gauss_legendre_is_exact_for_polynomials_up_to_degree_2m_minus_1(m):
    nodes, weights = gauss_legendre(m)
    assert len(nodes) == m and all(0 < x < 1 for x in nodes) and math.fsum(weights) == pytest.approx(1, abs=1e-15)
    for degree in range(2 * m):
        assert math.fsum(w * x ** degree for x, w in zip(nodes, weights)) == pytest.approx(1 / (degree + 1),
                                                                                           rel=1e-13)
    # and not beyond: x^(2m) has the textbook error (m!)^4 / ((2m + 1) ((2m)!)^2) on [0, 1]
    error = 1 / (2 * m + 1) - math.fsum(w * x ** (2 * m) for x, w in zip(nodes, weights))
    assert error == pytest.approx(math.factorial(m) ** 4 / ((2 * m + 1) * math.factorial(2 * m) ** 2), rel=1e-6)


@pytest.mark.parametrize("family,text,answer", CASES)
def test_gauss_matches_reference(family, text, answer, monkeypatch):
    """Every layer on m Gauss points (no flagged layer, a tolerance nothing fails): the scores of the rule."""
    lm = tiny64(family)
    monkeypatch.setattr(attribution, "dense_layers", lambda lm, params: ())
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(quadrature="gauss", steps=3, tolerance=1.0), answer_ids=ids)
    ref, p_zero = reference(lm, text, ids, one_panel(3))
    assert np.abs(ours.scores - ref).max() <= 1e-6 * np.abs(ref).max()
    for row, pz in zip(ours.completeness, p_zero):
        assert row["delta"] == pytest.approx(ours.prob - pz, rel=1e-9, abs=1e-12) and row["points"] == 4  # + alpha 0


def test_flagged_layers_go_on_the_dense_grid_and_match_reference():
    """Layers holding a massive neuron (neurons.flag_massive on the neutral sentences) get DENSE_PANELS panels."""
    lm = tiny64("gpt2")
    fc = lm.model.transformer.h[1].mlp.c_fc  # neuron 7 of layer 1 fires 50 (~300x its layer) on every input
    with torch.no_grad():
        fc.weight[:, 7], fc.bias[7] = 0.0, 50.0
    params = AttributionParams(quadrature="gauss", steps=2, tolerance=1.0)
    dense = attribution.dense_layers(lm, params)
    assert dense == (1,)
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    ours = attribute(lm, text, params, answer_ids=ids)

    def panels_of(layer):
        if layer in dense:
            return [((k / DENSE_PANELS, (k + 1) / DENSE_PANELS), 2) for k in range(DENSE_PANELS)]
        return [((0.0, 1.0), 2)]

    ref, _ = reference(lm, text, ids, panels_of)
    assert np.abs(ours.scores - ref).max() <= 1e-6 * np.abs(ref).max()
    points = [row["points"] for row in ours.completeness]
    for layer in range(lm.layout.layers):  # Gauss points and the panels' ends but alpha = 1 (the clean run)
        assert points[layer] == (DENSE_PANELS * 2 + DENSE_PANELS if layer in dense else 3)


def test_a_layer_above_the_tolerance_is_redone_on_the_dense_grid(monkeypatch):
    """gauss: one Gauss point cannot integrate these layers within 1e-6, so every layer goes dense, once."""
    lm = tiny64("gpt2")
    monkeypatch.setattr(attribution, "dense_layers", lambda lm, params: ())
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    ours = attribute(lm, text, AttributionParams(quadrature="gauss", steps=1, tolerance=1e-6), answer_ids=ids)
    ref, _ = reference(lm, text, ids, lambda layer: [((k / DENSE_PANELS, (k + 1) / DENSE_PANELS), 1)
                                                      for k in range(DENSE_PANELS)])
    assert np.abs(ours.scores - ref).max() <= 1e-6 * np.abs(ref).max()
    assert all(row["points"] == 2 + DENSE_PANELS + DENSE_PANELS - 1 for row in ours.completeness)


def completeness_error(row, prob):
    return abs(row["sum"] - row["delta"]) / max(prob, abs(row["delta"]))


@pytest.mark.parametrize("family,text,answer", CASES)
@pytest.mark.parametrize("tolerance", [1e-2, 1e-4])
def test_auto_honours_its_tolerance(family, text, answer, tolerance):
    lm = tiny64(family)
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(quadrature="auto", steps=2, tolerance=tolerance), answer_ids=ids)
    for row in ours.completeness:
        assert row["error"] == pytest.approx(completeness_error(row, ours.prob), rel=1e-6, abs=1e-12)
        assert row["within_tolerance"] and row["error"] <= tolerance
    # and the scores are those of an accurate integral (64 panels of 4 points), not only their sums
    accurate, _ = reference(lm, text, ids, lambda layer: [((k / 64, (k + 1) / 64), 4) for k in range(64)])
    assert np.abs(ours.scores - accurate).max() <= 20 * tolerance * np.abs(accurate).max()


def test_auto_spends_points_only_where_the_tolerance_needs_them(monkeypatch):
    lm = tiny64("gpt2")
    monkeypatch.setattr(attribution, "dense_layers", lambda lm, params: ())
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    loose, tight = (attribute(lm, text, AttributionParams(quadrature="auto", steps=1, tolerance=tol), answer_ids=ids)
                    for tol in (0.5, 1e-7))
    assert all(row["points"] == 2 for row in loose.completeness)  # one Gauss point and alpha = 0 were enough
    assert all(row["points"] > 2 for row in tight.completeness)
    # one Gauss point per panel is poor, so at 1e-7 the panels reach the narrowest width, and the layer says so
    narrowest = round(1 / MIN_WIDTH)  # panels at the narrowest width, each with its point and its end
    assert max(row["points"] for row in tight.completeness) <= 4 * narrowest
    assert all(row["within_tolerance"] == (row["error"] <= 1e-7) for row in tight.completeness)


def test_riemann_is_unchanged_bitwise():
    """The default is today's paper mode: the same alphas, sums and order of operations as before (pinned here
    by rebuilding the sum from Runner.patched), and the same stored params and completeness rows."""
    lm = make_tiny("gpt2")  # float32, as users run it
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    ours = attribute(lm, text, AttributionParams(), answer_ids=ids)
    prompt = attribution._prompt_parts(lm, text, AttributionParams(), ids)
    runner = Runner(lm, prompt[3][0])
    alphas = [k / 20 for k in range(1, 21)]
    expected = torch.empty_like(runner.acts)
    for group in plan_passes(lm, AttributionParams(), 1, 21):
        grads, _ = runner.patched(group, alphas + [0.0])
        a, b = group[0].start, group[-1].stop
        expected[a:b] = runner.acts[a:b] * grads[:, None][:, :, :20].sum(2).transpose(0, 1)[0] / 20
    assert np.array_equal(ours.scores, expected.numpy())
    assert AttributionParams().to_dict() == {"steps": 20, "rule": "right", "method": "ig", "multi_token": "mean",
                                             "layers_per_pass": None, "passes_per_backward": None,
                                             "memory_budget_mb": None, "seed": 0, "share_prompts": None}
    assert set(ours.completeness[0]) == {"layer", "sum", "delta", "ratio"}


@pytest.mark.parametrize("quadrature", ["gauss", "auto"])
def test_pass_plans_and_shared_prompts_do_not_change_scores(quadrature):
    lm = tiny64("bert")
    texts = ["The capital of France is [MASK] .", "France has its capital in the old city of [MASK] , they say ."]
    prompts = [type("P", (), {"text": t, "answer_ids": tuple(encode_answer(lm, t, "Paris")), "answer": "Paris"})()
               for t in texts]
    base = attribute_fact(lm, prompts, AttributionParams(quadrature=quadrature, steps=2, tolerance=1e-3,
                                                         share_prompts=False))
    for params in (AttributionParams(quadrature=quadrature, steps=2, tolerance=1e-3, layers_per_pass=1,
                                     share_prompts=False),
                   AttributionParams(quadrature=quadrature, steps=2, tolerance=1e-3, share_prompts=True)):
        other = attribute_fact(lm, prompts, params)
        for a, b in zip(base, other):
            if params.share_prompts:  # shared rows are the union of both prompts' refinements: at least as good
                assert all(r["error"] <= 1e-3 for r in b.completeness)
                np.testing.assert_allclose(a.scores, b.scores, atol=2e-2 * np.abs(a.scores).max())
            else:
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-12)


def test_progress_ends_at_one_and_cancel_stops_between_rounds():
    lm = tiny64("gpt2")
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    fractions, chunks = [], []
    attribute(lm, text, AttributionParams(quadrature="auto", steps=1, tolerance=1e-5),
              task=Task(on_progress=lambda f, message: fractions.append(f), on_partial=chunks.append), answer_ids=ids)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert sorted(l for c in chunks for l in range(*c["layers"])) == list(range(lm.layout.layers))
    # at 1e-4 layers finish in different rounds, so the first progress comes with rounds still to run
    fractions.clear()
    attribute(lm, text, AttributionParams(quadrature="auto", steps=1, tolerance=1e-4),
              task=Task(on_progress=lambda f, message: fractions.append(f)), answer_ids=ids)
    assert fractions[0] < 1
    token = Task()
    with pytest.raises(Cancelled):
        attribute(lm, text, AttributionParams(quadrature="auto", steps=1, tolerance=1e-4),
                  task=token.relay(on_progress=lambda f, message: token.cancel()), answer_ids=ids)


def test_params_are_validated_in_one_line_and_stored():
    gauss = AttributionParams(quadrature="gauss")
    assert gauss.steps == 4 and AttributionParams().steps == 20 and AttributionParams(quadrature="auto").steps == 3
    assert gauss.to_dict()["quadrature"] == "gauss" and gauss.to_dict()["tolerance"] == 0.01
    for bad, needle in [(dict(quadrature="simpson"), "quadrature = 'simpson'"),
                        (dict(quadrature="GAUSS"), "quadrature"),
                        (dict(quadrature="auto", tolerance=0), "tolerance = 0"),
                        (dict(quadrature="auto", tolerance=1.5), "tolerance = 1.5"),
                        (dict(quadrature="auto", tolerance=float("nan")), "tolerance = nan"),
                        (dict(quadrature="auto", tolerance="0.1"), "tolerance = '0.1'"),
                        (dict(quadrature="gauss", rule="left"), "Riemann sum only"),
                        (dict(quadrature="gauss", steps=0), "steps = 0")]:
        with pytest.raises(ValidationError) as info:
            AttributionParams(**bad)
        assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    lm = make_tiny("gpt2")
    folder = tmp_path_factory.mktemp("gpt2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_option_is_used_and_stored_with_the_run(capsys, saved_gpt2, tmp_path):
    from kn_core.store import open_project

    project = tmp_path / "q.knproj"
    code = main(["attribute", "--prompt", "The capital of France is", "--answer", " Paris", "--model", saved_gpt2,
                 "--quadrature", "auto", "--tolerance", "0.001", "--json", "--project", str(project)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["params"]["quadrature"] == "auto" and doc["params"]["steps"] == 3
    assert all(row["within_tolerance"] for row in doc["completeness"])
    with open_project(project, read_only=True) as p:
        (run,) = p.list_runs()
        assert run.params["quadrature"] == "auto" and run.params["tolerance"] == 0.001
        assert [row["points"] for row in p.get_run(run.id).prompts[0].completeness] == \
            [row["points"] for row in doc["completeness"]]


@pytest.mark.parametrize("argv,needle", [
    (["--quadrature", "simpson"], "invalid choice: 'simpson'"),
    (["--quadrature", "auto", "--tolerance", "0"], "--tolerance = 0.0"),
    (["--quadrature", "gauss", "--rule", "left"], "Riemann sum only"),
])
def test_cli_refuses_bad_options_in_one_line_before_loading(capsys, argv, needle):
    code = main(["attribute", "--prompt", "The capital of France is", "--answer", " Paris", "--model",
                 "/nonexistent/model/folder", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_gui_attribution_panel_passes_the_quadrature(qtbot):
    pytest.importorskip("pytestqt")
    from kn_core.facts import FactSet
    from kn_gui.panels.attribution_panel import AttributionPanel
    from kn_gui.session import Session

    panel = AttributionPanel(Session(FactSet("empty", {}, [])))
    qtbot.addWidget(panel)
    assert panel.params() == AttributionParams()  # the paper's mode by default
    panel.quadrature.setCurrentText("auto")
    assert panel.params() == AttributionParams(quadrature="auto") and panel.params().steps == 3
    assert not panel.rule.isEnabled()
    panel.steps.setValue(6)
    panel.quadrature.setCurrentText("riemann")  # a chosen number of points stays
    assert panel.params() == AttributionParams(steps=6) and panel.rule.isEnabled()


def test_cli_says_which_layers_stayed_above_the_tolerance(capsys, saved_gpt2):
    """gauss with one point cannot reach 1e-9 even on the dense grid: the layers are named, the scores kept."""
    code = main(["attribute", "--prompt", "The capital of France is", "--answer", " Paris", "--model", saved_gpt2,
                 "--quadrature", "gauss", "--steps", "1", "--tolerance", "1e-9"])
    out = capsys.readouterr().out
    assert code == 0 and "completeness error above --tolerance 1e-09 in L0, L1, L2" in out and "coarse neurons" in out
