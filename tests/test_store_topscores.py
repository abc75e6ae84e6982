"""Compact ("top") score storage (issue 16 section 2): coarse and refined neurons from the stored top scores equal
those from the full arrays (a slow pure-Python reference and kn_core.neurons) for every t >= the floor with up to
`guard` excluded neurons, and otherwise either equal them or refuse in one line; never a silently smaller set."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kn_core import neurons
from kn_core.store import ProjectDataError, ScoresTooCoarseError, TopScores, create_project, open_project
from kn_core.store import topscores

MODEL = {"source": "default", "sha256": "a" * 64, "dtype": "float32", "family": "llama", "kind": "causal",
         "layers": 6, "neurons": 40}


def slow_coarse(scores: np.ndarray, t: float, exclude=()) -> list:
    """The paper's rule written out element by element: > t x the maximum over the non-excluded neurons."""
    skip = {(int(a), int(b)) for a, b in exclude}
    cells = [(layer, i, float(scores[layer, i])) for layer in range(scores.shape[0])
             for i in range(scores.shape[1]) if (layer, i) not in skip]
    top = max((v for _, _, v in cells), default=-math.inf)
    if not (top > 0 and math.isfinite(top)):
        return []
    return sorted((layer, i) for layer, i, v in cells if v > t * top)


def sample(rng, shape=(6, 40), kind="heavy") -> np.ndarray:
    x = rng.standard_t(2, size=shape) * 1e-3
    if kind == "massive":  # a few huge scores, as the massive-activation neurons of layer 0 give
        x[0, :3] = [5.0, 3.0, 2.0]
    elif kind == "negative":
        x = -np.abs(x)
    elif kind == "few_positive":
        x = -np.abs(x)
        x[1, 2], x[3, 4] = 1e-3, 2e-3
    elif kind == "ties":
        x = np.round(x * 1e3) / 1e3
    return x.astype(np.float32)


KINDS = ["heavy", "massive", "negative", "few_positive", "ties"]


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(KINDS), floor=st.sampled_from([0.05, 0.1, 0.3]),
       guard=st.integers(0, 6), t=st.floats(0.0, 1.0), n_excluded=st.integers(0, 8), top_first=st.booleans())
@example(seed=0, kind="heavy", floor=0.05, guard=0, t=0.9999999999999999, n_excluded=0, top_first=False)
def test_top_scores_are_exact_or_refuse(seed, kind, floor, guard, t, n_excluded, top_first):
    rng = np.random.default_rng(seed)
    full = sample(rng, kind=kind)
    flat_order = np.argsort(full.ravel())[::-1] if top_first else rng.permutation(full.size)
    exclude = [divmod(int(i), full.shape[1]) for i in flat_order[:n_excluded]]
    top = TopScores.compress(full, floor, guard)
    decoded = topscores.decode_top(__import__("zlib").decompress(topscores.encode_top(top)[0]), full.shape)
    expected = slow_coarse(full, t, exclude)
    assert expected == sorted(neurons.coarse_neurons(full, t, exclude))
    if t >= floor and n_excluded <= guard:  # the documented guarantee: always exact
        assert sorted(decoded.coarse(t, exclude)) == expected
    else:
        try:
            got = decoded.coarse(t, exclude)
        except ScoresTooCoarseError as exc:
            assert "\n" not in str(exc) and f"t={t}" in str(exc)
        else:
            assert sorted(got) == expected


def test_below_the_floor_is_refused_not_shrunk():
    full = sample(np.random.default_rng(3))
    top = TopScores.compress(full, floor=0.2, guard=2)
    assert len(top.indices) < full.size
    with pytest.raises(ScoresTooCoarseError, match=r"t=0.01 is below"):
        top.coarse(0.01)  # the full set at t=0.01 holds scores that were not stored


def test_keep_all_is_exact_everywhere_and_nan_is_never_compressed():
    full = sample(np.random.default_rng(4))
    assert TopScores.keep_all(full).coarse(0.0) == neurons.coarse_neurons(full, 0.0)
    full[2, 3] = np.nan
    assert TopScores.compress(full).exact_everywhere


def _project_with(path, form, results, **storage):
    with create_project(path) as p:
        p.set_score_storage(form, **storage)
        fact = p.add_fact({"relation": "P1", "subject": "s", "object": "o"})
        run = p.start_run(fact=fact, prompts=[f"prompt {k}" for k in range(len(results))], params={"t": 1},
                          model=MODEL)
        for k, scores in enumerate(results):
            p.add_prompt_result(run, k, scores=scores, activations=scores * 2, prob=0.5)
        p.finish_run(run)
    return run


@pytest.mark.parametrize("t,p", [(0.1, 0.7), (0.2, 0.7), (0.2, 0.3), (0.5, 0.5), (0.9, 0.1)])
def test_refined_neurons_from_a_top_project_equal_the_full_arrays(tmp_path, t, p):
    rng = np.random.default_rng(5)
    results = [sample(rng, kind=k) for k in ("heavy", "heavy", "massive", "ties", "heavy", "heavy", "heavy")]
    run = _project_with(tmp_path / "top.knproj", "top", results, floor=0.1, guard=4)
    exclude = [(0, 0), (0, 1)]  # flagged neurons that set the maximum in one prompt
    with open_project(tmp_path / "top.knproj", read_only=True) as proj:
        assert proj.score_storage() == {"form": "top", "floor": 0.1, "guard": 4}
        tops = list(proj.load_top_scores(run).values())
        assert all(not top.exact_everywhere for top in tops)
        for excluded in ((), exclude):
            assert topscores.refined_neurons(tops, t, p, excluded) == neurons.refined_neurons(results, t, p, excluded)
        with pytest.raises(ProjectDataError, match="stores only its top scores"):
            proj.load_array(run, 0)
        acts = proj.load_scores(run, "activations")  # other arrays: float16 in a compact project
        assert acts[0].dtype == np.float16 and np.allclose(acts[0], results[0] * 2, rtol=2e-3, atol=1e-6)
        assert proj.check_integrity() == []


def test_full_project_reads_as_top_scores_exact_for_any_t(tmp_path):
    rng = np.random.default_rng(6)
    results = [sample(rng) for _ in range(4)]
    run = _project_with(tmp_path / "full.knproj", "full", results)
    with open_project(tmp_path / "full.knproj", read_only=True) as proj:
        tops = list(proj.load_top_scores(run).values())
        assert topscores.refined_neurons(tops, 0.01, 0.5) == neurons.refined_neurons(results, 0.01, 0.5)
        assert proj.load_array(run, 1).tobytes() == results[1].tobytes()


def test_damaged_top_scores_fail_their_crc(tmp_path):
    import sqlite3

    path = tmp_path / "top.knproj"
    run = _project_with(path, "top", [sample(np.random.default_rng(7))])
    con = sqlite3.connect(path)
    blob = bytearray(con.execute("SELECT data FROM score_arrays WHERE name='scores'").fetchone()[0])
    blob[len(blob) // 2] ^= 0xFF
    con.execute("UPDATE score_arrays SET data=? WHERE name='scores'", (bytes(blob),))
    con.commit()
    con.close()
    with open_project(path, read_only=True) as proj:
        with pytest.raises(Exception, match="CRC-32"):
            proj.load_top_scores(run)
        assert any("CRC-32" in problem for problem in proj.check_integrity())


@pytest.mark.parametrize("kwargs,match", [({"form": "zip"}, "unknown score storage"),
                                          ({"form": "top", "floor": 0.0}, "floor"),
                                          ({"form": "top", "floor": float("nan")}, "floor"),
                                          ({"form": "top", "guard": -1}, "guard")])
def test_bad_storage_settings_are_refused(tmp_path, kwargs, match):
    with create_project(tmp_path / "p.knproj") as p:
        with pytest.raises(ProjectDataError, match=match):
            p.set_score_storage(**kwargs)
        assert p.score_storage()["form"] == "full"


def test_export_writes_top_scores_as_npz(tmp_path):
    from kn_core.store import export_project

    full = sample(np.random.default_rng(8), kind="massive")
    run = _project_with(tmp_path / "top.knproj", "top", [full], floor=0.1, guard=2)
    export_project(tmp_path / "top.knproj", tmp_path / "out", with_arrays=True)
    saved = np.load(tmp_path / "out" / "arrays" / f"run{run}_p0_scores.top.npz")
    dense = np.full(full.size, -np.inf, dtype=np.float32)
    dense[saved["indices"]] = saved["values"]
    assert neurons.coarse_neurons(dense.reshape(full.shape), 0.2) == neurons.coarse_neurons(full, 0.2)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_at_the_floor_with_the_top_guard_neurons_excluded(kind):
    """The edge of the guarantee: t equal to the floor, and the `guard` largest scores excluded."""
    for seed in range(40):
        full = sample(np.random.default_rng(seed), kind=kind)
        for guard in (0, 3):
            top = TopScores.compress(full, 0.1, guard)
            exclude = [divmod(int(i), full.shape[1]) for i in np.argsort(full.ravel())[::-1][:guard]]
            assert sorted(top.coarse(0.1, exclude)) == slow_coarse(full, 0.1, exclude)


def test_listed_records_do_not_share_their_dicts(tmp_path):
    """Listing decodes each distinct JSON text once (fast for 27,600 runs); no two records may share a dict."""
    run = _project_with(tmp_path / "p.knproj", "full", [sample(np.random.default_rng(9))])
    with open_project(tmp_path / "p.knproj") as proj:
        proj.start_run(fact=1, prompts=["x"], params={"t": 1}, model=MODEL)
        proj.add_neuron_set("refined", [(1, 2)], {"t": 0.2}, fact=1, run_ids=[run])
        proj.add_neuron_set("refined", [(1, 3)], {"t": 0.2}, fact=1, run_ids=[run])
        first, second = proj.list_runs()
        assert first.params == second.params == {"t": 1} and first.params is not second.params
        first.params["t"] = 99
        assert proj.list_runs()[1].params == {"t": 1}
        a, b = proj.list_neuron_sets()
        assert a.params == b.params and a.params is not b.params and (a.neurons, b.neurons) == (((1, 2),), ((1, 3),))
        assert proj.list_facts()[0].info == {}
