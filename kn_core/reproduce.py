"""`kn reproduce`: the paper's experiments with controls on any model and fact set, written as report.json,
report.md (tables beside the paper's numbers) and PNG figures. The command line is kn_core/cli/reproduce.py.

Pipeline of `run_reproduce`:
1. pick relations and facts (by default the facts the model answers best: knowledge neurons of a fact the
   model does not know mean little; `--select random` takes a seeded random sample instead);
2. integrated-gradients attribution of every prompt (cached under OUT/cache, so a re-run or an interrupted
   run resumes), and the activation baseline;
3. refined neurons per fact, with p adapted per relation as in the paper (separately for the baseline with
   its threshold 0.5);
4. neuron statistics, activation by prompt, suppress/amplify with controls, update, erase;
5. report.json, report.md, figures.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import evaluation as ev
from . import experiments as ex
from .jsonio import dumps
from .tasks import Task, as_task

PAPER = {
    "model": "bert-base-cased on PARAREL (34 relations, 27,738 facts)",
    "mean_neurons_per_fact": 4.13, "shared_intra_relation": 1.23, "shared_inter_relation": 0.09,
    "suppress": -0.2903, "suppress_baseline": -0.0147, "amplify": 0.3117, "amplify_baseline": -0.0127,
    "activation_expressing": 0.485, "activation_subject_only": 0.019, "activation_random": -0.018,
    "update_change_rate": 0.485, "update_success_rate": 0.344, "update_ppl_intra": 8.4, "update_ppl_inter": 7.2,
    "update_random_change_rate": 0.047, "update_random_success_rate": 0.0,
    "erase_ppl_increase": "+36% to +141% (P19 1450 -> 2996, P106 2279 -> 5202)", "erase_other": "+1% to +10%",
    "seconds_per_fact": "about 13 s per fact (9 prompts) on a V100",
}


def _versions() -> dict:
    from .store import library_versions

    return {**library_versions(), "platform": platform.platform()}


# --------------------------------------------------------------------------------------------------------
# Attribution with a cache
# --------------------------------------------------------------------------------------------------------

@dataclass
class _Scores:
    scores: np.ndarray
    activations: np.ndarray
    prob: float


def _attribute_cached(lm, prompt, params, cache: Path | None, task: Task | None = None) -> _Scores:
    from .attribution import attribute

    scoring = {k: v for k, v in params.to_dict().items() if k != "share_prompts"}  # sharing never changes scores
    key = hashlib.sha256(json.dumps([lm.sha256, prompt.text, list(prompt.answer_ids), scoring],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.exists():
        with np.load(path) as data:
            return _Scores(data["scores"], data["activations"], float(data["prob"]))
    result = attribute(lm, prompt, params, task=task)
    out = _Scores(result.scores, result.activations, result.prob)
    if path is not None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, scores=out.scores, activations=out.activations, prob=np.float64(out.prob))
        tmp.replace(path)
    return out


def select_facts(lm, factset, relations, facts_per_relation: int, select: str, seed: int, min_prompts: int = 3,
                 prompts_per_fact: int | None = None) -> tuple[dict, list[dict]]:
    """{relation: [(fact, prompts)]} and the reasons facts or relations were left out."""
    from .facts import render_prompts

    rng = np.random.default_rng(seed)
    chosen, notes = {}, []
    for rid in relations:
        relation = factset.relation(rid)
        candidates = []
        for fact in factset.facts_of(rid):
            prompts, _ = render_prompts(fact, relation, lm.tokenizer, lm.kind)
            if prompts_per_fact:
                prompts = prompts[:prompts_per_fact]
            if len(prompts) >= min_prompts:
                candidates.append((fact, prompts))
        if not candidates:
            notes.append({"relation": rid, "reason": f"no fact has {min_prompts} usable prompts for a {lm.kind} model "
                                                     f"(refinement needs at least 3)"})
            continue
        if select == "known":
            probs = ev.answer_probabilities(lm, [p for _, ps in candidates for p in ps], batch_size=32)
            at, ranked = 0, []
            for k, (fact, ps) in enumerate(candidates):
                rows = probs[at:at + len(ps)]
                at += len(ps)
                ranked.append((-np.mean([r["correct"] for r in rows]), -np.mean([r["prob"] for r in rows]), k))
            order = [k for *_, k in sorted(ranked)]
        else:
            order = list(rng.permutation(len(candidates)))
        chosen[rid] = [candidates[k] for k in order[:facts_per_relation]]
    return chosen, notes


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------

def run_reproduce(lm, factset, out: Path, relations=None, facts_per_relation: int = 10, seed: int = 0,
                  steps: int = 20, prompts_per_fact: int | None = None, select: str = "known",
                  control_prompts: int = 20, t: float = 0.2, p: float = 0.7, erase_k: int = 20,
                  erase_fill: str = "zero", say=None, cancel=None, task: Task | None = None) -> dict:
    """Runs the pipeline above; `say` receives phase messages, `task` the progress of the whole run."""
    from .attribution import AttributionParams
    from .neurons import adapt_p, refined_neurons

    task = as_task(task)
    say = say or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    relations = list(relations or default_relations(factset))
    for rid in relations:
        factset.relation(rid)  # KeyError names the relation
    params = AttributionParams(steps=steps, seed=seed)
    base_params = AttributionParams(method="activation", seed=seed)
    report: dict = {
        "status": "running",
        "model": lm.describe(), "facts": factset.name, "relations": relations,
        "parameters": {"facts_per_relation": facts_per_relation, "seed": seed, "select": select,
                       "prompts_per_fact": prompts_per_fact, "control_prompts": control_prompts,
                       "t": t, "p_start": p, "baseline_t": 0.5, "attribution": params.to_dict(),
                       "baseline_attribution": base_params.to_dict(), "suppress_scope": "answer",
                       "amplify_factor": 2.0, "update": {"lambda1": 1.0, "lambda2": 8.0, "exclusion_fraction": 0.1},
                       "erase": {"k": erase_k, "fill": erase_fill}},
        "versions": _versions(), "paper": PAPER, "timings": timings,
    }

    def write():
        report["timings"]["total"] = time.perf_counter() - started
        (out / "report.json").write_text(dumps(report, indent=2), encoding="utf-8")

    def phase(name):
        say(f"[reproduce] {name}")

    try:
        t0 = time.perf_counter()
        phase("selecting facts")
        chosen, notes = select_facts(lm, factset, relations, facts_per_relation, select, seed,
                                     prompts_per_fact=prompts_per_fact)
        report["selection_notes"] = notes
        timings["select"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_prompts = sum(len(ps) for facts in chosen.values() for _, ps in facts)
        phase(f"attributing {sum(len(v) for v in chosen.values())} facts, {n_prompts} prompts "
              f"({steps} steps; cached in {cache})")
        ig: dict = {}
        base: dict = {}
        attributing, done = task.slice(0.05, 0.55), 0
        for rid, facts in chosen.items():
            for fact, prompts in facts:
                # relay: cancelled with the run, while the run reports its own progress per prompt
                ig[fact] = [_attribute_cached(lm, q, params, cache, task.relay()) for q in prompts]
                base[fact] = [_attribute_cached(lm, q, base_params, cache, task.relay()) for q in prompts]
                done += len(prompts)
                attributing.progress(done / max(n_prompts, 1), "attribution")
        timings["attribution"] = time.perf_counter() - t0
        timings["attribution_per_fact"] = timings["attribution"] / max(len(ig), 1)

        # refined neurons with p adapted per relation
        records: list[ex.FactNeurons] = []
        adapted = {}
        for rid, facts in chosen.items():
            a = adapt_p([[s.scores for s in ig[f]] for f, _ in facts], t=t, p=p)
            b = adapt_p([[s.scores for s in base[f]] for f, _ in facts], t=0.5, p=p)
            adapted[rid] = {"p": a.p, "mean_neurons": a.mean_neurons, "history": a.history,
                            "baseline_p": b.p, "baseline_mean_neurons": b.mean_neurons}
            for fact, prompts in facts:
                records.append(ex.FactNeurons(
                    fact, prompts, refined_neurons([s.scores for s in ig[fact]], t, a.p),
                    refined_neurons([s.scores for s in base[fact]], 0.5, b.p),
                    [s.activations for s in ig[fact]]))
        report["adapted_p"] = adapted
        report["facts_detail"] = [
            {"relation": r.relation, "subject": r.fact.subject, "object": r.fact.object, "prompts": len(r.prompts),
             "prob": float(np.mean([s.prob for s in ig[r.fact]])),
             "neurons": [list(n) for n in r.neurons], "baseline_neurons": [list(n) for n in r.baseline_neurons]}
            for r in records]

        phase("neuron statistics")
        report["neuron_statistics"] = ex.neuron_statistics([r.neurons for r in records],
                                                           [r.relation for r in records], lm.layout.layers)
        report["baseline_neuron_statistics"] = ex.neuron_statistics(
            [r.baseline_neurons for r in records], [r.relation for r in records], lm.layout.layers)
        report["activation_by_prompt"] = ex.activation_by_prompt(lm, records, factset)
        write()

        t0 = time.perf_counter()
        phase("suppress and amplify, with controls")
        report["suppress_amplify"] = ex.suppress_amplify_experiment(
            lm, records, seed=seed, control_prompts=control_prompts, task=task.slice(0.55, 0.75))
        timings["suppress_amplify"] = time.perf_counter() - t0
        write()

        t0 = time.perf_counter()
        phase("update")
        report["update"] = ex.update_experiment(lm, records, factset, seed=seed, facts_per_relation=10,
                                                control_prompts=control_prompts, task=task.slice(0.75, 0.9))
        timings["update"] = time.perf_counter() - t0
        write()

        t0 = time.perf_counter()
        phase("erase")
        report["erase"] = ex.erase_experiment(lm, records, k=erase_k, fill=erase_fill, seed=seed,
                                              control_prompts=2 * control_prompts, task=task.slice(0.9, 1.0))
        timings["erase"] = time.perf_counter() - t0
        report["status"] = "done"
    except BaseException as exc:  # KeyboardInterrupt / Cancelled: keep what is done
        report["status"] = f"interrupted ({type(exc).__name__})"
        write()
        say(f"[reproduce] stopped; partial report in {out / 'report.json'}")
        raise
    write()
    phase("figures and report.md")
    figures = write_figures(report, out)
    report["figures"] = figures
    write()
    (out / "report.md").write_text(render_markdown(report))
    say(f"[reproduce] done in {report['timings']['total']:.0f} s: {out / 'report.md'}")
    return report


def default_relations(factset, n: int = 3) -> list[str]:
    preferred = [r for r in ("P36", "P37", "P30", "P19", "P103", "P1412") if r in factset.relations]
    rest = [r for r in factset.relations if r not in preferred]
    return (preferred + rest)[:n]


# --------------------------------------------------------------------------------------------------------
# Figures and markdown
# --------------------------------------------------------------------------------------------------------

def write_figures(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    stats = report.get("neuron_statistics")
    if stats:
        hist = stats["layer_histogram"]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(range(len(hist)), hist, color="#3b6ea8")
        ax.set_xlabel("layer")
        ax.set_ylabel("knowledge neurons")
        ax.set_title(f"Refined knowledge neurons per layer ({stats['facts']} facts)")
        fig.tight_layout()
        fig.savefig(out / "layer_histogram.png", dpi=120)
        plt.close(fig)
        files.append("layer_histogram.png")
    sa = report.get("suppress_amplify")
    if sa and sa["per_relation"]:
        rels = list(sa["per_relation"]) + ["average"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
        width = 0.27
        colors = {"knowledge": "#c0392b", "baseline": "#7f8c8d", "random": "#bdc3c7"}
        for ax, op in zip(axes, ("suppress", "amplify")):
            for k, method in enumerate(("knowledge", "baseline", "random")):
                vals = [sa["per_relation"][r][method][op]["own"]["relative_change"] for r in rels[:-1]]
                vals.append(sa["average"][method][op]["own"])
                ax.bar(np.arange(len(rels)) + (k - 1) * width, [100 * v for v in vals], width,
                       label={"knowledge": "knowledge neurons", "baseline": "activation baseline",
                              "random": "random neurons"}[method], color=colors[method])
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(range(len(rels)), rels)
            ax.set_ylabel("correct-answer probability change (%)")
            ax.set_title(f"{op.capitalize()} ({'x0' if op == 'suppress' else 'x2'}) at the answer position")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "suppress_amplify.png", dpi=120)
        plt.close(fig)
        files.append("suppress_amplify.png")
    return files


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:+.2f}%"


def _num(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def render_markdown(report: dict) -> str:
    m = report["model"]
    par = report["parameters"]
    lines = [
        "# Knowledge neurons: reproduction report", "",
        f"Model: **{m.get('name', m.get('source'))}** ({m['family']}, {m['kind']}, {m['layers']} layers x "
        f"{m['neurons']} neurons), weights sha256 `{m['sha256'][:16]}...`, {m['dtype']} on {m['device']}.  ",
        f"Facts: `{report['facts']}`, relations {', '.join(report['relations'])}, up to "
        f"{par['facts_per_relation']} facts per relation (selection: {par['select']}), seed {par['seed']}.  ",
        f"Attribution: integrated gradients, {par['attribution']['steps']} steps ({par['attribution']['rule']} "
        f"Riemann points), t = {par['t']}, p adapted per relation from {par['p_start']}; baseline: activation, t = 0.5.  ",
        f"The paper: {PAPER['model']}. Different model, different facts, far fewer facts: compare the direction and "
        f"the gap to the controls, not the digits.", "",
        f"Total time {report['timings'].get('total', 0):.0f} s (attribution {report['timings'].get('attribution', 0):.0f} s, "
        f"{report['timings'].get('attribution_per_fact', 0):.1f} s per fact; paper: {PAPER['seconds_per_fact']}).", "",
    ]
    if report.get("adapted_p"):
        lines += ["| relation | p | mean refined neurons | baseline p | baseline mean |", "|---|---|---|---|---|"]
        for rid, a in report["adapted_p"].items():
            lines.append(f"| {rid} | {a['p']:.2f} | {a['mean_neurons']:.2f} | {a['baseline_p']:.2f} | "
                         f"{a['baseline_mean_neurons']:.2f} |")
        lines.append("")
    s = report.get("neuron_statistics")
    if s:
        lines += ["## Knowledge neurons", "", "| | ours | paper |", "|---|---|---|",
                  f"| mean refined neurons per fact | {_num(s['mean_neurons_per_fact'])} | {PAPER['mean_neurons_per_fact']} |",
                  f"| facts without neurons | {s['facts_without_neurons']} of {s['facts']} | - |",
                  f"| shared neurons, same relation | {_num(s['shared_intra_relation'])} | {PAPER['shared_intra_relation']} |",
                  f"| shared neurons, different relations | {_num(s['shared_inter_relation'])} | {PAPER['shared_inter_relation']} |",
                  "", "Layer histogram: ![layers](layer_histogram.png)", "",
                  "Per layer: " + ", ".join(f"L{l}: {c}" for l, c in enumerate(s["layer_histogram"]) if c), ""]
    a = report.get("activation_by_prompt")
    if a:
        lines += ["## Activation by prompt", "",
                  "Mean activation of a fact's knowledge neurons at the answer position, in the direction that raises "
                  "the answer (ours: the fact's prompts, other relations' templates with the same subject, prompts of "
                  "other relations and subjects; paper: open-domain sentences expressing the fact, with the subject "
                  "only, random).", "",
                  "| | ours | paper |", "|---|---|---|",
                  f"| expressing the fact (its prompts) | {_num(a['expressing'], '{:.3f}')} | {PAPER['activation_expressing']} |",
                  f"| subject only (other relations' templates) | {_num(a['subject_only'], '{:.3f}')} | {PAPER['activation_subject_only']} |",
                  f"| random (other relations and subjects) | {_num(a['random'], '{:.3f}')} | {PAPER['activation_random']} |", ""]
    sa = report.get("suppress_amplify")
    if sa:
        lines += ["## Suppressing and amplifying knowledge neurons", "",
                  "Per relation mean(Δp)/mean(p) of the correct answer over the prompts of its facts, at the answer "
                  "position. Controls: the activation baseline's neurons, and as many random neurons from the same "
                  "layers. `flip` is the share of prompts whose top-1 token changed.", ""]
        for op, paper, paper_base in (("suppress", PAPER["suppress"], PAPER["suppress_baseline"]),
                                      ("amplify", PAPER["amplify"], PAPER["amplify_baseline"])):
            lines += [f"### {op.capitalize()}", "",
                      "| relation | facts | knowledge neurons | flip | baseline | random | KN: same relation | KN: other relations |",
                      "|---|---|---|---|---|---|---|---|"]
            for rid, r in sa["per_relation"].items():
                lines.append(f"| {rid} | {r['facts']} | {_pct(r['knowledge'][op]['own']['relative_change'])} | "
                             f"{_num(r['knowledge'][op]['own']['flip_rate'], '{:.2f}')} | "
                             f"{_pct(r['baseline'][op]['own']['relative_change'])} | "
                             f"{_pct(r['random'][op]['own']['relative_change'])} | "
                             f"{_pct(r['knowledge'][op]['same_relation']['relative_change'])} | "
                             f"{_pct(r['knowledge'][op]['other_relations']['relative_change'])} |")
            av = sa["average"]
            lines.append(f"| **average** | {sa['facts_used']} | **{_pct(av['knowledge'][op]['own'])}** | "
                         f"{_num(sa['average_flip_rate']['knowledge'][op]['own'], '{:.2f}')} | "
                         f"{_pct(av['baseline'][op]['own'])} | {_pct(av['random'][op]['own'])} | "
                         f"{_pct(av['knowledge'][op]['same_relation'])} | {_pct(av['knowledge'][op]['other_relations'])} |")
            lines.append(f"| paper (BERT) | | {_pct(paper)} | | {_pct(paper_base)} | | | barely moves |")
            lines.append("")
        lines += ["![suppress and amplify](suppress_amplify.png)", ""]
    up = report.get("update")
    if up:
        k, r, sa = up.get("knowledge") or {}, up.get("random") or {}, up.get("sign_aware") or {}
        n_flipped = sum(len(f.get("flipped", [])) for f in up["facts"])
        n_neurons = sum(len(f["neurons"]) for f in up["facts"])

        def ppl(arm, kind):
            return (f"{(arm.get(f'ppl_{kind}_ratio_median') or {}).get('text', '-')} "
                    f"({(arm.get(f'ppl_{kind}_ratio_geomean') or {}).get('text', '-')})")

        lines += ["## Updating facts", "",
                  f"λ1 = {up['lambda1']}, λ2 = {up['lambda2']}, {up['embedding']} embeddings ({up['multi_token']} token "
                  f"of multi-token objects), neurons in >10% of the relation's facts left out; {len(up['facts'])} "
                  f"facts updated, {len(up['skipped'])} skipped (not answered correctly, or no neurons left).", "",
                  "Sign-aware (ours, not in the paper): the same neurons, with the edit reversed on those whose mean "
                  f"activation on the fact's prompts is negative ({n_flipped} of {n_neurons} here), since such a "
                  "neuron adds activation × value vector to the residual stream.", "",
                  "| | knowledge neurons | sign-aware (ours) | random neurons | paper | paper random |",
                  "|---|---|---|---|---|---|",
                  f"| change rate | {_pct(k.get('change_rate'))} | {_pct(sa.get('change_rate'))} | {_pct(r.get('change_rate'))} | {_pct(PAPER['update_change_rate'])} | {_pct(PAPER['update_random_change_rate'])} |",
                  f"| success rate (argmax = o') | {_pct(k.get('success_rate'))} | {_pct(sa.get('success_rate'))} | {_pct(r.get('success_rate'))} | {_pct(PAPER['update_success_rate'])} | {_pct(PAPER['update_random_success_rate'])} |",
                  f"| o' in top 5 | {_pct(k.get('top5_rate'))} | {_pct(sa.get('top5_rate'))} | {_pct(r.get('top5_rate'))} | - | - |",
                  *(f"| {kind}-relation perplexity ratio, median (geometric mean) | {ppl(k, kind)} | {ppl(sa, kind)} | "
                    f"{ppl(r, kind)} | +{PAPER[f'update_ppl_{kind}']} | - |" for kind in ("intra", "inter")),
                  ""]
    er = report.get("erase")
    if er:
        lines += ["## Erasing relations", "",
                  f"The relation's {er['k']} most frequent knowledge neurons: value vectors set to {er['fill']}; "
                  f"random: as many random neurons from the same layers. Perplexity of the gold answer.", "",
                  "| relation | accuracy before | after (KN) | after (random) | perplexity before | after (KN) | after (random) | other relations' perplexity before | after (KN) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rid, e in er["per_relation"].items():
            if "skipped" in e:
                lines.append(f"| {rid} | {e['skipped']} | | | | | | | |")
                continue
            b, kn, rnd = e["before"], e["knowledge"], e["random"]
            lines.append(f"| {rid} | {_num(b['accuracy'])} | {_num(kn['accuracy'])} | {_num(rnd['accuracy'])} | "
                         f"{_num(b['perplexity'], '{:.1f}')} | {_num(kn['perplexity'], '{:.1f}')} | "
                         f"{_num(rnd['perplexity'], '{:.1f}')} | {_num(b['other_perplexity'], '{:.1f}')} | "
                         f"{_num(kn['other_perplexity'], '{:.1f}')} |")
        lines += [f"| paper (BERT) | | | | | {PAPER['erase_ppl_increase']} | | | {PAPER['erase_other']} |", ""]
    lines += ["## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    return "\n".join(lines)
