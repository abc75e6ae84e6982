"""Localisation vs editing (Hase et al. 2023, "Does localization inform editing?"), an optional section of
`kn reproduce --trace`: does where causal tracing puts a fact say where its knowledge neurons are, or which
layers' neurons are worth editing?

Per fact (its first prompt is traced; the rules were fixed before any run):
- tracing: the MLP-output trace (kn_core.tracing: ROME's 10 samples and noise of 3x the subject embeddings'
  standard deviation over the run's subjects; one layer restored at a time, where ROME's figures restore a window
  of 10 layers around each, `kn trace --window 10`) at the last subject token, where ROME finds the MLP's effect:
  its peak layer, and its mean indirect effect in each band of layers (thirds of the depth);
- knowledge neurons: the layers of the fact's refined neurons (their mean), as the reproduction found them;
- editing by band: the fact's `EDIT_NEURONS` highest-scoring neurons (attribution summed over its prompts, flagged
  neurons left out as in the rest of the report) inside each band suppressed (to zero, answer position), and the
  relative change of p(answer) on the fact's prompts. The same count in every band, so bands compare.
Across facts: Spearman's rho (average ranks for ties) with a seeded permutation p-value, between tracing's peak
layer and the neurons' mean layer, and between a band's tracing effect and its edit's drop ((fact, band) pairs,
Hase et al.'s question); and how often the band where tracing is strongest is the band whose edit hurts most
(chance: 1 in 3). With fewer than `MIN_N` points a correlation is printed with a note that it means nothing.
"""

from __future__ import annotations

import numpy as np

from .. import experiments as ex
from ..evaluation import answer_probabilities
from ..edits import Suppress
from ..tasks import Task, as_task
from ..tracing import TraceParams, embedding_std, trace

BANDS = 3  # thirds of the depth: early, middle, late
EDIT_NEURONS = 5  # neurons suppressed per band: the top of the paper's 2-5 refined neurons per fact
MIN_N = 10  # fewer points than this: a rank correlation is noise
PERMUTATIONS = 10_000


def bands(layers: int, n: int = BANDS) -> list[range]:
    edges = np.linspace(0, layers, n + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):  # ties share their average rank
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y, seed: int = 0) -> dict:
    """Spearman's rho, a two-sided permutation p-value, n, and a note when n is too small to mean anything."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    out = {"n": n, "rho": None, "p_value": None}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        out["note"] = f"n = {n}" + (" with a constant variable" if n >= 3 else "") + ": no correlation to compute"
        return out
    rx, ry = _ranks(x), _ranks(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perms = np.array([np.corrcoef(rx, rng.permutation(ry))[0, 1] for _ in range(PERMUTATIONS)])
    out.update(rho=rho, p_value=float((np.sum(np.abs(perms) >= abs(rho) - 1e-12) + 1) / (PERMUTATIONS + 1)))
    if n < MIN_N:
        out["note"] = f"n = {n} < {MIN_N}: too few points for a rank correlation to mean anything"
    return out


def _band_drop(lm, prompts, neurons, before: float) -> float | None:
    if not neurons:
        return None
    handle = Suppress(tuple(neurons)).apply(lm)
    try:
        after = float(np.mean([r["prob"] for r in answer_probabilities(lm, prompts)]))
    finally:
        handle.revert()
    return (after - before) / before if before > 0 else None


def _top_in_band(scores: np.ndarray, band: range, exclude: set) -> list[tuple[int, int]]:
    picked = []
    for flat in np.argsort(-scores[band.start:band.stop], axis=None):
        layer, index = np.unravel_index(int(flat), scores[band.start:band.stop].shape)
        neuron = (band.start + int(layer), int(index))
        if neuron not in exclude and scores[neuron] > 0:
            picked.append(neuron)
        if len(picked) == EDIT_NEURONS:
            break
    return picked


def _fact_row(lm, record, scores, exclude, params, noise_scale, layer_bands, task) -> dict:
    prompt = record.prompts[0]
    result = trace(lm, prompt.text, record.fact.subject, prompt.answer_ids, params, noise_scale, task)
    effect = result.effect("mlp")[result.last_subject_token()]
    before = float(np.mean([r["prob"] for r in answer_probabilities(lm, record.prompts)]))
    edits = [_top_in_band(scores, band, exclude) for band in layer_bands]
    layers = [int(layer) for layer, _ in record.neurons]
    return {
        "relation": record.relation, "subject": record.fact.subject, "object": record.fact.object,
        "traced_prompt": prompt.text, "p_clean": result.p_clean, "p_corrupted": result.p_corrupted,
        "peak_layer": result.peak_layer("mlp"), "peak_effect": float(effect.max()),
        "trace_effect_by_band": [float(effect[band.start:band.stop].mean()) for band in layer_bands],
        "neuron_layers": layers, "mean_neuron_layer": float(np.mean(layers)) if layers else None,
        "p_before": before, "edited_neurons_by_band": [[list(n) for n in e] for e in edits],
        "edit_change_by_band": [_band_drop(lm, record.prompts, e, before) for e in edits],
    }


def localisation_experiment(lm, records, ig: dict, exclude=(), seed: int = 0, task: Task | None = None) -> dict:
    """The section's numbers (see the module notes). `records`: the reproduction's FactNeurons; `ig`: each fact's
    attribution results (with `.scores` [layers, neurons]); `exclude`: flagged neurons never edited."""
    task = as_task(task)
    params = TraceParams(kinds=("mlp",), seed=seed)
    noise_scale = embedding_std(lm, [r.fact.subject for r in records]) if records else (0.0, 0)
    layer_bands = bands(lm.layout.layers)
    exclude = {tuple(n) for n in exclude}
    facts, left_out = [], []
    for i, record in enumerate(records):
        task.check()
        scores = sum(s.scores for s in ig[record.fact])
        try:
            facts.append(_fact_row(lm, record, scores, exclude, params, noise_scale, layer_bands,
                                   task.slice(i / len(records), (i + 1) / len(records))))
        except ValueError as exc:  # e.g. the subject is not written in the prompt as in the fact
            left_out.append({"relation": record.relation, "subject": record.fact.subject, "reason": str(exc)})
    return summarise(facts, layer_bands, params, noise_scale, left_out, seed)


def summarise(facts: list[dict], layer_bands: list[range], params: TraceParams, noise_scale, left_out,
              seed: int = 0) -> dict:
    with_neurons = [f for f in facts if f["mean_neuron_layer"] is not None]
    pairs = [(f["trace_effect_by_band"][b], -f["edit_change_by_band"][b]) for f in facts
             for b in range(len(layer_bands)) if f["edit_change_by_band"][b] is not None]
    agree = [int(np.argmax(f["trace_effect_by_band"])) == int(np.argmin(f["edit_change_by_band"]))
             for f in facts if all(c is not None for c in f["edit_change_by_band"])]
    relations = {}
    for f in facts:
        relations.setdefault(f["relation"], []).append(f)
    return {
        "method": "Hase et al. (2023): causal tracing (MLP output, last subject token) vs knowledge neurons' layers "
                  "vs suppressing the fact's top neurons per band of layers",
        "params": {**params.to_dict(), "bands": [[b.start, b.stop - 1] for b in layer_bands],
                   "edit_neurons_per_band": EDIT_NEURONS, "edit": "suppress to zero at the answer position",
                   "embedding_std": noise_scale[0], "embedding_std_tokens": noise_scale[1]},
        "facts": facts, "left_out": left_out,
        "peak_vs_neuron_layer": spearman([f["peak_layer"] for f in with_neurons],
                                         [f["mean_neuron_layer"] for f in with_neurons], seed),
        "trace_effect_vs_edit_drop": spearman([a for a, _ in pairs], [b for _, b in pairs], seed),
        "strongest_band_agrees": {"facts": len(agree), "agree": int(sum(agree)), "chance": 1 / len(layer_bands)},
        "by_relation": {rid: {"facts": len(fs), "mean_peak_layer": float(np.mean([f["peak_layer"] for f in fs])),
                              "mean_neuron_layer": _mean([f["mean_neuron_layer"] for f in fs]),
                              "mean_edit_change_by_band": [_mean([f["edit_change_by_band"][b] for f in fs])
                                                           for b in range(len(layer_bands))]}
                        for rid, fs in relations.items()},
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _corr_text(c: dict) -> str:
    if c["rho"] is None:
        return c.get("note", "n/a")
    text = f"rho {c['rho']:+.2f} (n = {c['n']}, permutation p = {c['p_value']:.3f})"
    return text + (f"; {c['note']}" if c.get("note") else "")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def localisation_markdown(report: dict) -> list[str]:
    sec = report.get("localisation")
    if not sec:
        return []
    params, bands_ = sec["params"], sec["params"]["bands"]
    names = [f"L{a}-{b}" for a, b in bands_]
    lines = ["## Localisation vs editing (Hase et al. 2023)", "",
             f"Causal tracing (Meng et al. 2022) of each fact's first prompt: MLP outputs restored one layer at a "
             f"time at the last subject token ({params['samples']} noise samples, {params['noise']:g}x the subject "
             f"embeddings' standard deviation {params['embedding_std']:.4g}, seed {params['seed']}); the peak layer "
             f"is where restoring helps most. Editing: the fact's {params['edit_neurons_per_band']} highest-scoring "
             f"neurons in each band of layers suppressed ({params['edit']}); the change of p(answer) over the "
             f"fact's prompts. Hase et al. found that where tracing localises a fact does not predict which "
             f"layer's edit works best.", "",
             "| relation | subject | known | p clean | p corrupted | MLP peak layer | neurons' layers | "
             + " | ".join(f"trace {n}" for n in names) + " | " + " | ".join(f"suppress {n}" for n in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * (2 * len(names))]
    by_label = ex.known_by_label(report.get("fact_answers"))
    known = [by_label.get(ex.fact_label(f["relation"], f["subject"])) for f in sec["facts"]]
    for f, is_known in zip(sec["facts"], known):
        shown = "-" if is_known is None else "yes" if is_known else "no"
        lines.append(f"| {f['relation']} | {f['subject']} | {shown} | {f['p_clean']:.3f} | {f['p_corrupted']:.3f} | "
                     f"{f['peak_layer']} ({f['peak_effect']:+.3f}) | "
                     f"{', '.join(map(str, f['neuron_layers'])) or '-'} | "
                     + " | ".join(f"{e:+.3f}" for e in f["trace_effect_by_band"]) + " | "
                     + " | ".join(_pct(c) for c in f["edit_change_by_band"]) + " |")
    agree = sec["strongest_band_agrees"]
    lines += ["", "- Tracing's peak layer vs the knowledge neurons' mean layer: "
                  f"{_corr_text(sec['peak_vs_neuron_layer'])}.",
              f"- A band's tracing effect vs the drop its edit causes ((fact, band) pairs): "
              f"{_corr_text(sec['trace_effect_vs_edit_drop'])}.",
              f"- The band where tracing is strongest is the band whose edit lowers p(answer) most for "
              f"{agree['agree']} of {agree['facts']} facts (chance {agree['chance']:.0%}).",
              f"- Known facts among them: "
              f"{sum(k is True for k in known)} of {len(sec['facts'])}; "
              "the correlations above are over all of them, known and unknown together."]
    lines += [f"- Left out: {x['relation']} {x['subject']}: {x['reason']}" for x in sec["left_out"]]
    return lines + [""]
